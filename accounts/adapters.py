"""allauth adapter: fills new users from IdP claims and re-syncs role and groups on every login.

The mapping rules live in ``accounts/sso.py`` (pure functions); this module reads allauth's data,
calls them and writes the result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from allauth.account.utils import user_email, user_field, user_username
from allauth.socialaccount.adapter import DefaultSocialAccountAdapter
from allauth.socialaccount.models import SocialLogin
from django.conf import settings
from django.contrib.auth.models import Group
from django.db import transaction
from django.http import HttpRequest

from accounts import sso
from accounts.models import User

logger = logging.getLogger(__name__)


def _provider_type(sociallogin: SocialLogin) -> str:
    """``openid_connect`` or ``saml`` (the provider *type*, also for admin-configured IdPs)."""
    return str(sociallogin.provider.id)


def _saml_attributes(sociallogin: SocialLogin) -> Mapping[str, Any]:
    # For SAML allauth stores python3-saml's get_attributes() as extra_data: every attribute
    # with ALL its values, unlike its attribute_mapping which keeps only the first value.
    data = sociallogin.account.extra_data
    return data if isinstance(data, Mapping) else {}


def _oidc_claims(sociallogin: SocialLogin) -> dict[str, Any]:
    data = sociallogin.account.extra_data
    return sso.merged_oidc_claims(data) if isinstance(data, Mapping) else {}


def user_fields(sociallogin: SocialLogin) -> sso.UserFields:
    if _provider_type(sociallogin) == "saml":
        return sso.saml_user_fields(_saml_attributes(sociallogin), sociallogin.account.uid)
    return sso.oidc_user_fields(_oidc_claims(sociallogin))


def role_values(sociallogin: SocialLogin) -> list[str]:
    """The IdP's role values for this login (groups claim or affiliation attributes)."""
    if _provider_type(sociallogin) == "saml":
        return sso.saml_affiliations(
            _saml_attributes(sociallogin), settings.SSO_SAML_AFFILIATION_ATTRIBUTE
        )
    return sso.claim_values(_oidc_claims(sociallogin), settings.SSO_OIDC_GROUPS_CLAIM)


@transaction.atomic
def user_apply_roles(*, user: User, decision: sso.RoleDecision) -> None:
    """Make the user's staff flag and SSO-managed groups match ``decision``.

    Groups outside ``decision.managed`` (given by hand in admin) are kept. ``is_superuser``
    is never changed, and a superuser stays staff so admin keeps working for them.
    """
    is_staff = decision.is_staff or user.is_superuser
    if user.is_staff != is_staff:
        user.is_staff = is_staff
        user.save(update_fields=["is_staff"])
    wanted = {Group.objects.get_or_create(name=name)[0] for name in sorted(decision.groups)}
    current = set(user.groups.filter(name__in=decision.managed))
    if stale := current - wanted:
        user.groups.remove(*stale)
    if missing := wanted - current:
        user.groups.add(*missing)


class SsoAccountAdapter(DefaultSocialAccountAdapter):
    """Creates users on first login and maps roles on every login (new or returning)."""

    def populate_user(
        self, request: HttpRequest, sociallogin: SocialLogin, data: dict[str, Any]
    ) -> Any:
        user = super().populate_user(request, sociallogin, data)
        fields = user_fields(sociallogin)
        # allauth checks the username before saving and generates a unique one when it is
        # taken, so a clash with a local account never blocks the first login.
        if fields.username:
            user_username(user, fields.username[:150])
        if fields.email:
            user_email(user, fields.email)
        if fields.first_name:
            user_field(user, "first_name", fields.first_name)
        if fields.last_name:
            user_field(user, "last_name", fields.last_name)
        return user

    def save_user(self, request: HttpRequest, sociallogin: SocialLogin, form: Any = None) -> Any:
        user = super().save_user(request, sociallogin, form)
        self._sync_roles(sociallogin)
        return user

    def pre_social_login(self, request: HttpRequest, sociallogin: SocialLogin) -> None:
        # Runs on every login after allauth has looked the account up; a returning user exists
        # now, a new one is saved later and gets its roles in save_user().
        if sociallogin.is_existing:
            self._sync_roles(sociallogin)

    def _sync_roles(self, sociallogin: SocialLogin) -> None:
        user = sociallogin.user
        if not isinstance(user, User) or user.pk is None:
            return
        values = role_values(sociallogin)
        decision = sso.decide_roles(
            values, staff_values=settings.SSO_STAFF_VALUES, group_map=settings.SSO_GROUP_MAP
        )
        user_apply_roles(user=user, decision=decision)
        logger.info(
            "sso login: user=%s provider=%s values=%s staff=%s groups=%s",
            user.username,
            sociallogin.account.provider,
            values,
            decision.is_staff,
            sorted(decision.groups),
        )
