"""Cloudflare Access applications through Cloudflare's API, behind one small interface.

:class:`AccessApi` is what the Nexus needs: create a self-hosted Access application for the
lab's session host names and an ``allow`` policy on it; :func:`lab_access_provision` does both
and stores the team domain and the application's AUD tag on the lab, which the session's door
then checks every request against (docs/security.md). Requests and answers follow Cloudflare's
API v4 as documented ("Add an Access application", ``POST /accounts/{account_id}/access/apps``;
"Create an Access application policy", ``POST /accounts/{account_id}/access/apps/{app_id}/
policies``; the ``{"success", "errors", "messages", "result"}`` envelope; ``Authorization:
Bearer <API token>``). Tests run it against ``tests/standins/cloudflare_access.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import requests
from django.db import transaction
from nexcompute_jupyter.access import team_issuer

from machines.models import Lab

API_URL = "https://api.cloudflare.com/client/v4"
TIMEOUT = 15.0


class AccessApiError(Exception):
    """Cloudflare refused or did not answer; the text carries its error messages."""


@dataclass(frozen=True)
class AccessApplication:
    id: str
    aud: str
    domain: str


class AccessApi(Protocol):
    def create_application(
        self, *, name: str, domain: str, session_duration: str
    ) -> AccessApplication: ...

    def create_policy(self, *, app_id: str, name: str, include: list[dict[str, Any]]) -> str: ...


class CloudflareAccessApi:
    """:class:`AccessApi` over HTTPS to Cloudflare (or a stand-in at ``api_url``)."""

    def __init__(self, *, api_token: str, account_id: str, api_url: str = API_URL) -> None:
        self.api_url = api_url.rstrip("/")
        self.account_id = account_id
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {api_token}"

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.api_url}/accounts/{self.account_id}/{path}"
        try:
            resp = self._session.post(url, json=body, timeout=TIMEOUT)
            data = resp.json()
        except (requests.RequestException, ValueError) as exc:
            raise AccessApiError(f"Cloudflare API {path}: {exc}") from None
        if not isinstance(data, dict) or not data.get("success") or resp.status_code >= 300:
            errors = data.get("errors") if isinstance(data, dict) else None
            text = "; ".join(
                f"{e.get('code')}: {e.get('message')}" for e in errors or [] if isinstance(e, dict)
            )
            raise AccessApiError(f"Cloudflare API {path} answered {resp.status_code}: {text}")
        result = data.get("result")
        if not isinstance(result, dict):
            raise AccessApiError(f"Cloudflare API {path}: no result")
        return result

    def create_application(
        self, *, name: str, domain: str, session_duration: str = "24h"
    ) -> AccessApplication:
        result = self._post(
            "access/apps",
            {
                "name": name,
                "domain": domain,
                "type": "self_hosted",
                "session_duration": session_duration,
            },
        )
        try:
            return AccessApplication(
                id=str(result["id"]), aud=str(result["aud"]), domain=str(result["domain"])
            )
        except KeyError as exc:
            raise AccessApiError(f"Cloudflare API access/apps: no {exc} in the answer") from None

    def create_policy(self, *, app_id: str, name: str, include: list[dict[str, Any]]) -> str:
        result = self._post(
            f"access/apps/{app_id}/policies",
            {"name": name, "decision": "allow", "include": include, "precedence": 1},
        )
        return str(result.get("id", ""))


def lab_access_provision(
    *,
    lab: Lab,
    api: AccessApi,
    team_domain: str,
    domain: str,
    allow_email_domains: list[str],
    session_duration: str = "24h",
) -> AccessApplication:
    """Create the lab's Access application (``domain``, e.g. ``*.lab1.example.edu``, the named
    tunnels' host names) and a policy letting in the university's accounts; then store the
    team domain and AUD tag on the lab. Access's own policy is coarse (who may reach the lab's
    host names at all); the door in each session's Jupyter narrows it to the session's owner."""
    if not allow_email_domains:
        raise ValueError("at least one email domain to allow")
    team_issuer(team_domain)  # its form (ValueError), before anything is created at Cloudflare
    app = api.create_application(
        name=f"NexCompute {lab.name}", domain=domain, session_duration=session_duration
    )
    api.create_policy(
        app_id=app.id,
        name=f"NexCompute {lab.name}: university accounts",
        include=[{"email_domain": {"domain": d}} for d in allow_email_domains],
    )
    with transaction.atomic():
        Lab.objects.filter(pk=lab.pk).update(
            access_team_domain=team_domain, access_audience=app.aud
        )
    lab.access_team_domain, lab.access_audience = team_domain, app.aud
    return app
