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

from accounts.auth import API_AUTH
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
        data = json.loads(request.body)
        if _has_nul(data):
            raise ValueError("strings must not contain NUL characters")
        return cast(dict[str, Any], data)


api = NinjaAPI(
    title="NexCompute API",
    version="1",
    description="Lease idle lab computers and get a Jupyter Lab on them.",
    auth=API_AUTH,
    docs_url=None,  # the Swagger page loads assets from a CDN; the OpenAPI document stays
    urls_namespace="api",
    parser=JsonParser(),
)


def _summarise(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "payload"))
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


@api.exception_handler(AuthenticationError)
def _auth_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return api.create_response(request, {"detail": "authentication required"}, status=401)


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    return api.create_response(request, {"detail": str(exc)}, status=exc.status_code)


@api.exception_handler(RequestDataTooBig)
def _too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return api.create_response(request, {"detail": "request body too large"}, status=413)


@api.exception_handler(Exception)
def _unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.exception("unhandled API error on %s %s", request.method, request.path)
    return api.create_response(request, {"detail": "internal error"}, status=500)


api.add_router("/", "machines.api.router")
api.add_router("/", "sessions.api.router")
api.add_router("/", "reports.api.router")
