"""API authentication: a personal API token (Bearer) or the browser session with CSRF.

CONTRACT: no credential, an unknown or a revoked token get ``401`` with ``WWW-Authenticate:
Bearer`` on every method; CSRF applies only to cookie-authenticated requests. So:

- a request carrying ``Authorization`` is judged by that header alone: a bad one is a 401 (it
  never falls through to the cookie, where a CSRF failure would mask the real problem);
- without it, the session cookie counts only if it names a logged-in user, and only then is
  the CSRF token checked (403 on failure);
- nothing at all: 401.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja.errors import HttpError
from ninja.security import HttpBearer, SessionAuth
from ninja.utils import check_csrf

from accounts.models import User
from accounts.services import api_token_authenticate


class AuthedRequest(HttpRequest):
    """A request that passed ``API_AUTH`` or ``login_required``: ``user`` is a real user, not
    ``AnonymousUser`` (annotate views with it instead of ignoring the type of
    ``request.user``)."""

    user: User


class InvalidCredential(Exception):
    """A credential was sent and is wrong: the API answers 401 saying so."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ApiTokenAuth(HttpBearer):
    def __call__(self, request: HttpRequest) -> Any:
        header = request.headers.get("Authorization")
        if header is None:
            return None  # maybe the browser session
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidCredential("the Authorization header must be 'Bearer <API token>'")
        user = self.authenticate(request, token.strip())
        if user is None:
            raise InvalidCredential("the API token is unknown or revoked")
        return user

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        user = api_token_authenticate(token)
        if user is not None:
            request.user = user
        return user


class BrowserSessionAuth(SessionAuth):
    """The Django session cookie of a logged-in user; unsafe methods also need the CSRF token."""

    def __call__(self, request: HttpRequest) -> Any:
        if not request.user.is_authenticated:
            return None  # no session: a 401, never a CSRF error
        if not getattr(request, "_ninja_csrf_exempt", False) and check_csrf(request):
            raise HttpError(403, "CSRF token missing or incorrect (browser session)")
        return request.user


API_AUTH = [ApiTokenAuth(), BrowserSessionAuth()]
