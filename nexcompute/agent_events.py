"""The server-internal hop to an agent's connection: channel-layer events, one builder each.

Services never talk to an agent's socket directly: the socket lives in whichever server
process the agent dialled. They send one of these events to the machine's group
(``realtime.machine_group``) after commit, and the agent link (``sessions.agent_link``) turns
it into a protocol message, one handler per event type (``agent.session_start`` is handled by
``agent_session_start``). Events carry ids only; details such as the Jupyter token are read
from the database when the message is sent, so a start cancelled meanwhile is not sent.

None of this must be relied on alone (PITFALLS: group messages can be dropped): the database
is the truth, and the agent resyncs it on ``hello``.
"""

from __future__ import annotations

import enum
from typing import Literal, TypedDict

from nexcompute import realtime


class StopReason(enum.StrEnum):
    """Why an agent is told to stop (and wipe) a session: every end reason, plus two of its
    own for sessions the server no longer holds live."""

    USER = "user"
    EXPIRED = "expired"
    IDLE = "idle"
    OWNER_RETURNED = "owner_returned"
    ADMIN = "admin"
    AGENT_LOST = "agent_lost"
    START_FAILED = "start_failed"
    CRASHED = "crashed"
    WINDOW_CLOSED = "window_closed"
    ENDED = "ended"
    """The agent runs a session the server has already ended (or never knew)."""
    WIPE = "wipe"
    """An ended session that has no wipe receipt yet."""


class SessionStartEvent(TypedDict):
    type: Literal["agent.session_start"]
    session_id: int


class SessionStopEvent(TypedDict):
    type: Literal["agent.session_stop"]
    session_id: int
    reason: StopReason


class DisconnectEvent(TypedDict):
    """A newer connection of the same machine took over: any other one closes."""

    type: Literal["agent.disconnect"]
    by: str


class RevokeEvent(TypedDict):
    """The machine's credential was revoked: close its connection (the agent then stops)."""

    type: Literal["agent.revoke"]


class PingEvent(TypedDict):
    """Ping the agent; its ``reply`` goes to ``reply_channel``."""

    type: Literal["agent.ping"]
    reply_channel: str


class WarmCheckEvent(TypedDict):
    """Something that decides the machine's warm pool changed (its lab's switch, hours):
    the connection sends the agent a fresh ``warm.set`` if it differs."""

    type: Literal["agent.warm_check"]


SessionCommand = SessionStartEvent | SessionStopEvent


def session_start(session_id: int) -> SessionStartEvent:
    return {"type": "agent.session_start", "session_id": session_id}


def session_stop(session_id: int, reason: StopReason | str) -> SessionStopEvent:
    return {"type": "agent.session_stop", "session_id": session_id, "reason": StopReason(reason)}


def disconnect(by: str) -> DisconnectEvent:
    return {"type": "agent.disconnect", "by": by}


def revoke() -> RevokeEvent:
    return {"type": "agent.revoke"}


def ping(reply_channel: str) -> PingEvent:
    return {"type": "agent.ping", "reply_channel": reply_channel}


def warm_check() -> WarmCheckEvent:
    return {"type": "agent.warm_check"}


def send_on_commit(
    machine_id: int, event: SessionStartEvent | SessionStopEvent | RevokeEvent | WarmCheckEvent
) -> None:
    """Send ``event`` to the machine's connection once the current transaction commits."""
    realtime.send_on_commit(realtime.machine_group(machine_id), dict(event))
