"""The dashboard's machine cards: what a student reads about each machine and lab.

The server renders the cards (``templates/partials/machines.html``) from :func:`machine_card`;
``static/js/dashboard.js`` re-renders them from pushed updates with the same texts, handed to it
by :func:`page_texts` (``json_script``), so each sentence is written once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from django.utils import timezone

from accounts.models import EffectivePolicy, User
from accounts.services import policy_for
from machines import availability
from machines.heartbeats import live_metrics
from machines.models import Lab, Machine, MachineStatus
from nexcompute import words
from sessions.states import LIVE, STATE_LABELS, STATE_SUMMARIES

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
WARM_TEXT = "ready instantly"
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


def status_text(status: str, *, lab_open: bool, mine: bool) -> tuple[str, str]:
    """The label and the reason a card shows (the script's ``cardText`` mirrors it)."""
    if mine:
        return MINE_TEXT
    if status == MachineStatus.AVAILABLE and not lab_open:
        return CLOSED_TEXT
    return STATUS_TEXT.get(status, (status, ""))


def page_texts() -> dict[str, Any]:
    """Every sentence the page's script shows, for ``json_script``: machine statuses and the
    session card's state labels and summaries."""
    return {
        "status": {
            **{status: list(text) for status, text in STATUS_TEXT.items()},
            "closed": list(CLOSED_TEXT),
            "mine": list(MINE_TEXT),
        },
        "warm": WARM_TEXT,
        "state_labels": {str(state): text for state, text in STATE_LABELS.items()},
        "state_summaries": {str(state): text for state, text in STATE_SUMMARIES.items()},
        "live_states": sorted(str(state) for state in LIVE),
    }


def _gpu_names(specs: dict[str, Any]) -> list[str]:
    gpus = [gpu for gpu in specs.get("gpus") or [] if isinstance(gpu, dict)]
    return [f"{gpu.get('name') or 'GPU'} ({_gb(gpu.get('memory_bytes'))} GB)" for gpu in gpus]


def machine_card(
    machine: Machine,
    *,
    lab_open: bool,
    mine: bool,
    live: tuple[dict[str, Any], dt.datetime] | None = None,
) -> dict[str, Any]:
    """Everything one machine card shows (the template and the script share these names).

    ``live``: the newest figures from Redis (``machines.heartbeats.live_metrics``), fresher
    than the row's (written once a minute), so a page loaded between heartbeats shows the
    latest known load instead of nothing."""
    specs = machine.specs or {}
    metrics = machine.metrics or {}
    last_seen = machine.last_seen
    if live is not None and (last_seen is None or live[1] >= last_seen):
        metrics, last_seen = live
    offline = machine.status == MachineStatus.OFFLINE
    label, reason = status_text(machine.status, lab_open=lab_open, mine=mine)
    memory_bytes = machine.memory_bytes or specs.get("memory_bytes") or 0
    return {
        "id": machine.pk,
        "name": machine.name,
        "lab": machine.lab.name,
        "status": machine.status,
        "label": label,
        "reason": reason,
        "usable": machine.status == MachineStatus.AVAILABLE and lab_open,
        "mine": mine,
        # A machine that never connected has no specs: the card says so once instead of
        # "Unknown CPU / ? GB / None" (``has_specs``); an offline one shows what it last
        # reported and when it was last seen instead of empty load bars.
        "has_specs": bool(specs.get("cpu_model") or specs.get("cpu_count") or memory_bytes),
        "offline": offline,
        "last_seen": last_seen.astimezone(dt.UTC).isoformat() if last_seen else "",
        # Shown until the page's script writes it in the student's zone.
        "last_seen_text": words.clock(last_seen, words.zone(""), date=True) if last_seen else "",
        # A warm sandbox is ready: connecting takes well under a second (docs/sandbox.md).
        "warm": machine.warm_ready,
        "cpu_model": specs.get("cpu_model") or "Unknown CPU",
        "cpu_count": specs.get("cpu_count") or 0,
        "memory_gb": _gb(memory_bytes),
        "memory_bytes": memory_bytes,
        "gpus": _gpu_names(specs),
        "cpu_percent": _pct(metrics.get("cpu_percent")),
        "memory_percent": _pct(metrics.get("memory_percent")),
        "gpu_percent": _pct(metrics.get("gpu_percent")),
    }


def _pct(value: Any) -> int | None:
    if isinstance(value, int | float):
        return max(0, min(100, round(value)))
    return None


def lab_views(
    user: User, *, mine_machine_id: int | None = None, policy: EffectivePolicy | None = None
) -> list[LabView]:
    """The machines ``user`` may use, grouped by lab, with the labs' hours. A fixed number of
    queries whatever the number of machines (pinned in the view tests)."""
    now = timezone.now()
    policy = policy or policy_for(user)
    machines = list(Machine.objects.usable_by(policy).select_related("lab"))
    labs = {lab.pk: lab for lab in availability.labs_prefetched()}
    live = live_metrics(m.pk for m in machines if m.status != MachineStatus.OFFLINE)
    groups: dict[int, LabView] = {}
    for machine in machines:
        group = groups.get(machine.lab_id)
        if group is None:
            is_open, hours, until = _lab_state(labs.get(machine.lab_id), now)
            group = groups[machine.lab_id] = LabView(machine.lab.name, is_open, hours, until)
        group.machines.append(
            machine_card(
                machine,
                lab_open=group.is_open,
                mine=machine.pk == mine_machine_id,
                live=live.get(machine.pk),
            )
        )
    return sorted(groups.values(), key=lambda g: g.name.lower())
