"""SSO fixtures: a real site (daphne) with a real identity provider on loopback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.idp import OidcIdP, SamlIdP, start_oidc_idp, start_saml_idp
from tests.procs import ProcessSet, free_port

# Role settings every SSO test site runs with.
SSO_TEST_ENV = {
    "SSO_STAFF_VALUES": "staff,faculty",
    "SSO_GROUP_MAP": "physics-gpu=gpu-users,physics-gpu@uni.edu=gpu-users",
}


@dataclass
class OidcSite:
    url: str
    idp: OidcIdP


@dataclass
class SamlSite:
    url: str
    idp: SamlIdP


OIDC_ACCOUNTS: dict[str, Any] = {
    "alice": {
        "password": "alice-pw",
        "email": "alice@uni.edu",
        "name": "Alice Liddell",
        "given_name": "Alice",
        "family_name": "Liddell",
        "groups": ["students", "physics-gpu"],
    },
    "carol": {
        "password": "carol-pw",
        "email": "carol@uni.edu",
        "name": "Carol Staff",
        "given_name": "Carol",
        "family_name": "Staff",
        "groups": ["faculty"],
    },
}

SAML_USERS: dict[str, Any] = {
    "bob": {
        "password": "bob-pw",
        "attributes": {
            "uid": ["bob"],
            "mail": ["bob@uni.edu"],
            "givenName": ["Bob"],
            "sn": ["Builder"],
            "eduPersonPrincipalName": ["bob@uni.edu"],
            "eduPersonScopedAffiliation": ["member@uni.edu", "student@uni.edu"],
        },
    },
    "dora": {
        "password": "dora-pw",
        "attributes": {
            "uid": ["dora"],
            "mail": ["dora@uni.edu"],
            "givenName": ["Dora"],
            "sn": ["Explorer"],
            "eduPersonPrincipalName": ["dora@uni.edu"],
            # staff is not the first value: allauth's own mapping would miss it.
            "eduPersonScopedAffiliation": ["member@uni.edu", "staff@uni.edu"],
        },
    },
    "erin": {
        "password": "erin-pw",
        "attributes": {
            "uid": ["erin"],
            "mail": ["erin@uni.edu"],
            "displayName": ["Erin Unscoped"],
            # only the unscoped eduPersonAffiliation is released
            "eduPersonAffiliation": ["member", "faculty"],
        },
    },
}


@pytest.fixture
def oidc_site(procs: ProcessSet, live_env: dict[str, str], tmp_path: Path) -> OidcSite:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    idp = start_oidc_idp(procs, tmp_path / "oidc", site_url=url, accounts=OIDC_ACCOUNTS)
    live_env.update({**SSO_TEST_ENV, **idp.site_env()})
    procs.daphne(port=port)
    return OidcSite(url=url, idp=idp)


@pytest.fixture
def saml_site(procs: ProcessSet, live_env: dict[str, str], tmp_path: Path) -> SamlSite:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    idp = start_saml_idp(procs, tmp_path / "saml", site_url=url, users=SAML_USERS)
    live_env.update({**SSO_TEST_ENV, **idp.site_env()})
    procs.daphne(port=port)
    return SamlSite(url=url, idp=idp)
