"""The JSON API (``/api/``): one NinjaAPI, errors always ``{"detail": "..."}``."""

from __future__ import annotations

import json
import logging
from typing import Any, cast

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.parser import Parser

from accounts.auth import API_AUTH, InvalidCredential
from nexcompute.errors import ServiceError

log = logging.getLogger(__name__)


def _has_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class JsonParser(Parser):
    """JSON bodies, refusing strings with NUL characters.

    PostgreSQL text cannot hold NUL, so such a string would otherwise reach the database and
    fail there as a 500. Ninja answers 400 for any exception raised here.
    """

    def parse_body(self, request: HttpRequest) -> dict[str, Any]:
        try:
            data = json.loads(request.body)
        except ValueError as exc:
            # Ninja answers "Cannot parse request body" (with our words only under DEBUG); the
            # error handler below puts these words in instead.
            if not request.body.strip():
                words = "the request body is empty: send a JSON object, e.g. {}"
            elif request.content_type != "application/json":
                words = "the request body must be a JSON object (Content-Type: application/json)"
            else:
                words = f"the request body is not valid JSON ({exc})"
            request.body_error = words  # type: ignore[attr-defined]
            raise
        if _has_nul(data):
            raise ValueError("strings must not contain NUL characters")
        return cast(dict[str, Any], data)


api = NinjaAPI(
    title="NexCompute API",
    version="1",
    description="Lease idle lab computers and get a Jupyter Lab on them.",
    auth=API_AUTH,
    # Swagger UI from ninja's own static files ("ninja" is in INSTALLED_APPS): no CDN.
    docs_url="/docs",
    urls_namespace="api",
    parser=JsonParser(),
)


_LOCATIONS = {"body", "payload", "query", "path", "header", "cookie", "form"}


def _summarise(errors: list[dict[str, Any]]) -> str:
    """Errors in words, naming each field: "machine_id is required", not "Field required" at
    ``body.payload``."""
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in _LOCATIONS)
        kind = err.get("type", "")
        if kind == "missing":
            parts.append(
                f"{loc} is required" if loc else "a JSON object is required as the request body"
            )
        elif kind == "extra_forbidden":
            parts.append(f"{loc} is not a known field")
        else:
            parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


@api.exception_handler(ValidationError)
def _validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    errors = [
        {k: v for k, v in e.items() if k in ("loc", "msg", "type")}
        for e in exc.errors
        if isinstance(e, dict)
    ]
    return api.create_response(
        request, {"detail": _summarise(errors), "errors": errors}, status=400
    )


@api.exception_handler(ServiceError)
def _service_error(request: HttpRequest, exc: ServiceError) -> HttpResponse:
    return api.create_response(request, {"detail": exc.detail}, status=exc.status_code)


def _unauthorized(request: HttpRequest, detail: str, challenge: str) -> HttpResponse:
    response = api.create_response(request, {"detail": detail}, status=401)
    response["WWW-Authenticate"] = challenge
    return response


@api.exception_handler(AuthenticationError)
def _auth_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return _unauthorized(
        request,
        "authentication required: send 'Authorization: Bearer <API token>' "
        "(python manage.py createapitoken USERNAME) or log in",
        'Bearer realm="api"',
    )


@api.exception_handler(InvalidCredential)
def _bad_credential(request: HttpRequest, exc: InvalidCredential) -> HttpResponse:
    return _unauthorized(
        request,
        exc.detail,
        f'Bearer realm="api", error="invalid_token", error_description="{exc.detail}"',
    )


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    detail = getattr(request, "body_error", None) or str(exc)
    return api.create_response(request, {"detail": detail}, status=exc.status_code)


@api.exception_handler(RequestDataTooBig)
def _too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return api.create_response(request, {"detail": "request body too large"}, status=413)


@api.exception_handler(Exception)
def _unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.exception("unhandled API error on %s %s", request.method, request.path)
    return api.create_response(request, {"detail": "internal error"}, status=500)


api.add_router("/", "machines.api.router")
api.add_router("/", "sessions.api.router")
api.add_router("/", "sessions.capability_api.router")
api.add_router("/", "reports.api.router")
