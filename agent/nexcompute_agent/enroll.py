"""Enrollment: exchange a one-time join token for a machine credential over HTTP."""

from __future__ import annotations

import hashlib
import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexcompute_agent import __version__

ENROLL_PATH = "/api/agents/enroll"
ENROLL_TIMEOUT = 15.0


@dataclass(frozen=True)
class Enrollment:
    machine_id: int
    name: str
    credential: str

    def __repr__(self) -> str:  # never show the credential
        return f"Enrollment(machine_id={self.machine_id}, name={self.name!r})"


class EnrollmentRefused(Exception):
    """The server answered 4xx; ``detail`` is its explanation."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class EnrollmentFailed(Exception):
    """The server could not be reached or gave an unusable answer (worth retrying later)."""


def _detail(body: bytes, status: int) -> str:
    try:
        data: Any = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("detail"), str):
        return str(data["detail"])[:500]
    return f"HTTP {status}"


MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def machine_key(paths: tuple[str, ...] = MACHINE_ID_FILES) -> str:
    """This host's identity for re-enrollment: a sha256 of its machine id (systemd asks that
    the id itself never leave the host unhashed), stable across re-imaging when the image
    keeps the id, or set by the technician. "" when the host has none."""
    for path in paths:
        try:
            text = Path(path).read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue
        if text:
            return hashlib.sha256(f"nexcompute-machine-id:{text}".encode()).hexdigest()
    return ""


def enroll(
    server: str, token: str, *, timeout: float = ENROLL_TIMEOUT, key: str | None = None
) -> Enrollment:
    """POST the join token to ``{server}/api/agents/enroll`` and return the credential.
    ``key``: the host's :func:`machine_key` (read from the host when None)."""
    key = machine_key() if key is None else key
    fields = {"token": token, "hostname": socket.gethostname(), "agent_version": __version__}
    if key:
        fields["machine_key"] = key
    try:
        return _post(server, fields, timeout)
    except EnrollmentRefused as exc:
        if "machine_key" not in fields or "machine_key" not in exc.detail:
            raise
        # A server older than this agent does not know the field: enroll as a new machine.
        del fields["machine_key"]
        return _post(server, fields, timeout)


def _post(server: str, fields: dict[str, str], timeout: float) -> Enrollment:
    body = json.dumps(fields).encode()
    request = urllib.request.Request(
        server.rstrip("/") + ENROLL_PATH,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"nexcompute-agent/{__version__}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
            payload = response.read(1024 * 1024)
    except urllib.error.HTTPError as exc:
        detail = _detail(exc.read(1024 * 1024), exc.code)
        if 400 <= exc.code < 500:
            raise EnrollmentRefused(exc.code, detail) from None
        raise EnrollmentFailed(f"server error (HTTP {exc.code}): {detail}") from None
    except urllib.error.URLError as exc:
        raise EnrollmentFailed(f"cannot reach {server}: {exc.reason}") from None
    except (OSError, TimeoutError) as exc:
        raise EnrollmentFailed(f"cannot reach {server}: {exc}") from None
    if status != 201:
        raise EnrollmentFailed(f"unexpected answer from server: HTTP {status}")
    try:
        data = json.loads(payload)
        result = Enrollment(
            machine_id=data["machine_id"], name=data["name"], credential=data["credential"]
        )
    except (ValueError, KeyError, TypeError):
        raise EnrollmentFailed("unexpected answer from server: not the enrollment JSON") from None
    if (
        isinstance(result.machine_id, bool)
        or not isinstance(result.machine_id, int)
        or not isinstance(result.name, str)
        or not isinstance(result.credential, str)
        or not result.credential
    ):
        raise EnrollmentFailed("unexpected answer from server: bad enrollment fields")
    return result
