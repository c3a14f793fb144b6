"""The SSO mapping rules (accounts/sso.py), the role write (accounts/adapters.py) and the
settings read from the environment (nexcompute/sso_settings.py)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
from django.contrib.auth.models import Group
from django.core.exceptions import ImproperlyConfigured

from accounts import sso
from accounts.adapters import user_apply_roles
from accounts.models import QuotaPolicy, User
from accounts.services import policy_for
from tests.factories import UserFactory

GROUP_MAP = sso.parse_group_map("physics-gpu=gpu-users, cs-lab=cs-users|lab-users")
STAFF = ["staff", "faculty", "employee"]


def decide(*values: str) -> sso.RoleDecision:
    return sso.decide_roles(values, staff_values=STAFF, group_map=GROUP_MAP)


def test_it_parses_the_group_map() -> None:
    assert {
        "physics-gpu": frozenset({"gpu-users"}),
        "cs-lab": frozenset({"cs-users", "lab-users"}),
    } == GROUP_MAP
    assert sso.parse_group_map("") == {}
    assert sso.parse_group_map("A=x,a=y") == {"a": frozenset({"x", "y"})}


@pytest.mark.parametrize("raw", ["nogroup", "=x", "a=", "a=|"])
def test_it_refuses_a_malformed_group_map(raw: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="SSO_GROUP_MAP"):
        sso.parse_group_map(raw)


def test_students_get_the_student_group() -> None:
    decision = decide("student@uni.edu", "member@uni.edu")
    assert not decision.is_staff
    assert decision.groups == {"student"}


@pytest.mark.parametrize("value", ["staff", "staff@uni.edu", "Faculty@Uni.EDU", "employee"])
def test_a_staff_value_makes_staff(value: str) -> None:
    decision = decide("member@uni.edu", value)  # not the first value
    assert decision.is_staff
    assert decision.groups == {"staff"}


def test_group_map_adds_groups_for_full_and_unscoped_values() -> None:
    assert decide("physics-gpu").groups == {"student", "gpu-users"}
    assert decide("physics-gpu@uni.edu").groups == {"student", "gpu-users"}
    assert decide("staff", "cs-lab").groups == {"staff", "cs-users", "lab-users"}
    assert decide().managed == {"staff", "student", "gpu-users", "cs-users", "lab-users"}


def test_no_values_means_student() -> None:
    assert decide() == sso.RoleDecision(
        is_staff=False, groups=frozenset({"student"}), managed=decide().managed
    )


def test_claim_values_accepts_lists_strings_and_nested_claims() -> None:
    claims = {
        "groups": ["a", "b"],
        "role": "staff",
        "realm_access": {"roles": ["faculty"]},
        "weird.key": ["x"],
        "empty": None,
    }
    assert sso.claim_values(claims, "groups") == ["a", "b"]
    assert sso.claim_values(claims, "role") == ["staff"]
    assert sso.claim_values(claims, "realm_access.roles") == ["faculty"]
    assert sso.claim_values(claims, "weird.key") == ["x"]
    assert sso.claim_values(claims, "empty") == []
    assert sso.claim_values(claims, "missing.path") == []


def test_saml_affiliations_read_every_value_of_both_attributes() -> None:
    attributes = {
        sso.EDUPERSON_SCOPED_AFFILIATION: ["member@uni.edu", "staff@uni.edu"],
        sso.EDUPERSON_AFFILIATION: ["member", "staff"],
    }
    assert sso.saml_affiliations(attributes, sso.EDUPERSON_SCOPED_AFFILIATION) == [
        "member@uni.edu",
        "staff@uni.edu",
        "member",
        "staff",
    ]
    # friendly names (some IdPs send NameFormat basic) are read too
    assert sso.saml_affiliations(
        {"eduPersonAffiliation": ["faculty"]}, sso.EDUPERSON_SCOPED_AFFILIATION
    ) == ["faculty"]
    # a custom attribute, plus the two standard ones
    assert sso.saml_affiliations({"role": ["x"], "eduPersonAffiliation": ["y"]}, "role") == [
        "x",
        "y",
    ]


def test_oidc_user_fields() -> None:
    fields = sso.oidc_user_fields(
        {"preferred_username": "alice", "email": "a@uni.edu", "name": "Alice Liddell"}
    )
    assert fields == sso.UserFields("alice", "a@uni.edu", "Alice", "Liddell")
    assert sso.oidc_user_fields({"email": "bob@uni.edu"}).username == "bob"


def test_saml_user_fields() -> None:
    attributes = {
        sso.EDUPERSON_PRINCIPAL_NAME: ["bob@uni.edu"],
        sso.SAML_MAIL: ["robert@uni.edu"],
        sso.SAML_GIVEN_NAME: ["Bob"],
        sso.SAML_SURNAME: ["Builder"],
    }
    assert sso.saml_user_fields(attributes) == sso.UserFields(
        "bob", "robert@uni.edu", "Bob", "Builder"
    )
    assert sso.saml_user_fields({"displayName": ["Erin X"]}, "erin@idp").username == "erin"
    assert sso.saml_user_fields({"displayName": ["Erin X"]}).first_name == "Erin"


def test_merged_oidc_claims_prefer_userinfo_but_keep_id_token_claims() -> None:
    merged = sso.merged_oidc_claims(
        {
            "userinfo": {"sub": "1", "email": "new@x"},
            "id_token": {"email": "old@x", "groups": ["g"]},
        }
    )
    assert merged == {"sub": "1", "email": "new@x", "groups": ["g"]}
    assert sso.merged_oidc_claims({"sub": "1", "groups": ["g"]}) == {"sub": "1", "groups": ["g"]}


# -- applying a decision to the database ---------------------------------------------------


def names(user: User) -> set[str]:
    return set(user.groups.values_list("name", flat=True))


@pytest.mark.django_db
def test_applying_roles_replaces_managed_groups_and_keeps_others() -> None:
    user = UserFactory.create(username="alice")
    user.groups.add(Group.objects.create(name="hand-picked"))
    user_apply_roles(user=user, decision=decide("staff", "physics-gpu"))
    user.refresh_from_db()
    assert user.is_staff and names(user) == {"staff", "gpu-users", "hand-picked"}

    user_apply_roles(user=user, decision=decide("student"))
    user.refresh_from_db()
    assert not user.is_staff and names(user) == {"student", "hand-picked"}


@pytest.mark.django_db
def test_a_superuser_stays_staff() -> None:
    user = UserFactory.create(username="root", is_staff=True, is_superuser=True)
    user_apply_roles(user=user, decision=decide("student"))
    user.refresh_from_db()
    assert user.is_staff and user.is_superuser


@pytest.mark.django_db
def test_quotas_follow_the_mapped_groups() -> None:
    gpu = Group.objects.create(name="gpu-users")
    QuotaPolicy.objects.create(name="gpu", group=gpu, max_concurrent_sessions=3)
    user = UserFactory.create(username="alice")
    user_apply_roles(user=user, decision=decide("physics-gpu"))
    assert policy_for(user).max_concurrent_sessions == 3


# -- settings from the environment ---------------------------------------------------------


def load_sso_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> ModuleType:
    for name in list(os.environ):
        if name.startswith("SSO_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import nexcompute.sso_settings as module

    return importlib.reload(module)


def test_no_sso_variables_means_no_identity_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_sso_settings(monkeypatch)
    assert module.SOCIALACCOUNT_PROVIDERS == {}
    assert module.SSO_LOCAL_LOGIN is True
    assert module.SSO_STAFF_VALUES == ["staff", "faculty", "employee"]


def test_it_configures_both_identity_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_sso_settings(
        monkeypatch,
        SSO_OIDC_ISSUER="https://login.uni.edu/realms/uni/",
        SSO_OIDC_CLIENT_ID="nexcompute",
        SSO_OIDC_CLIENT_SECRET="s",
        SSO_OIDC_SCOPES="openid email",
        SSO_SAML_METADATA_URL="https://idp.uni.edu/idp/shibboleth",
        SSO_LOCAL_LOGIN="0",
        SSO_GROUP_MAP="physics-gpu=gpu-users",
    )
    oidc = module.SOCIALACCOUNT_PROVIDERS["openid_connect"]["APPS"][0]
    assert oidc["provider_id"] == "university" and oidc["name"] == "University login"
    assert oidc["settings"]["server_url"] == "https://login.uni.edu/realms/uni"
    assert oidc["settings"]["scope"] == ["openid", "email"]
    saml = module.SOCIALACCOUNT_PROVIDERS["saml"]["APPS"][0]
    assert saml["client_id"] == "university" and saml["name"] == "University login (SAML)"
    assert saml["settings"]["idp"]["metadata_url"] == "https://idp.uni.edu/idp/shibboleth"
    assert saml["settings"]["advanced"]["want_assertion_signed"] is True
    assert module.SSO_LOCAL_LOGIN is False
    assert {"physics-gpu": frozenset({"gpu-users"})} == module.SSO_GROUP_MAP
    load_sso_settings(monkeypatch)  # leave the module as the environment has it


def test_it_refuses_an_issuer_without_a_client(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImproperlyConfigured, match="SSO_OIDC_CLIENT_ID"):
        load_sso_settings(monkeypatch, SSO_OIDC_ISSUER="https://login.uni.edu")
    load_sso_settings(monkeypatch)
