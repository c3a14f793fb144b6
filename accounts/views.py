"""Login and logout pages: Django's password login plus one button per configured identity
provider, and logout that also ends the OIDC session at the IdP (RP-initiated logout)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode

import requests
from allauth.socialaccount.adapter import get_adapter as get_social_adapter
from allauth.socialaccount.models import SocialApp, SocialToken
from allauth.socialaccount.providers.base import Provider
from allauth.socialaccount.providers.oauth2.views import OAuth2CallbackView
from allauth.socialaccount.providers.openid_connect.views import OpenIDConnectOAuth2Adapter
from django.conf import settings
from django.contrib.auth import logout as auth_logout
from django.contrib.auth import views as auth_views
from django.core.cache import cache
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseForbidden,
    HttpResponseRedirect,
)
from django.urls import reverse
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_POST

logger = logging.getLogger(__name__)

# Session keys written at an OIDC login and read at logout.
SESSION_OIDC_ID_TOKEN = "sso_oidc_id_token"
SESSION_OIDC_PROVIDER = "sso_oidc_provider_id"

SSO_PROVIDER_TYPES = ("openid_connect", "saml")


def sso_providers(request: HttpRequest) -> list[Provider]:
    """The configured identity providers (environment and admin), in a stable order."""
    providers = [
        p for p in get_social_adapter().list_providers(request) if p.id in SSO_PROVIDER_TYPES
    ]
    return sorted(providers, key=lambda p: (SSO_PROVIDER_TYPES.index(p.id), str(p.name)))


class LoginView(auth_views.LoginView):
    """Django's login form (fields ``username``/``password``) plus the IdP buttons.

    With ``SSO_LOCAL_LOGIN=0`` the form is hidden and password POSTs are refused (403).
    """

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context["sso_providers"] = [
            {"name": p.name, "login_url": p.get_login_url(self.request)}
            for p in sso_providers(self.request)
        ]
        context["local_login"] = settings.SSO_LOCAL_LOGIN
        return context

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not settings.SSO_LOCAL_LOGIN:
            return HttpResponseForbidden("Password login is turned off; use single sign-on.")
        return super().post(request, *args, **kwargs)


class IdTokenKeepingAdapter(OpenIDConnectOAuth2Adapter):
    """allauth's OIDC adapter, remembering the raw ID token of the login it completes.

    allauth keeps only the decoded claims, but RP-initiated logout wants the token itself as
    ``id_token_hint``.
    """

    raw_id_token: str | None = None

    def complete_login(
        self, request: HttpRequest, app: SocialApp, token: SocialToken, **kwargs: Any
    ) -> Any:
        response = kwargs.get("response")
        if isinstance(response, dict) and isinstance(response.get("id_token"), str):
            self.raw_id_token = response["id_token"]
        return super().complete_login(request, app, token, **kwargs)


def oidc_callback(request: HttpRequest, provider_id: str) -> HttpResponse:
    """allauth's OIDC callback (same URL and name), keeping the ID token in the session."""
    adapter = IdTokenKeepingAdapter(request, provider_id)
    try:
        response: HttpResponse = OAuth2CallbackView.adapter_view(adapter)(request)
    except SocialApp.DoesNotExist as exc:
        raise Http404 from exc
    # Stored after allauth's login() has rotated the session, so the token stays with it.
    if adapter.raw_id_token and request.user.is_authenticated:
        request.session[SESSION_OIDC_ID_TOKEN] = adapter.raw_id_token
        request.session[SESSION_OIDC_PROVIDER] = provider_id
    return response


def _end_session_endpoint(request: HttpRequest, provider_id: str) -> str | None:
    """The IdP's ``end_session_endpoint`` from discovery (cached an hour), or None."""
    cache_key = f"sso.oidc.end_session.{provider_id}"
    cached = cache.get(cache_key)
    if cached is not None:
        return str(cached) or None
    try:
        config = IdTokenKeepingAdapter(request, provider_id).openid_config
    except (SocialApp.DoesNotExist, requests.RequestException, ValueError) as exc:
        logger.warning("OIDC discovery for logout failed (%s): %s", provider_id, exc)
        return None
    endpoint = str(config.get("end_session_endpoint") or "")
    cache.set(cache_key, endpoint, 3600)
    return endpoint or None


@require_POST
@csrf_protect
def logout(request: HttpRequest) -> HttpResponse:
    """End the local session; after an OIDC login, also send the browser to the IdP's
    end-session endpoint, which comes back to the login page."""
    id_token = request.session.get(SESSION_OIDC_ID_TOKEN)
    provider_id = request.session.get(SESSION_OIDC_PROVIDER)
    auth_logout(request)
    login_url = request.build_absolute_uri(reverse("login"))
    if id_token and provider_id:
        endpoint = _end_session_endpoint(request, provider_id)
        if endpoint:
            try:
                client_id = get_social_adapter().get_app(request, provider=provider_id).client_id
            except SocialApp.DoesNotExist:
                client_id = ""
            params = {"id_token_hint": id_token, "post_logout_redirect_uri": login_url}
            if client_id:
                params["client_id"] = client_id
            separator = "&" if "?" in endpoint else "?"
            return HttpResponseRedirect(f"{endpoint}{separator}{urlencode(params)}")
    return HttpResponseRedirect(settings.LOGOUT_REDIRECT_URL or login_url)
