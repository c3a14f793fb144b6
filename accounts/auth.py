"""API authentication: a personal API token (Bearer) or the browser session with CSRF."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja.security import HttpBearer, SessionAuth

from accounts.services import api_token_authenticate


class ApiTokenAuth(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> Any:
        user = api_token_authenticate(token)
        if user is not None:
            request.user = user
        return user


class BrowserSessionAuth(SessionAuth):
    """The Django session cookie; unsafe methods also need the CSRF token (ninja checks it)."""


API_AUTH = [ApiTokenAuth(), BrowserSessionAuth()]
