"""What a session's state means for its machine: the one home of the machine's status.

:data:`OCCUPANCY` maps each session state to the machine status it implies and the statuses
the machine may be moved from. :func:`transition` changes a session's state and applies the
table in the same transaction, so no caller sets a machine's status by hand. When the agent
says hello, :func:`machine_status_for` gives the status from the same table and
:func:`reconcile` lists what the agent still has to do.

This module is why ``machines`` never imports ``sessions``: the machines app knows statuses,
this module knows what sessions hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from accounts.models import User
from machines.models import Machine, MachineStatus
from machines.services import idle_status, machine_set_status
from nexcompute import agent_events, realtime
from nexcompute.agent_events import SessionCommand, StopReason
from sessions import notify
from sessions.models import ComputeSession, SessionEvent
from sessions.states import (
    END_REASON_SENTENCES,
    STATE_SENTENCES,
    TERMINAL,
    EndReason,
    SessionState,
    is_allowed,
)

log = logging.getLogger(__name__)

# The status an occupying session holds its machine in; ``settled`` is what a machine shows
# once its session is over: ``cleaning`` while a wipe is owed, else its idle status.
SETTLED = None


@dataclass(frozen=True)
class Occupancy:
    status: MachineStatus | None
    """The machine's status while the session is in this state (None: settled)."""
    after: frozenset[MachineStatus]
    """The statuses the machine may move from. Anything else (offline, quarantined, already
    there) is left alone: the conditional UPDATE decides."""


OCCUPANCY: dict[SessionState, Occupancy] = {
    # Allocation claims the machine (available -> reserved) with its own conditional UPDATE.
    SessionState.REQUESTED: Occupancy(MachineStatus.RESERVED, frozenset({MachineStatus.AVAILABLE})),
    SessionState.STARTING: Occupancy(MachineStatus.RESERVED, frozenset({MachineStatus.RESERVED})),
    SessionState.RUNNING: Occupancy(MachineStatus.BUSY, frozenset({MachineStatus.RESERVED})),
    SessionState.STOPPING: Occupancy(
        MachineStatus.CLEANING,
        frozenset({MachineStatus.RESERVED, MachineStatus.BUSY, MachineStatus.OWNER_PRESENT}),
    ),
    # The agent still wipes whatever a failed start left; the receipt releases the machine.
    SessionState.FAILED: Occupancy(
        MachineStatus.CLEANING, frozenset({MachineStatus.RESERVED, MachineStatus.BUSY})
    ),
    SessionState.ENDED: Occupancy(
        SETTLED,
        frozenset({MachineStatus.RESERVED, MachineStatus.BUSY, MachineStatus.CLEANING}),
    ),
}

# Audit-row kinds of the statuses a session puts its machine in (admin filters on them).
_KIND = {s: str(s) for s in (MachineStatus.RESERVED, MachineStatus.BUSY, MachineStatus.CLEANING)}


def settled_status(machine: Machine) -> MachineStatus:
    """What a machine without a live session shows: ``cleaning`` while an ended session may
    have left something (offered again only after a wipe), else its idle status."""
    if ComputeSession.objects.unwiped(machine.pk).exists():
        return MachineStatus.CLEANING
    return idle_status(machine)


def machine_status_for(machine: Machine) -> MachineStatus:
    """The status an online machine should show, given its live session if any."""
    if not ComputeSession.objects.uncleaned(machine.pk).exists():  # the common case
        return idle_status(machine)
    live = ComputeSession.objects.filter(machine=machine).live().values_list("state", flat=True)
    state = live.first()
    if state is None:
        return settled_status(machine)
    status = OCCUPANCY[SessionState(state)].status
    return settled_status(machine) if status is None else status


def occupy(session: ComputeSession, *, message: str = "", actor: User | None = None) -> bool:
    """Bring the session's machine to the status the session's state implies (the table).
    Returns False if the machine was elsewhere (or already there) and kept its status."""
    rule = OCCUPANCY[SessionState(session.state)]
    machine = session.machine
    machine.refresh_from_db()
    status = settled_status(machine) if rule.status is None else rule.status
    return _move(
        machine, status, rule.after, message or f"session {session.pk} {session.state}", actor
    )


def settle(machine: Machine, *, message: str) -> bool:
    """Offer a machine whose session is over again (or keep it cleaning while a wipe is
    owed), from any status its session may have left it in."""
    machine.refresh_from_db()
    rule = OCCUPANCY[SessionState.ENDED]
    return _move(machine, settled_status(machine), rule.after, message, None)


def _move(
    machine: Machine,
    status: MachineStatus,
    after: frozenset[MachineStatus],
    message: str,
    actor: User | None,
) -> bool:
    if machine.status == status or machine.status not in after:
        return False
    return machine_set_status(
        machine=machine,
        status=status,
        kind=_KIND.get(status, "status"),
        message=message,
        actor=actor,
        expect=after,
    )


def transition(
    session: ComputeSession,
    to: SessionState,
    *,
    reason: str = "",
    message: str = "",
    actor: User | None = None,
    machine_message: str = "",
    **fields: Any,
) -> bool:
    """Move ``session`` from its current (in-memory) state to ``to``, and its machine to the
    status :data:`OCCUPANCY` gives for ``to``.

    Returns False if another process changed the state first (the row no longer has the state
    we read), so exactly one of several concurrent callers wins. Raises ValueError for a
    transition the table does not allow.
    """
    old = session.state
    if not is_allowed(old, to):
        raise ValueError(f"transition {old} -> {to} is not allowed")
    if to in TERMINAL:
        fields.setdefault("capability_hash", "")  # the session's capability dies with it
    with transaction.atomic():
        won = ComputeSession.objects.filter(pk=session.pk, state=old).update(state=to, **fields)
        if won != 1:
            return False
        session.state = to
        for name, value in fields.items():
            setattr(session, name, value)
        SessionEvent.objects.create(
            session=session,
            kind=SessionEvent.Kind.STATE,
            from_state=old,
            to_state=to,
            reason=reason,
            message=message or _state_message(old, to, reason),
            actor=actor,
        )
        occupy(session, message=machine_message, actor=actor)
        realtime.session_updated_on_commit(session.owner_id, session.pk)
        # The owner's opt-in mail, keyed: the conditional UPDATE above already makes this the
        # only winner, and the key stops a redelivered task.
        if to == SessionState.RUNNING:
            notify.mail_on_commit(session, kind=notify.READY, key="ready")
        elif to in TERMINAL:
            notify.mail_on_commit(session, kind=notify.ENDED, key="ended")
    # One line per state change; JSON logs carry the ids as fields (LOG_FORMAT=json).
    log.info(
        "session %s: %s -> %s%s",
        session.pk,
        old,
        to,
        f" ({reason})" if reason else "",
        extra={"session_id": session.pk, "machine_id": session.machine_id},
    )
    return True


def _state_message(old: str, to: SessionState, reason: str) -> str:
    # The change to ``stopping`` said why; the end that follows does not say it again.
    if reason in EndReason.values and not (old == SessionState.STOPPING and to in TERMINAL):
        return END_REASON_SENTENCES[EndReason(reason)]
    return STATE_SENTENCES[to]


# --- the agent is back: what it still owes --------------------------------------------------


def session_agent_lost(*, session: ComputeSession) -> bool:
    """End a session whose agent no longer knows it (crash, reboot, offline past the grace).

    No receipt yet: the wipe is owed (``unwiped``) and demanded when the agent returns.
    """
    return transition(
        session,
        SessionState.ENDED,
        reason=EndReason.AGENT_LOST,
        end_reason=EndReason.AGENT_LOST,
        ended_at=timezone.now(),
        jupyter_url="",
        jupyter_token="",
        machine_message=f"session {session.pk} lost; wipe demanded",
    )


def reconcile(
    *, machine_id: int, agent_sessions: list[int], ended: list[int] | None = None
) -> list[SessionCommand]:
    """After ``hello``: compare the agent's live sessions with the database.

    ``agent_sessions``: the sessions the agent runs (a restarted agent took them back: they
    carry on). ``ended``: sessions a restarted agent could not take back and wiped; its
    ``session.failed`` and receipt follow, and end them with the right reason, so nothing is
    done to them here.

    Returns the commands to send: start for sessions still waiting, stop (wipe) for sessions
    the server ended or never knew, and for ended sessions that were never wiped. Sessions the
    database thinks started but the agent does not know at all end as ``agent_lost``.
    """
    commands: list[SessionCommand] = []
    known = set(agent_sessions)
    reported = known | set(ended or ())
    on_machine = ComputeSession.objects.filter(machine_id=machine_id)
    # Fast path for the common reconnect: nothing live, nothing owed (one indexed query).
    if not reported and not ComputeSession.objects.uncleaned(machine_id).exists():
        return commands
    for session in on_machine.live().select_related("machine", "owner"):
        if session.pk in reported - known:
            continue  # its failure and receipt are on their way
        if session.state in (SessionState.REQUESTED, SessionState.STARTING):
            # Not started, or started but its `ready` was lost: (re)send; the agent answers a
            # duplicate start with `ready`.
            commands.append(agent_events.session_start(session.pk))
        elif session.state == SessionState.STOPPING:
            commands.append(agent_events.session_stop(session.pk, session.end_reason))
        elif session.pk not in known:
            session_agent_lost(session=session)
            commands.append(agent_events.session_stop(session.pk, StopReason.AGENT_LOST))
    live_ids = set(on_machine.live().values_list("pk", flat=True))
    for session_id in sorted(known - live_ids):
        commands.append(agent_events.session_stop(session_id, StopReason.ENDED))
    owed = on_machine.unwiped().exclude(pk__in=reported).values_list("pk", flat=True)[:50]
    for session_id in owed:
        commands.append(agent_events.session_stop(session_id, StopReason.WIPE))
    if not commands and not live_ids:
        _release_if_clean(machine_id)
    return commands


def _release_if_clean(machine_id: int) -> None:
    """A machine left ``cleaning`` with nothing owed is offered again."""
    machine = Machine.objects.get(pk=machine_id)
    if machine.status == MachineStatus.CLEANING:
        machine_set_status(
            machine=machine, status=idle_status(machine), message="nothing left to wipe"
        )


__all__ = [
    "OCCUPANCY",
    "machine_status_for",
    "occupy",
    "reconcile",
    "session_agent_lost",
    "settle",
    "transition",
]
