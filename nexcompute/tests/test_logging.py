"""LOG_FORMAT=json: one JSON object per line, carrying the request, user, session and machine
ids; plain text stays the default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.procs import ROOT

SCRIPT = """
import logging
from django.http import HttpResponse
from django.test import RequestFactory
from accounts.models import User
from nexcompute.logcontext import RequestContextMiddleware, log_context

with log_context(session_id=5, machine_id=7):
    logging.getLogger("sessions.policy").warning("session %s stopping", 5)

request = RequestFactory().get("/api/sessions", HTTP_X_REQUEST_ID="req-abc.1")
request.user = User(pk=42, username="student")

def view(req):
    logging.getLogger("machines.api").info("inside the view")
    return HttpResponse()

response = RequestContextMiddleware(view)(request)
print("ECHO", response["X-Request-ID"])
# django.request's 4xx line is written after the middleware returned, with the request in it.
logging.getLogger("django.request").warning(
    "Not Found: %s", request.path, extra={"request": request}
)
logging.getLogger("celery.app.trace").info("Task %(name)s[%(id)s] succeeded in %(runtime)ss")
"""


def run(log_format: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DEBUG": "1",
        "LOG_FORMAT": log_format,
        "DATABASE_URL": "sqlite:///:memory:",
        **extra,
    }
    return subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_json_log_lines_parse_and_carry_the_ids() -> None:
    proc = run("json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    by_message: dict[str, dict[str, Any]] = {line["message"]: line for line in lines}

    stopping = by_message["session 5 stopping"]
    assert stopping["level"] == "WARNING"
    assert stopping["logger"] == "sessions.policy"
    assert stopping["session_id"] == 5
    assert stopping["machine_id"] == 7
    assert "time" in stopping

    inside = by_message["inside the view"]
    assert inside["request_id"] == "req-abc.1"
    assert inside["user_id"] == 42
    assert "session_id" not in inside  # the context ended with its block

    not_found = by_message["Not Found: /api/sessions"]
    assert not_found["request_id"] == "req-abc.1"
    assert not_found["user_id"] == 42
    assert "ECHO req-abc.1" in proc.stdout
    # Routine Celery lines are DEBUG: not shown at the default INFO.
    assert not any("succeeded in" in line["message"] for line in lines)


def test_routine_celery_lines_show_at_debug() -> None:
    proc = run("json", LOG_LEVEL="DEBUG")
    assert proc.returncode == 0, proc.stderr
    routine = [
        json.loads(line)
        for line in proc.stderr.splitlines()
        if line.startswith("{") and "succeeded in" in line
    ]
    assert [line["level"] for line in routine] == ["DEBUG"]


def test_plain_text_stays_the_default() -> None:
    proc = run("plain")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING sessions.policy: session 5 stopping" in proc.stderr
    assert not proc.stderr.lstrip().startswith("{")


def test_a_request_id_is_made_when_none_or_a_bad_one_is_sent(db: Any) -> None:
    from django.test import Client

    fresh = Client().get("/healthz")
    forged = Client(HTTP_X_REQUEST_ID="x" * 65 + "\n").get("/healthz")

    assert len(fresh["X-Request-ID"]) == 32
    assert forged["X-Request-ID"] != "x" * 65 + "\n"
