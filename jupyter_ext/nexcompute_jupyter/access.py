"""Cloudflare Access at the session's door: the ``Cf-Access-Jwt-Assertion`` check.

As Cloudflare documents it ("Validate JWTs", developers.cloudflare.com/cloudflare-one/identity/
users/validating-json): every request Access lets through carries the application token in the
``Cf-Access-Jwt-Assertion`` header (validate the header, not the ``CF_Authorization`` cookie);
it is an RS256 JWT signed with the team's key, whose public keys are at
``https://<team>.cloudflareaccess.com/cdn-cgi/access/certs`` (``keys`` in JWK form; keys rotate
every 6 weeks, the previous one stays valid 7 days). We check the signature against that JWKS,
``aud`` (contains the application's AUD tag), ``exp`` / ``nbf`` / ``iat``, ``iss`` (the team
domain) and that ``email`` is the session owner's, case-insensitively.

The JWKS is fetched on first use and cached; an unknown ``kid`` refetches it, at most once per
:data:`REFETCH_MIN_SECONDS` so made-up key ids cannot flood Cloudflare.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

HEADER = "Cf-Access-Jwt-Assertion"
CERTS_PATH = "/cdn-cgi/access/certs"
CACHE_SECONDS = 3600.0
REFETCH_MIN_SECONDS = 30.0
FETCH_TIMEOUT = 5.0
LEEWAY_SECONDS = 30


class AccessDenied(Exception):
    """The request does not carry a valid Access token for this session's owner (the text
    says why; logged, and shown as a plain refusal)."""


def team_issuer(team_domain: str) -> str:
    """``myteam``, ``myteam.cloudflareaccess.com`` or ``https://myteam.cloudflareaccess.com``
    → ``https://myteam.cloudflareaccess.com`` (the ``iss`` Access puts in its tokens). A plain
    ``http://`` origin is accepted only on a loopback address (the stand-in in tests)."""
    value = team_domain.strip().rstrip("/")
    if not value:
        raise ValueError("empty Cloudflare Access team domain")
    if "://" not in value:
        if "." not in value:
            value = f"{value}.cloudflareaccess.com"
        return f"https://{value}"
    parts = urllib.parse.urlsplit(value)
    if parts.path or parts.query or parts.fragment or not parts.hostname:
        raise ValueError(f"a team domain is an origin, not {team_domain!r}")
    if parts.scheme == "https":
        return value
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return value
    raise ValueError(f"a team domain must be served over https: {team_domain!r}")


@dataclass(frozen=True)
class AccessPolicy:
    team_domain: str
    audience: str
    email: str

    @property
    def issuer(self) -> str:
        return team_issuer(self.team_domain)

    @property
    def certs_url(self) -> str:
        return self.issuer + CERTS_PATH


class AccessChecker:
    """Checks ``Cf-Access-Jwt-Assertion`` values for one session (thread-safe)."""

    def __init__(self, policy: AccessPolicy) -> None:
        import jwt  # PyJWT[crypto]: imported here so the door module needs only the stdlib

        self._jwt = jwt
        self.policy = policy
        self._issuer = policy.issuer
        self._keys: dict[str, Any] = {}
        self._fetched_at = 0.0
        self._lock = threading.Lock()

    def _fetch(self) -> None:
        req = urllib.request.Request(self.policy.certs_url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT) as resp:
            doc = json.loads(resp.read(1 << 20))
        keys: dict[str, Any] = {}
        for jwk in doc.get("keys", []) if isinstance(doc, dict) else []:
            if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or not jwk.get("kid"):
                continue
            keys[str(jwk["kid"])] = self._jwt.PyJWK.from_dict(jwk, algorithm="RS256").key
        self._keys = keys
        self._fetched_at = time.monotonic()

    def _key(self, kid: str) -> Any:
        with self._lock:
            age = time.monotonic() - self._fetched_at
            stale = not self._fetched_at or age > CACHE_SECONDS
            unknown = kid not in self._keys and age > REFETCH_MIN_SECONDS
            if stale or unknown:
                try:
                    self._fetch()
                except (OSError, ValueError) as exc:
                    if not self._keys:
                        raise AccessDenied(f"cannot fetch the Access keys: {exc}") from None
            key = self._keys.get(kid)
        if key is None:
            raise AccessDenied("the Access token is signed with an unknown key")
        return key

    def check(self, assertion: str | None, *, now: float | None = None) -> dict[str, Any]:
        """The token's claims when ``assertion`` is a valid Access token for this session's
        owner; raises :class:`AccessDenied`. Blocking (may fetch the JWKS)."""
        jwt = self._jwt
        if not assertion:
            raise AccessDenied(f"no {HEADER} header: the request did not come through Access")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise AccessDenied("the Access token is not a JWT") from None
        if header.get("alg") != "RS256":
            raise AccessDenied("the Access token is not signed with RS256")
        key = self._key(str(header.get("kid", "")))
        options: dict[str, Any] = {"require": ["exp", "iat", "iss", "aud"]}
        if now is not None:
            options["verify_exp"] = False  # checked below against the given clock
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion,
                key,
                algorithms=["RS256"],
                audience=self.policy.audience,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise AccessDenied("the Access token has expired") from None
        except jwt.InvalidAudienceError:
            raise AccessDenied("the Access token is for another application") from None
        except jwt.InvalidIssuerError:
            raise AccessDenied("the Access token is from another team") from None
        except jwt.InvalidSignatureError:
            raise AccessDenied("the Access token's signature is not valid") from None
        except jwt.PyJWTError as exc:
            raise AccessDenied(f"the Access token is not valid: {exc}") from None
        if now is not None and int(claims["exp"]) < now - LEEWAY_SECONDS:
            raise AccessDenied("the Access token has expired")
        email = claims.get("email")
        if not isinstance(email, str) or email.casefold() != self.policy.email.casefold():
            raise AccessDenied("the Access token is for another user than the session's owner")
        return claims
