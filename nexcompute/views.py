"""The student's pages: the live dashboard, its machines fragment (resync) and the history.

Pages are rendered here from the same helpers the JSON API uses; ``static/js/dashboard.js``
keeps them live from ``/ws/dashboard/`` and calls the JSON API for every action.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth.decorators import login_required
from django.db import connection
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.csrf import ensure_csrf_cookie

from accounts.services import policy_for
from machines import availability
from machines.models import Lab, Machine, MachineStatus
from sessions.api import session_out
from sessions.models import ComputeSession, SessionEvent
from sessions.states import END_REASON_SENTENCES, LIVE, TERMINAL, EndReason

# What a student reads for each machine status: a short label and, when the machine cannot
# be used, the reason in plain words. The page's script reads the same table (json_script).
STATUS_TEXT: dict[str, tuple[str, str]] = {
    MachineStatus.AVAILABLE: ("Available", ""),
    MachineStatus.OFFLINE: ("Offline", "The computer is off or its agent is not running."),
    MachineStatus.RESERVED: ("Reserved", "Someone is connecting to it right now."),
    MachineStatus.BUSY: ("In use", "Another session is running on it."),
    MachineStatus.CLEANING: (
        "Wiping",
        "Being wiped after a session; it is free again in a moment.",
    ),
    MachineStatus.DRAINING: ("Draining", "Staff are taking it out of service."),
    MachineStatus.MAINTENANCE: (
        "Maintenance",
        "Staff have taken it out of service for maintenance.",
    ),
    MachineStatus.OWNER_PRESENT: (
        "Someone at the keyboard",
        "Someone is using the computer in the lab.",
    ),
    MachineStatus.QUARANTINED: (
        "Quarantined",
        "A wipe could not be verified; staff will check it.",
    ),
}
CLOSED_TEXT = ("Lab closed", "Outside the lab's hours.")
MINE_TEXT = ("Your session", "Your session runs on this machine.")

# A lab open this far ahead counts as "always open" (open_until looks about a week ahead).
_ALWAYS_OPEN = dt.timedelta(days=6)
GIB = 1024**3


def _gb(n: int | None) -> str:
    if not n:
        return "?"
    value = n / GIB
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}".rstrip("0").rstrip(".")


@dataclass
class LabView:
    name: str
    is_open: bool
    hours: str
    open_until: str  # ISO, UTC; empty when closed or always open
    machines: list[dict[str, Any]] = field(default_factory=list)


def _lab_state(lab: Lab | None, now: dt.datetime) -> tuple[bool, str, str]:
    """(open now, hours in words, ISO closing time) for ``lab``."""
    if lab is None:
        return True, "", ""
    until = availability.open_until(lab, now)
    if until is None:
        return False, "Closed now (outside the lab's hours)", ""
    if until - now > _ALWAYS_OPEN:
        return True, "Open", ""
    local = until.astimezone(lab.tz)
    return True, f"Open until {local:%H:%M} ({lab.timezone})", until.astimezone(dt.UTC).isoformat()


def machine_card(machine: Machine, *, lab_open: bool, mine: bool) -> dict[str, Any]:
    """Everything one machine card shows (the template and the script share these names)."""
    specs = machine.specs or {}
    metrics = machine.metrics or {}
    gpus = [g for g in specs.get("gpus") or [] if isinstance(g, dict)]
    if mine:
        label, reason = MINE_TEXT
    elif machine.status == MachineStatus.AVAILABLE and not lab_open:
        label, reason = CLOSED_TEXT
    else:
        label, reason = STATUS_TEXT.get(machine.status, (machine.status, ""))
    return {
        "id": machine.pk,
        "name": machine.name,
        "lab": machine.lab.name,
        "status": machine.status,
        "label": label,
        "reason": reason,
        "usable": machine.status == MachineStatus.AVAILABLE and lab_open,
        "mine": mine,
        "cpu_model": specs.get("cpu_model") or "Unknown CPU",
        "cpu_count": specs.get("cpu_count") or 0,
        "memory_gb": _gb(machine.memory_bytes or specs.get("memory_bytes")),
        "memory_bytes": machine.memory_bytes or specs.get("memory_bytes") or 0,
        "gpus": [f"{g.get('name') or 'GPU'} ({_gb(g.get('memory_bytes'))} GB)" for g in gpus],
        "cpu_percent": _pct(metrics.get("cpu_percent")),
        "memory_percent": _pct(metrics.get("memory_percent")),
        "gpu_percent": _pct(metrics.get("gpu_percent")),
    }


def _pct(value: Any) -> int | None:
    if isinstance(value, int | float):
        return max(0, min(100, round(value)))
    return None


def _live_session(user: Any) -> ComputeSession | None:
    return (
        ComputeSession.objects.filter(owner_id=user.pk, state__in=LIVE)
        .select_related("machine")
        .first()
    )


def lab_views(user: Any, *, mine_machine_id: int | None = None) -> list[LabView]:
    """The machines ``user`` may use, grouped by lab, with the labs' hours. A fixed number of
    queries whatever the number of machines (pinned in the view tests)."""
    now = timezone.now()
    machines = Machine.objects.usable_by(policy_for(user)).select_related("lab")
    labs = {lab.pk: lab for lab in availability.labs_prefetched()}
    groups: dict[int, LabView] = {}
    for machine in machines:
        group = groups.get(machine.lab_id)
        if group is None:
            is_open, hours, until = _lab_state(labs.get(machine.lab_id), now)
            group = groups[machine.lab_id] = LabView(machine.lab.name, is_open, hours, until)
        group.machines.append(
            machine_card(machine, lab_open=group.is_open, mine=machine.pk == mine_machine_id)
        )
    return sorted(groups.values(), key=lambda g: g.name.lower())


@login_required
@ensure_csrf_cookie
def dashboard(request: HttpRequest) -> HttpResponse:
    session = _live_session(request.user)
    labs = lab_views(request.user, mine_machine_id=session.machine_id if session else None)
    return render(
        request,
        "dashboard.html",
        {
            "labs": labs,
            "lab_names": [lab.name for lab in labs],
            "machine_count": sum(len(lab.machines) for lab in labs),
            "session": session,
            "session_json": session_out(session, viewer_id=request.user.pk) if session else None,
            "status_text": {
                **{k: list(v) for k, v in STATUS_TEXT.items()},
                "closed": list(CLOSED_TEXT),
                "mine": list(MINE_TEXT),
            },
        },
    )


@login_required
def dashboard_machines(request: HttpRequest) -> HttpResponse:
    """The machines part of the dashboard alone: the script swaps it in to resync."""
    session = _live_session(request.user)
    labs = lab_views(request.user, mine_machine_id=session.machine_id if session else None)
    return render(request, "partials/machines.html", {"labs": labs})


@login_required
def history(request: HttpRequest) -> HttpResponse:
    """The user's past sessions: end reason in plain words, timeline and wipe receipt."""
    sessions = list(
        ComputeSession.objects.filter(owner_id=request.user.pk, state__in=TERMINAL)
        .select_related("machine", "machine__lab")
        .prefetch_related(Prefetch("events", queryset=SessionEvent.objects.order_by("at", "pk")))[
            :50
        ]
    )
    for s in sessions:
        s.end_reason_text = (  # type: ignore[attr-defined]
            END_REASON_SENTENCES[EndReason(s.end_reason)] if s.end_reason else "Session ended."
        )
        s.duration_text = _duration(s)  # type: ignore[attr-defined]
    live = _live_session(request.user)
    return render(request, "history.html", {"sessions": sessions, "live": live})


def _duration(session: ComputeSession) -> str:
    if session.started_at is None or session.ended_at is None:
        return "did not start"
    minutes = max(0, round((session.ended_at - session.started_at).total_seconds() / 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def healthz(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"ok": True})
