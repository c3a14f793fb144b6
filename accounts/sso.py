"""Single sign-on: turn identity-provider claims and attributes into NexCompute users and roles.

Pure functions only (no database, no allauth), so the mapping rules can be unit-tested on plain
dicts. ``accounts/adapters.py`` feeds them from allauth and applies the result to the database.

Contracts:

* Role values come from an OIDC claim (default ``groups``) or from SAML attributes
  (``eduPersonScopedAffiliation`` and, also read, the unscoped ``eduPersonAffiliation``). Both are
  multi-valued; a scalar claim is treated as one value.
* Scoped values (``staff@uni.edu``) count as their unscoped part for the staff decision;
  comparisons ignore case.
* A user is staff when any value is in ``staff_values``; the role group is then ``staff``,
  otherwise ``student``. ``group_map`` adds Django groups for IdP values (the full value or
  its unscoped part may be the key).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ImproperlyConfigured

STAFF_GROUP = "staff"
STUDENT_GROUP = "student"

# eduPerson attribute names as SAML IdPs send them (NameFormat uri) and their friendly names.
EDUPERSON_SCOPED_AFFILIATION = "urn:oid:1.3.6.1.4.1.5923.1.1.1.9"
EDUPERSON_AFFILIATION = "urn:oid:1.3.6.1.4.1.5923.1.1.1.1"
EDUPERSON_PRINCIPAL_NAME = "urn:oid:1.3.6.1.4.1.5923.1.1.1.6"
SAML_UID = "urn:oid:0.9.2342.19200300.100.1.1"
SAML_MAIL = "urn:oid:0.9.2342.19200300.100.1.3"
SAML_GIVEN_NAME = "urn:oid:2.5.4.42"
SAML_SURNAME = "urn:oid:2.5.4.4"
SAML_DISPLAY_NAME = "urn:oid:2.16.840.1.113730.3.1.241"

_FRIENDLY = {
    EDUPERSON_SCOPED_AFFILIATION: "eduPersonScopedAffiliation",
    EDUPERSON_AFFILIATION: "eduPersonAffiliation",
    EDUPERSON_PRINCIPAL_NAME: "eduPersonPrincipalName",
    SAML_UID: "uid",
    SAML_MAIL: "mail",
    SAML_GIVEN_NAME: "givenName",
    SAML_SURNAME: "sn",
    SAML_DISPLAY_NAME: "displayName",
}


@dataclass(frozen=True)
class RoleDecision:
    """What one login says about a user: staff or not, and the Django groups to hold.

    ``managed`` are all groups SSO is in charge of; groups outside it (added by hand in admin)
    are left alone.
    """

    is_staff: bool
    groups: frozenset[str]
    managed: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class UserFields:
    username: str
    email: str
    first_name: str
    last_name: str


def parse_group_map(raw: str) -> dict[str, frozenset[str]]:
    """Parse ``SSO_GROUP_MAP``: ``idp-value=django-group`` pairs separated by commas.

    A value may map to several groups (repeat the key, or separate groups with ``|``).
    Keys are compared case-insensitively. Raises ImproperlyConfigured on a malformed pair.
    """
    result: dict[str, set[str]] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        groups = {g.strip() for g in value.split("|") if g.strip()}
        if not sep or not key or not groups:
            raise ImproperlyConfigured(
                f"SSO_GROUP_MAP: expected 'idp-value=django-group', got {item!r}"
            )
        result.setdefault(key, set()).update(groups)
    return {key: frozenset(groups) for key, groups in result.items()}


def unscope(value: str) -> str:
    """``staff@uni.edu`` -> ``staff``; unscoped values are returned as they are."""
    return value.split("@", 1)[0] if "@" in value else value


def as_values(raw: Any) -> list[str]:
    """A claim or attribute as a list of strings: lists stay lists, a scalar is one value."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw] if raw.strip() else []
    if isinstance(raw, Iterable) and not isinstance(raw, Mapping):
        return [str(v) for v in raw if v is not None and str(v).strip()]
    return [str(raw)]


def claim_values(claims: Mapping[str, Any], claim: str) -> list[str]:
    """Values of an OIDC claim. A dotted name (``realm_access.roles``) walks nested objects,
    as Keycloak puts roles there; a literal key containing dots is tried first."""
    if claim in claims:
        return as_values(claims[claim])
    node: Any = claims
    for part in claim.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return []
        node = node[part]
    return as_values(node)


def saml_attribute(attributes: Mapping[str, Any], name: str) -> list[str]:
    """All values of a SAML attribute, found by its URI name or its friendly name."""
    for key in (name, _FRIENDLY.get(name)):
        if key and key in attributes:
            return as_values(attributes[key])
    return []


def saml_affiliations(attributes: Mapping[str, Any], attribute: str) -> list[str]:
    """Affiliation values from the configured attribute plus the unscoped eduPersonAffiliation,
    which many IdPs release instead of (or as well as) the scoped one."""
    values = saml_attribute(attributes, attribute)
    for extra in (EDUPERSON_SCOPED_AFFILIATION, EDUPERSON_AFFILIATION):
        if extra != attribute:
            values += saml_attribute(attributes, extra)
    return list(dict.fromkeys(values))  # keep order, drop duplicates


def decide_roles(
    values: Iterable[str],
    *,
    staff_values: Iterable[str],
    group_map: Mapping[str, frozenset[str]],
) -> RoleDecision:
    """Decide staff status and groups from the IdP's role values (see the module docstring)."""
    staff_set = {v.strip().lower() for v in staff_values if v.strip()}
    is_staff = False
    groups: set[str] = set()
    for value in values:
        full = value.strip().lower()
        short = unscope(full)
        if full in staff_set or short in staff_set:
            is_staff = True
        groups.update(group_map.get(full, frozenset()))
        if short != full:
            groups.update(group_map.get(short, frozenset()))
    groups.add(STAFF_GROUP if is_staff else STUDENT_GROUP)
    managed = {STAFF_GROUP, STUDENT_GROUP}.union(*group_map.values())
    return RoleDecision(is_staff=is_staff, groups=frozenset(groups), managed=frozenset(managed))


def _first(values: list[str]) -> str:
    return values[0].strip() if values else ""


def oidc_user_fields(claims: Mapping[str, Any]) -> UserFields:
    """Username, email and name from OIDC claims (userinfo merged over the ID token)."""
    email = str(claims.get("email") or "").strip()
    username = str(claims.get("preferred_username") or "").strip() or email.split("@")[0]
    first = str(claims.get("given_name") or "").strip()
    last = str(claims.get("family_name") or "").strip()
    if not (first or last) and claims.get("name"):
        first, _, last = str(claims["name"]).strip().partition(" ")
    return UserFields(username=username, email=email, first_name=first, last_name=last)


def saml_user_fields(attributes: Mapping[str, Any], name_id: str = "") -> UserFields:
    """Username, email and name from SAML attributes: the username is ``uid``, else the local
    part of eduPersonPrincipalName, else of the mail address, else the NameID."""
    email = _first(saml_attribute(attributes, SAML_MAIL))
    eppn = _first(saml_attribute(attributes, EDUPERSON_PRINCIPAL_NAME))
    username = (
        _first(saml_attribute(attributes, SAML_UID))
        or unscope(eppn)
        or unscope(email)
        or unscope(name_id)
    )
    first = _first(saml_attribute(attributes, SAML_GIVEN_NAME))
    last = _first(saml_attribute(attributes, SAML_SURNAME))
    if not (first or last):
        first, _, last = _first(saml_attribute(attributes, SAML_DISPLAY_NAME)).partition(" ")
    return UserFields(username=username, email=email, first_name=first, last_name=last)


def merged_oidc_claims(extra_data: Mapping[str, Any]) -> dict[str, Any]:
    """allauth stores ``{"userinfo": {...}, "id_token": {...}}``; userinfo wins per claim, but
    a claim only in the ID token (IdPs often put ``groups`` there) is kept."""
    id_token = extra_data.get("id_token")
    userinfo = extra_data.get("userinfo")
    if not isinstance(id_token, Mapping) and not isinstance(userinfo, Mapping):
        return dict(extra_data)  # data stored by allauth < 65.11: the claims themselves
    merged: dict[str, Any] = {}
    if isinstance(id_token, Mapping):
        merged.update(id_token)
    if isinstance(userinfo, Mapping):
        merged.update(userinfo)
    return merged
