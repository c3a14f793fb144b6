"""API authentication: a personal API token (Bearer) or the browser session with CSRF."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja.security import HttpBearer, SessionAuth

from accounts.models import User
from accounts.services import api_token_authenticate


class AuthedRequest(HttpRequest):
    """A request that passed ``API_AUTH`` or ``login_required``: ``user`` is a real user, not
    ``AnonymousUser`` (annotate views with it instead of ignoring the type of
    ``request.user``)."""

    user: User


class ApiTokenAuth(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> Any:
        user = api_token_authenticate(token)
        if user is not None:
            request.user = user
        return user


class BrowserSessionAuth(SessionAuth):
    """The Django session cookie; unsafe methods also need the CSRF token (ninja checks it)."""


API_AUTH = [ApiTokenAuth(), BrowserSessionAuth()]
