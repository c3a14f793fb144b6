"""Request, user, session and machine ids on every log record (JSON logs carry them).

``RequestContextMiddleware`` gives each HTTP request an id (the proxy's ``X-Request-ID`` when it
sends a sane one, else a fresh one; echoed in the response). Code handling one session or one
machine wraps its work in ``log_context(session_id=..., machine_id=...)``; the agent link sets the
machine id for its whole connection. ``ContextFilter`` copies whatever is set onto each record,
where an explicit ``extra={...}`` wins.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.utils.functional import empty

FIELDS = ("request_id", "user_id", "session_id", "machine_id")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "nexcompute_log_context", default=None
)
_request: contextvars.ContextVar[HttpRequest | None] = contextvars.ContextVar(
    "nexcompute_log_request", default=None
)
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def current() -> dict[str, Any]:
    return dict(_context.get() or {})


def bind(**ids: Any) -> None:
    """Add ids to the context of the current task/thread for the rest of its life."""
    _context.set({**(_context.get() or {}), **{k: v for k, v in ids.items() if v is not None}})


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    token = _context.set(
        {**(_context.get() or {}), **{k: v for k, v in ids.items() if v is not None}}
    )
    try:
        yield
    finally:
        _context.reset(token)


def _user_id(request: HttpRequest) -> int | None:
    """The user's id if authentication already ran; never evaluates a lazy user (that would
    query the database from inside a log call)."""
    user = request.__dict__.get("user")
    if user is None:
        return None
    wrapped = getattr(user, "_wrapped", user)
    if wrapped is empty or not getattr(wrapped, "is_authenticated", False):
        return None
    return getattr(wrapped, "pk", None)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ids = current()
        # django.request's own lines (4xx/5xx) are written after the middleware returned; they
        # carry the request themselves.
        request = getattr(record, "request", None) or _request.get()
        if request is not None:
            request_id = getattr(request, "request_id", None)
            if request_id:
                ids.setdefault("request_id", request_id)
            user_id = _user_id(request)
            if user_id is not None:
                ids.setdefault("user_id", user_id)
        for name, value in ids.items():
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


class RoutineToDebug(logging.Filter):
    """Celery's routine lines ("Task ... received", "... succeeded in", "Scheduler: Sending
    due task") are demoted to DEBUG and shown only when the root logger is at DEBUG: at INFO
    they buried what a person needs (2,800 of 3,600 lines in seven minutes of `make run`).
    Failures (ERROR) and start-up lines ("beat: Starting...") keep their level."""

    ROUTINE = ("received", "succeeded in", "Sending due task")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not any(m in str(record.msg) for m in self.ROUTINE):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class RequestContextMiddleware:
    """Sync and async safe: Django runs it in the request's own context either way."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        given = request.headers.get("X-Request-ID", "")
        request_id = given if _SANE_ID.match(given) else uuid.uuid4().hex
        request.request_id = request_id  # type: ignore[attr-defined]
        token = _request.set(request)
        try:
            response = self.get_response(request)
        finally:
            _request.reset(token)
        response["X-Request-ID"] = request_id
        return response
