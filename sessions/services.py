"""State changes of compute sessions. Views, consumers, admin actions and tasks call these.

Every transition is claimed with a conditional UPDATE (``WHERE state = old``) so that two
processes racing on one session cannot both act: the loser sees a row count of 0.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import secrets
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import EffectivePolicy, User
from accounts.services import policy_for
from machines import availability
from machines.models import Lab, Machine, MachineStatus
from machines.services import idle_status, machine_release, machine_set_status
from nexcompute import realtime
from nexcompute.errors import BadRequest, Conflict, NotFound, PolicyDenied
from sessions.models import ComputeSession, SessionEvent
from sessions.states import (
    END_REASON_SENTENCES,
    LIVE,
    TERMINAL,
    EndReason,
    SessionState,
    is_allowed,
)

log = logging.getLogger(__name__)
S = SessionState
M = MachineStatus

# How many candidate machines one request tries to claim before answering 409.
_CLAIM_ATTEMPTS = 25


def transition(
    session: ComputeSession,
    to: SessionState,
    *,
    reason: str = "",
    message: str = "",
    actor: User | None = None,
    **fields: Any,
) -> bool:
    """Move ``session`` from its current (in-memory) state to ``to``.

    Returns False if another process changed the state first (the row no longer has the state
    we read), so exactly one of several concurrent callers wins. Raises ValueError for a
    transition the table does not allow.
    """
    old = session.state
    if not is_allowed(old, to):
        raise ValueError(f"transition {old} -> {to} is not allowed")
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
            message=message or _state_message(to, reason),
            actor=actor,
        )
        realtime.session_updated_on_commit(session.owner_id, session.pk)
    return True


def _state_message(to: SessionState, reason: str) -> str:
    if reason in EndReason.values:
        return END_REASON_SENTENCES[EndReason(reason)]
    return {
        S.REQUESTED: "Session requested.",
        S.STARTING: "The machine is starting Jupyter Lab.",
        S.RUNNING: "Jupyter Lab is ready.",
        S.STOPPING: "Stopping the session and wiping the machine.",
        S.ENDED: "Session ended.",
        S.FAILED: "The session could not be started.",
    }[to]


def session_event(session: ComputeSession, kind: str, message: str) -> SessionEvent:
    event = SessionEvent.objects.create(session=session, kind=kind, message=message[:500])
    realtime.session_updated_on_commit(session.owner_id, session.pk)
    return event


# --- quota -------------------------------------------------------------------------------------


def week_start(at: dt.datetime) -> dt.datetime:
    """Monday 00:00 UTC of the week holding ``at``: the weekly quota's period."""
    day = at.astimezone(dt.UTC).date()
    monday = day - dt.timedelta(days=day.weekday())
    return dt.datetime.combine(monday, dt.time(0), dt.UTC)


def hours_used_this_week(user: User, now: dt.datetime) -> float:
    """Hours of machine time ``user`` held this week, counted from the event rows: the time
    between each session entering ``running`` and leaving it (to ``now`` while still running),
    clipped to the week."""
    start = week_start(now)
    rows = (
        SessionEvent.objects.filter(kind=SessionEvent.Kind.STATE, session__owner=user)
        .filter(Q(to_state=S.RUNNING) | Q(from_state=S.RUNNING))
        # A session that ended before the week began cannot have run in it.
        .filter(Q(session__ended_at__isnull=True) | Q(session__ended_at__gt=start))
        .order_by("session_id", "at", "pk")
        .values_list("session_id", "to_state", "at")
    )
    total = 0.0
    began: dict[int, dt.datetime] = {}

    def add(begin: dt.datetime, end: dt.datetime) -> float:
        begin = max(begin, start)
        return max(0.0, (min(end, now) - begin).total_seconds() / 3600)

    for session_id, to_state, at in rows:
        if to_state == S.RUNNING:
            began[session_id] = at
        elif session_id in began:
            total += add(began.pop(session_id), at)
    for begin in began.values():
        total += add(begin, now)
    return total


def _check_quota(user: User, policy: EffectivePolicy, minutes: int, now: dt.datetime) -> None:
    if minutes > policy.max_session_minutes:
        raise PolicyDenied(
            f"session length {minutes} min exceeds your limit of {policy.max_session_minutes} min"
        )
    live = ComputeSession.objects.filter(owner=user, state__in=LIVE).count()
    if live >= policy.max_concurrent_sessions:
        raise PolicyDenied(
            f"quota reached: {live} of {policy.max_concurrent_sessions} concurrent sessions in use"
        )
    used = hours_used_this_week(user, now)
    if used + minutes / 60 > policy.max_hours_per_week + 1e-9:
        raise PolicyDenied(
            f"weekly quota: {used:.1f} h of {policy.max_hours_per_week} h used this week; "
            f"{minutes} min more would exceed it"
        )


# --- allocation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requirements:
    gpu: bool = False
    min_memory_gb: float = 0.0
    lab: str | None = None


def _closes_utc(lab: Lab, now: dt.datetime) -> dt.datetime | None:
    """When ``lab``'s current opening ends, in UTC (None: closed now).

    ``open_until`` answers in the lab's zone; leases, API answers and messages are all UTC.
    """
    until = availability.open_until(lab, now)
    return None if until is None else until.astimezone(dt.UTC)


def _candidates(
    *, policy: EffectivePolicy, req: Requirements, machine_id: int | None, now: dt.datetime
) -> tuple[list[Machine], dict[int, dt.datetime]]:
    """Fitting machines in random order (best fit first) and each open lab's closing time."""
    open_labs: dict[int, dt.datetime] = {}
    for lab in availability.labs_prefetched():
        until = _closes_utc(lab, now)
        if until is not None:
            open_labs[lab.pk] = until
    qs = Machine.objects.select_related("lab")
    if machine_id is not None:
        machine = qs.filter(pk=machine_id).first()
        if machine is None:
            raise NotFound("no such machine")
        if not policy.allows_lab(machine.lab):
            raise PolicyDenied(f"your quota policy does not allow lab {machine.lab.name}")
        if machine.gpu_count and not policy.allow_gpu:
            raise PolicyDenied("your quota policy does not allow GPU machines")
        if machine.lab_id not in open_labs:
            raise PolicyDenied(f"lab {machine.lab.name} is closed now (outside its hours)")
        if machine.status != M.AVAILABLE or not machine.enabled or machine.draining:
            raise Conflict(f"machine {machine.name} is not free ({machine.status})")
        return [machine], open_labs
    if req.gpu and not policy.allow_gpu:
        raise PolicyDenied("your quota policy does not allow GPU machines")
    qs = qs.filter(status=M.AVAILABLE, enabled=True, draining=False, lab_id__in=open_labs)
    if policy.lab_ids is not None:
        qs = qs.filter(lab_id__in=policy.lab_ids)
    if req.lab:
        qs = qs.filter(lab__name=req.lab)
    if req.gpu:
        qs = qs.filter(gpu_count__gt=0)
    elif not policy.allow_gpu:
        qs = qs.filter(gpu_count=0)
    if req.min_memory_gb:
        qs = qs.filter(memory_bytes__gte=int(req.min_memory_gb * 1024**3))
    machines = list(qs[:500])
    # Random order spreads concurrent requests over the free machines instead of all racing
    # for the first one; GPU machines go last unless asked for, to keep them for those who do.
    random.shuffle(machines)
    machines.sort(key=lambda m: not req.gpu and m.gpu_count > 0)
    return machines[:_CLAIM_ATTEMPTS], open_labs


def _claim(machine: Machine) -> bool:
    """Reserve ``machine`` if, and only if, it is still free: the race guard of allocation."""
    won = Machine.objects.filter(
        pk=machine.pk, status=M.AVAILABLE, enabled=True, draining=False
    ).update(status=M.RESERVED)
    # ``machine.status`` keeps the status we read (available): the caller's machine_set_status
    # records the change from it, so the audit row says available -> reserved.
    return won == 1


def session_request(
    *,
    user: User,
    machine_id: int | None = None,
    requirements: Requirements | None = None,
    duration_minutes: int | None = None,
    now: dt.datetime | None = None,
) -> ComputeSession:
    """Allocate a fitting machine to ``user`` and create the session in ``requested``.

    Raises PolicyDenied (quota, lab hours), NotFound (unknown machine) or Conflict (nothing
    free fits). Safe under concurrency: the machine is claimed by a conditional UPDATE and the
    database refuses a machine in two live sessions.
    """
    now = now or timezone.now()
    req = requirements or Requirements()
    policy = policy_for(user)
    from django.conf import settings

    minutes = duration_minutes or min(
        settings.NEXCOMPUTE_DEFAULT_SESSION_MINUTES, policy.max_session_minutes
    )
    if minutes <= 0:
        raise BadRequest("duration_minutes must be positive")
    with transaction.atomic():
        # Serialise one user's requests, so two at once cannot both pass the quota check.
        User.objects.select_for_update().filter(pk=user.pk).first()
        _check_quota(user, policy, minutes, now)
        candidates, open_labs = _candidates(policy=policy, req=req, machine_id=machine_id, now=now)
        for machine in candidates:
            expires = now + dt.timedelta(minutes=minutes)
            closes = open_labs[machine.lab_id]
            clipped = closes < expires
            try:
                # One savepoint for claim and insert: if the insert fails, the claim rolls
                # back with it and the machine is not left reserved without a session.
                with transaction.atomic():
                    if not _claim(machine):
                        continue
                    session = ComputeSession.objects.create(
                        jupyter_token=secrets.token_urlsafe(32),
                        owner=user,
                        machine=machine,
                        state=S.REQUESTED,
                        requirements={
                            "gpu": req.gpu,
                            "min_memory_gb": req.min_memory_gb,
                            "lab": req.lab,
                        },
                        duration_minutes=minutes,
                        expires_at=min(expires, closes),
                    )
            except IntegrityError:  # a live session still holds it: the constraint's backstop
                log.error("machine %s claimed but already in a live session", machine.pk)
                continue
            SessionEvent.objects.create(
                session=session,
                kind=SessionEvent.Kind.STATE,
                to_state=S.REQUESTED,
                reason="",
                message=f"Session requested on {machine.name}.",
                actor=user,
            )
            if clipped:
                SessionEvent.objects.create(
                    session=session,
                    kind=SessionEvent.Kind.WARNING,
                    message=f"The lab closes at {closes:%H:%M} UTC; the lease ends then.",
                )
            machine_set_status(
                machine=machine,
                status=M.RESERVED,
                kind="reserved",
                message=f"session {session.pk}",
                actor=user,
            )
            realtime.session_updated_on_commit(user.pk, session.pk)
            _dispatch_start_on_commit(session)
            return session
    if machine_id is not None:
        raise Conflict("that machine was just taken; try another")
    raise Conflict("no free machine fits your request right now")


def _dispatch_start_on_commit(session: ComputeSession) -> None:
    """Tell the machine's agent to start Jupyter (after commit; the agent resyncs on hello)."""
    # The agent link (machines.consumers) turns this into the protocol's session.start.
    realtime.agent_command_on_commit(
        session.machine_id, {"type": "session.start", "session_id": session.pk}
    )


# --- stopping ----------------------------------------------------------------------------------


def session_stop(
    *, session: ComputeSession, reason: EndReason, actor: User | None = None
) -> ComputeSession:
    """Ask for ``session`` to end. Idempotent for a session already stopping.

    A session the agent never started ends at once; otherwise it goes to ``stopping``, the
    machine to ``cleaning``, and the agent is told to stop and wipe.
    """
    for _ in range(5):  # retry if the session moved under us (e.g. requested -> starting)
        session.refresh_from_db()
        if session.state in TERMINAL:
            raise Conflict(f"session already {session.state}")
        if session.state == S.STOPPING:
            return session
        if session.state == S.REQUESTED and session.machine.status == M.OFFLINE:
            # The agent is away and never reported a start: nothing ran, nothing to wipe.
            if transition(
                session,
                S.ENDED,
                reason=reason,
                actor=actor,
                end_reason=reason,
                ended_at=timezone.now(),
                jupyter_url="",
                jupyter_token="",
            ):
                machine_release(machine=session.machine, message=f"session {session.pk} cancelled")
                return session
            continue
        with transaction.atomic():
            if transition(
                session,
                S.STOPPING,
                reason=reason,
                actor=actor,
                end_reason=reason,
                jupyter_url="",
            ):
                machine = session.machine
                if machine.status != M.OFFLINE:
                    machine_set_status(
                        machine=machine,
                        status=M.CLEANING,
                        kind="cleaning",
                        message=f"session {session.pk}",
                        expect=frozenset({M.RESERVED, M.BUSY, M.OWNER_PRESENT}),
                    )
                realtime.agent_command_on_commit(
                    machine.pk,
                    {"type": "session.stop", "session_id": session.pk, "reason": str(reason)},
                )
                return session
    raise Conflict("the session is changing state; try again")


def session_get_for(*, user: User, session_id: int) -> ComputeSession:
    """The user's own session; anybody else's is indistinguishable from a missing one."""
    session = (
        ComputeSession.objects.select_related("machine", "machine__lab")
        .filter(pk=session_id, owner=user)
        .first()
    )
    if session is None:
        raise NotFound("no such session")
    return session


# --- what the agent reports (issue: sessions end to end) --------------------------------------


def session_mark_starting(*, session: ComputeSession) -> bool:
    return transition(session, S.STARTING)


def session_mark_running(*, session: ComputeSession, url: str, token: str = "") -> bool:
    now = timezone.now()
    if session.state == S.REQUESTED and not transition(session, S.STARTING):
        # Someone moved it first: carry on only if that was the start we were about to record.
        session.refresh_from_db()
        if session.state != S.STARTING:
            return False
    expires = now + dt.timedelta(minutes=session.duration_minutes)
    lab = Lab.objects.prefetch_related("windows", "closed_dates").get(pk=session.machine.lab_id)
    closes = _closes_utc(lab, now)
    if closes is not None:
        expires = min(expires, closes)
    with transaction.atomic():
        if not transition(
            session, S.RUNNING, started_at=now, expires_at=expires, jupyter_url=url[:500]
        ):
            return False
        if token:
            ComputeSession.objects.filter(pk=session.pk).update(jupyter_token=token[:100])
        machine_set_status(
            machine=session.machine,
            status=M.BUSY,
            kind="busy",
            message=f"session {session.pk}",
            expect=frozenset({M.RESERVED}),
        )
    return True


def session_mark_failed(*, session: ComputeSession, error: str) -> bool:
    """The agent could not start Jupyter (or its tunnel), or either died mid-session.

    Before ``running`` the session fails (``start_failed``); after it, the session stops and
    the receipt that the agent sends next ends it.
    """
    if session.state in (S.RUNNING, S.STOPPING):
        with transaction.atomic():
            ok = session.state == S.RUNNING and transition(
                session,
                S.STOPPING,
                reason=EndReason.START_FAILED,
                message=f"Jupyter Lab stopped on the machine: {error}"[:500],
                end_reason=EndReason.START_FAILED,
                jupyter_url="",
            )
            if ok:
                machine_set_status(
                    machine=session.machine,
                    status=M.CLEANING,
                    kind="cleaning",
                    message=f"session {session.pk} died",
                    expect=frozenset({M.BUSY, M.OWNER_PRESENT}),
                )
        return ok
    with transaction.atomic():
        ok = transition(
            session,
            S.FAILED,
            reason=EndReason.START_FAILED,
            message=f"{END_REASON_SENTENCES[EndReason.START_FAILED]} {error}"[:500],
            end_reason=EndReason.START_FAILED,
            ended_at=timezone.now(),
            jupyter_url="",
            jupyter_token="",
        )
        if ok:
            # The agent still wipes whatever the failed start left; the receipt releases it.
            machine_set_status(
                machine=session.machine,
                status=M.CLEANING,
                kind="cleaning",
                message=f"session {session.pk} failed",
                expect=frozenset({M.RESERVED, M.BUSY}),
            )
    return ok


def session_record_receipt(
    *,
    session: ComputeSession,
    verified: bool,
    files_removed: int,
    bytes_removed: int,
    processes_killed: int,
    details: list[str],
) -> None:
    """Store the agent's wipe receipt, end the session, and free or quarantine the machine."""
    from machines.services import machine_quarantine

    now = timezone.now()
    with transaction.atomic():
        # The first receipt counts; a repeated stop produces another, which changes nothing.
        first = ComputeSession.objects.filter(
            pk=session.pk, cleanup_finished_at__isnull=True
        ).update(
            cleanup_verified=verified,
            files_removed=files_removed,
            bytes_removed=bytes_removed,
            processes_killed=processes_killed,
            cleanup_finished_at=now,
            cleanup_details=details[:50],
            jupyter_token="",
            jupyter_url="",
        )
        session.refresh_from_db()
        if session.state == S.STOPPING:
            # Any receipt ends a stopping session, even a repeated one: it proves the wipe.
            transition(session, S.ENDED, ended_at=now, reason=session.end_reason)
        elif session.state in (S.REQUESTED, S.STARTING, S.RUNNING):
            # A wipe before any stop: the agent restarted and cleared the session while the
            # server still thought it alive. It cannot continue; end it as lost.
            transition(
                session,
                S.ENDED,
                reason=EndReason.AGENT_LOST,
                end_reason=EndReason.AGENT_LOST,
                ended_at=now,
                jupyter_url="",
                jupyter_token="",
            )
        if not first:
            return
        session_event(
            session,
            SessionEvent.Kind.PROGRESS,
            "Workspace wiped and verified."
            if verified
            else "The wipe could not be verified; staff will check the machine.",
        )
        machine = session.machine
        machine.refresh_from_db()
        if not verified:
            machine_quarantine(machine=machine, message=f"unverified wipe of session {session.pk}")
        elif machine.status in {M.CLEANING, M.RESERVED, M.BUSY}:
            machine_set_status(
                machine=machine, status=idle_status(machine), message=f"session {session.pk} wiped"
            )


# --- lease -------------------------------------------------------------------------------------

MAX_EXTEND_MINUTES = 24 * 60


def lease_extend(
    *, session: ComputeSession, minutes: int, actor: User | None = None
) -> ComputeSession:
    """Push ``expires_at`` back by ``minutes`` within the policy's lifetime, quota and the lab's
    hours. Raises Conflict with the reason otherwise."""
    if not 1 <= minutes <= MAX_EXTEND_MINUTES:
        raise BadRequest(f"minutes must be between 1 and {MAX_EXTEND_MINUTES}")
    now = timezone.now()
    session.refresh_from_db()
    if session.state != S.RUNNING:
        raise Conflict(f"only a running session can be extended (this one is {session.state})")
    policy = policy_for(session.owner)
    assert session.started_at is not None
    old_expires = session.expires_at
    new_expires = old_expires + dt.timedelta(minutes=minutes)
    lifetime = (new_expires - session.started_at).total_seconds() / 60
    if lifetime > policy.max_session_minutes + 1e-9:
        raise Conflict(
            f"a session may last at most {policy.max_session_minutes} min; "
            f"this one would last {lifetime:.0f} min"
        )
    lab = Lab.objects.prefetch_related("windows", "closed_dates").get(pk=session.machine.lab_id)
    closes = _closes_utc(lab, now)
    if closes is None or new_expires > closes:
        when = f"at {closes:%H:%M} UTC" if closes else "now"
        raise Conflict(f"the lab closes {when}; the session cannot run past that")
    used = hours_used_this_week(session.owner, now)
    remaining = (new_expires - now).total_seconds() / 3600
    if used + remaining > policy.max_hours_per_week + 1e-9:
        raise Conflict(
            f"weekly quota: {used:.1f} h of {policy.max_hours_per_week} h used; "
            f"extending by {minutes} min would exceed it"
        )
    with transaction.atomic():
        # Conditional on the expiry we read: two extends at once cannot both add to it.
        won = ComputeSession.objects.filter(
            pk=session.pk, state=S.RUNNING, expires_at=old_expires
        ).update(expires_at=new_expires)
        if won != 1:
            raise Conflict("the session changed meanwhile; try again")
        session.expires_at = new_expires
        SessionEvent.objects.create(
            session=session,
            kind=SessionEvent.Kind.PROGRESS,
            message=f"Lease extended by {minutes} min, until {new_expires:%Y-%m-%d %H:%M} UTC.",
            actor=actor,
        )
        realtime.session_updated_on_commit(session.owner_id, session.pk)
    return session


# --- the agent link ----------------------------------------------------------------------------


def session_for_machine(*, machine_id: int, session_id: int) -> ComputeSession | None:
    """The session, if it runs on ``machine_id``: an agent may only speak for its own."""
    return (
        ComputeSession.objects.select_related("machine", "owner")
        .filter(pk=session_id, machine_id=machine_id)
        .first()
    )


def session_start_command(*, session_id: int) -> dict[str, Any] | None:
    """What the agent needs to start ``session_id``, or None if it should not start now."""
    # A start may be repeated for a starting session: the agent answers a duplicate with its
    # `ready` again (one that was lost with a dropped connection).
    session = ComputeSession.objects.filter(
        pk=session_id, state__in=[S.REQUESTED, S.STARTING]
    ).first()
    if session is None:
        return None
    policy = policy_for(session.owner)
    remaining = max(60, int((session.expires_at - timezone.now()).total_seconds()))
    return {
        "session_id": session.pk,
        "token": session.jupyter_token,
        "duration_seconds": remaining,
        "terminals": policy.allow_terminals,
    }


def session_progress(*, session: ComputeSession, step: str, message: str) -> None:
    """A start step on the agent; the first one moves the session to ``starting``."""
    if session.state == S.REQUESTED:
        transition(session, S.STARTING)
    if session.state in (S.STARTING, S.RUNNING):
        session_event(session, SessionEvent.Kind.PROGRESS, message or step)


def session_agent_lost(*, session: ComputeSession) -> bool:
    """End a session whose agent no longer knows it (crash, reboot, offline past the grace).

    No receipt yet: when the agent returns it is told to wipe again (see ``reconcile``).
    """
    with transaction.atomic():
        ok = transition(
            session,
            S.ENDED,
            reason=EndReason.AGENT_LOST,
            end_reason=EndReason.AGENT_LOST,
            ended_at=timezone.now(),
            jupyter_url="",
            jupyter_token="",
        )
        if ok:
            machine = session.machine
            machine.refresh_from_db()
            if machine.status in {M.RESERVED, M.BUSY, M.CLEANING}:
                # Online but the session is gone: it must still be wiped before anyone else.
                machine_set_status(
                    machine=machine,
                    status=M.CLEANING,
                    kind="cleaning",
                    message=f"session {session.pk} lost; wipe demanded",
                )
    return ok


def unwiped_sessions(machine_id: int) -> Any:
    """Ended sessions on the machine that may have left something and have no receipt."""
    return ComputeSession.objects.filter(
        machine_id=machine_id, state__in=TERMINAL, cleanup_finished_at__isnull=True
    ).filter(
        Q(started_at__isnull=False)
        | Q(state=S.FAILED)
        | Q(end_reason=EndReason.AGENT_LOST)
        | Q(events__to_state=S.STARTING)
    )


def reconcile(*, machine_id: int, agent_sessions: list[int]) -> list[dict[str, Any]]:
    """After ``hello``: compare the agent's live sessions with the database.

    Returns the commands to send: start for sessions still waiting, stop (wipe) for sessions
    the server ended or never knew, and for ended sessions that were never wiped. Sessions the
    database thinks started but the agent does not know end as ``agent_lost``.
    """
    commands: list[dict[str, Any]] = []
    known = set(agent_sessions)
    # Fast path for the common reconnect: nothing live, nothing owed (one indexed query).
    if (
        not known
        and not ComputeSession.objects.filter(
            machine_id=machine_id, cleanup_finished_at__isnull=True
        ).exists()
    ):
        return commands
    for session in ComputeSession.objects.select_related("machine", "owner").filter(
        machine_id=machine_id, state__in=LIVE
    ):
        if session.state in (S.REQUESTED, S.STARTING):
            # Not started, or started but its `ready` was lost: (re)send; the agent answers a
            # duplicate start with `ready`.
            commands.append({"type": "session.start", "session_id": session.pk})
        elif session.state == S.STOPPING:
            commands.append(
                {"type": "session.stop", "session_id": session.pk, "reason": session.end_reason}
            )
        elif session.pk not in known:
            session_agent_lost(session=session)
            commands.append(
                {"type": "session.stop", "session_id": session.pk, "reason": "agent_lost"}
            )
    live_ids = set(
        ComputeSession.objects.filter(machine_id=machine_id, state__in=LIVE).values_list(
            "pk", flat=True
        )
    )
    for session_id in sorted(known - live_ids):
        commands.append({"type": "session.stop", "session_id": session_id, "reason": "ended"})
    for session_id in (
        unwiped_sessions(machine_id).exclude(pk__in=known).values_list("pk", flat=True)[:50]
    ):
        commands.append({"type": "session.stop", "session_id": session_id, "reason": "wipe"})
    if not commands:
        machine = Machine.objects.get(pk=machine_id)
        if machine.status == M.CLEANING and not live_ids:
            machine_release(machine=machine, message="nothing left to wipe")
    return commands


def session_record_activity(
    *,
    session: ComputeSession,
    last_activity: dt.datetime | None,
    kernels_busy: int,
    connections: int,
) -> None:
    """Jupyter's own activity report (the idle policy reads it)."""
    ComputeSession.objects.filter(pk=session.pk).update(
        last_activity=last_activity, kernels_busy=kernels_busy, connections=connections
    )
