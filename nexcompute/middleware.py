from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from django.http import HttpRequest, HttpResponse, JsonResponse


class ApiJsonErrorsMiddleware:
    """Under ``/api/`` every error is JSON ``{"detail": ...}``, never an HTML page.

    Ninja already answers JSON for its own errors; this catches what happens outside it
    (unknown URLs, CSRF failures, oversized bodies rejected by Django, method not allowed).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if not request.path.startswith("/api/") or response.status_code < 400:
            return response
        if response.get("Content-Type", "").startswith("application/json"):
            return response
        try:
            phrase = HTTPStatus(response.status_code).phrase.lower()
        except ValueError:
            phrase = "error"
        detail = {404: "not found", 403: "forbidden (CSRF token missing or incorrect?)"}.get(
            response.status_code, phrase
        )
        out = JsonResponse({"detail": detail}, status=response.status_code)
        for header in ("Allow", "WWW-Authenticate"):
            if header in response:
                out[header] = response[header]
        return out
