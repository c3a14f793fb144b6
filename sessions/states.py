"""The one home of session states, end reasons and the allowed transitions.

Every state change goes through :func:`sessions.occupancy.transition`, which consults
:data:`ALLOWED`, claims the change with a conditional UPDATE and moves the machine's status
along (``sessions.occupancy.OCCUPANCY``).
"""

from __future__ import annotations

from django.db import models


class SessionState(models.TextChoices):
    REQUESTED = "requested"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    ENDED = "ended"
    FAILED = "failed"


class EndReason(models.TextChoices):
    USER = "user"
    EXPIRED = "expired"
    IDLE = "idle"
    OWNER_RETURNED = "owner_returned"
    ADMIN = "admin"
    AGENT_LOST = "agent_lost"
    START_FAILED = "start_failed"
    CRASHED = "crashed"
    WINDOW_CLOSED = "window_closed"


ALLOWED: dict[SessionState, frozenset[SessionState]] = {
    # requested -> ended: cancelled before the agent was told anything (nothing to wipe).
    # -> ended from starting/running/stopping: the agent was lost; the wipe is demanded again
    # when it returns.
    SessionState.REQUESTED: frozenset(
        {SessionState.STARTING, SessionState.STOPPING, SessionState.ENDED, SessionState.FAILED}
    ),
    SessionState.STARTING: frozenset(
        {SessionState.RUNNING, SessionState.STOPPING, SessionState.ENDED, SessionState.FAILED}
    ),
    SessionState.RUNNING: frozenset({SessionState.STOPPING, SessionState.ENDED}),
    SessionState.STOPPING: frozenset({SessionState.ENDED}),
    SessionState.ENDED: frozenset(),
    SessionState.FAILED: frozenset(),
}

TERMINAL: frozenset[SessionState] = frozenset({SessionState.ENDED, SessionState.FAILED})
LIVE: frozenset[SessionState] = frozenset(set(SessionState) - TERMINAL)
# States in which the session occupies its machine's Jupyter (counted against quotas too).
ACTIVE: frozenset[SessionState] = frozenset(
    {SessionState.REQUESTED, SessionState.STARTING, SessionState.RUNNING}
)

# What the session timeline says when a session enters each state for no particular reason
# (a change with an end reason says that reason's sentence instead).
STATE_SENTENCES: dict[SessionState, str] = {
    SessionState.REQUESTED: "Session requested.",
    SessionState.STARTING: "The machine is starting Jupyter Lab.",
    SessionState.RUNNING: "Jupyter Lab is ready.",
    SessionState.STOPPING: "Stopping the session and wiping the machine.",
    SessionState.ENDED: "Session ended.",
    SessionState.FAILED: "The session could not be started.",
}

# The start steps the agent reports (``protocol.ProgressStep``), as the student reads them: one
# line per step, whatever the agent's own message says (it may name paths, ports, tunnels).
# ``ready`` has none: the change to ``running`` says "Jupyter Lab is ready." once.
PROGRESS_SENTENCES: dict[str, str] = {
    "allocated": "The lab computer took your session.",
    "workspace_ready": "Your workspace is ready.",
    "jupyter_starting": "Starting Jupyter Lab.",
    "tunnel_opening": "Connecting Jupyter Lab to the web.",
}

# The session card on the dashboard: a short label and where the session stands
# (``dashboard.cards.page_texts`` hands both to the page's script).
STATE_LABELS: dict[SessionState, str] = {
    SessionState.REQUESTED: "Requested",
    SessionState.STARTING: "Starting",
    SessionState.RUNNING: "Running",
    SessionState.STOPPING: "Stopping",
    SessionState.ENDED: "Ended",
    SessionState.FAILED: "Failed",
}
STATE_SUMMARIES: dict[SessionState, str] = {
    SessionState.REQUESTED: "Waiting for the machine to start your session.",
    SessionState.STARTING: "The machine is starting Jupyter Lab.",
    SessionState.RUNNING: "Jupyter Lab is running.",
    SessionState.STOPPING: "Stopping the session and wiping the machine.",
    SessionState.ENDED: "Session ended.",
    SessionState.FAILED: "The session could not be started.",
}

END_REASON_SENTENCES: dict[EndReason, str] = {
    EndReason.USER: "You ended the session.",
    EndReason.EXPIRED: "The session reached the end of its lease.",
    EndReason.IDLE: "The session was idle for too long.",
    EndReason.OWNER_RETURNED: "Someone started using the computer in the lab.",
    EndReason.ADMIN: "Staff ended the session.",
    EndReason.AGENT_LOST: "The lab computer went offline.",
    EndReason.START_FAILED: "Jupyter Lab could not be started on the machine.",
    EndReason.CRASHED: "Jupyter Lab stopped unexpectedly on the machine.",
    EndReason.WINDOW_CLOSED: "The lab closed for the day.",
}


def is_allowed(old: str, new: str) -> bool:
    try:
        return SessionState(new) in ALLOWED[SessionState(old)]
    except ValueError:
        return False
