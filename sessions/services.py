"""State changes of compute sessions. Views, consumers, admin actions and tasks call these.

Every transition goes through ``sessions.occupancy.transition``: a conditional UPDATE
(``WHERE state = old``), so that two processes racing on one session cannot both act (the loser
sees a row count of 0), which also moves the machine's status along.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import EffectivePolicy, User
from accounts.services import policy_for
from machines import availability
from machines.models import Lab, Machine, MachineStatus
from machines.services import machine_quarantine, machine_set_status
from nexcompute import agent_events, metrics, realtime
from nexcompute.errors import BadRequest, Conflict, NotFound, PolicyDenied
from nexcompute_agent import protocol
from sessions.models import ComputeSession, SessionEvent, UnmetRequest
from sessions.occupancy import OCCUPANCY, settle, transition
from sessions.states import (
    ACTIVE,
    END_REASON_SENTENCES,
    LIVE,
    TERMINAL,
    EndReason,
    SessionState,
)

log = logging.getLogger(__name__)

# How many candidate machines one request tries to claim before answering 409.
_CLAIM_ATTEMPTS = 25


def session_event(session: ComputeSession, kind: str, message: str) -> SessionEvent:
    event = SessionEvent.objects.create(session=session, kind=kind, message=message[:500])
    realtime.session_updated_on_commit(session.owner_id, session.pk)
    return event


# --- quota: may this user start? ---------------------------------------------------------------


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
    running = SessionState.RUNNING
    rows = (
        SessionEvent.objects.filter(kind=SessionEvent.Kind.STATE, session__owner=user)
        .filter(Q(to_state=running) | Q(from_state=running))
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
        if to_state == running:
            began[session_id] = at
        elif session_id in began:
            total += add(began.pop(session_id), at)
    for begin in began.values():
        total += add(begin, now)
    return total


def check_may_start(user: User, policy: EffectivePolicy, minutes: int, now: dt.datetime) -> None:
    """Raise PolicyDenied unless ``user`` may start a session of ``minutes`` now: session
    length, concurrent sessions and the weekly hours of their policy."""
    if minutes > policy.max_session_minutes:
        raise PolicyDenied(
            f"session length {minutes} min exceeds your limit of {policy.max_session_minutes} min"
        )
    live = ComputeSession.objects.for_owner(user).live().count()
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


# --- allocation: which machines fit? -----------------------------------------------------------


@dataclass(frozen=True)
class Requirements:
    gpu: bool = False
    min_memory_gb: float = 0.0
    lab: str | None = None


def _open_labs(now: dt.datetime) -> dict[int, dt.datetime]:
    """Each open lab's closing time (UTC), by lab id; closed labs are left out."""
    return {
        lab_id: until
        for lab_id, until in availability.closing_times(now).items()
        if until is not None
    }


def _asked_machine(
    policy: EffectivePolicy, machine_id: int, open_labs: dict[int, dt.datetime]
) -> Machine:
    """The one machine the user asked for, if the policy allows it and it is free now."""
    machine = Machine.objects.select_related("lab").filter(pk=machine_id).first()
    if machine is None:
        raise NotFound("no such machine")
    if not policy.allows_lab(machine.lab):
        raise PolicyDenied(f"your quota policy does not allow lab {machine.lab.name}")
    if machine.gpu_count and not policy.allow_gpu:
        raise PolicyDenied("your quota policy does not allow GPU machines")
    if machine.lab_id not in open_labs:
        raise PolicyDenied(f"lab {machine.lab.name} is closed now (outside its hours)")
    if machine.status != MachineStatus.AVAILABLE or not machine.enabled or machine.draining:
        raise Conflict(f"machine {machine.name} is not free ({machine.status})")
    return machine


def _fitting_machines(
    policy: EffectivePolicy, req: Requirements, open_labs: dict[int, dt.datetime]
) -> list[Machine]:
    """Free machines that fit ``req`` in random order, GPU machines last unless asked for."""
    if req.gpu and not policy.allow_gpu:
        raise PolicyDenied("your quota policy does not allow GPU machines")
    qs = Machine.objects.usable_by(policy).free().filter(lab_id__in=open_labs)
    if req.lab:
        qs = qs.filter(lab__name=req.lab)
    if req.gpu:
        qs = qs.filter(gpu_count__gt=0)
    if req.min_memory_gb:
        qs = qs.filter(memory_bytes__gte=int(req.min_memory_gb * 1024**3))
    machines = list(qs.select_related("lab")[:500])
    # Random order spreads concurrent requests over the free machines instead of all racing
    # for the first one; GPU machines go last unless asked for, to keep them for those who do.
    random.shuffle(machines)
    # ...and machines with a warm sandbox first (instant connect), GPU ones still last.
    machines.sort(key=lambda m: (not req.gpu and m.gpu_count > 0, not m.warm_ready))
    return machines[:_CLAIM_ATTEMPTS]


def _claim(machine: Machine) -> bool:
    """Reserve ``machine`` if, and only if, it is still free: the race guard of allocation."""
    won = (
        Machine.objects.filter(pk=machine.pk)
        .free()
        .update(status=OCCUPANCY[SessionState.REQUESTED].status, warm_ready=False)
    )
    return won == 1


def _create_on(
    machine: Machine, *, user: User, req: Requirements, minutes: int, expires: dt.datetime
) -> ComputeSession | None:
    """Claim ``machine`` and create the session on it; None if another request won it."""
    try:
        # One savepoint for claim and insert: if the insert fails, the claim rolls back with
        # it and the machine is not left reserved without a session.
        with transaction.atomic():
            if not _claim(machine):
                return None
            session = ComputeSession.objects.create(
                jupyter_token=secrets.token_urlsafe(32),
                owner=user,
                machine=machine,
                state=SessionState.REQUESTED,
                requirements={"gpu": req.gpu, "min_memory_gb": req.min_memory_gb, "lab": req.lab},
                duration_minutes=minutes,
                expires_at=expires,
            )
    except IntegrityError:  # a live session still holds it: the constraint's backstop
        log.error("machine %s claimed but already in a live session", machine.pk)
        return None
    # ``machine.status`` still holds the status we read (available): the audit row records
    # available -> reserved.
    machine_set_status(
        machine=machine,
        status=MachineStatus.RESERVED,
        kind="reserved",
        message=f"session {session.pk}",
        actor=user,
    )
    return session


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
    minutes = duration_minutes or min(
        settings.NEXCOMPUTE_DEFAULT_SESSION_MINUTES, policy.max_session_minutes
    )
    if minutes <= 0:
        raise BadRequest("duration_minutes must be positive")
    if machine_id is not None and not Machine.objects.filter(pk=machine_id).exists():
        # Before the quota check: a typo'd id is "no such machine", not a quota error.
        raise NotFound(f"no such machine: {machine_id}")
    with transaction.atomic():
        # Serialise one user's requests, so two at once cannot both pass the quota check.
        User.objects.select_for_update().filter(pk=user.pk).first()
        check_may_start(user, policy, minutes, now)
        open_labs = _open_labs(now)
        if machine_id is not None:
            candidates = [_asked_machine(policy, machine_id, open_labs)]
        else:
            candidates = _fitting_machines(policy, req, open_labs)
        expires = now + dt.timedelta(minutes=minutes)
        for machine in candidates:
            closes = open_labs[machine.lab_id]
            session = _create_on(
                machine, user=user, req=req, minutes=minutes, expires=min(expires, closes)
            )
            if session is None:
                continue
            SessionEvent.objects.create(
                session=session,
                kind=SessionEvent.Kind.STATE,
                to_state=SessionState.REQUESTED,
                reason="",
                message=f"Session requested on {machine.name}.",
                actor=user,
            )
            if closes < expires:
                SessionEvent.objects.create(
                    session=session,
                    kind=SessionEvent.Kind.WARNING,
                    message=f"The lab closes at {closes:%H:%M} UTC; the lease ends then.",
                )
            realtime.session_updated_on_commit(user.pk, session.pk)
            agent_events.send_on_commit(machine.pk, agent_events.session_start(session.pk))
            return session
    if machine_id is not None:
        raise Conflict("that machine was just taken; try another")
    _record_unmet(user=user, policy=policy, req=req, at=now)
    raise Conflict("no free machine fits your request right now")


def _record_unmet(
    *, user: User, policy: EffectivePolicy, req: Requirements, at: dt.datetime
) -> None:
    """Remember a "no machine fits" refusal for the staff reports (unmet demand)."""
    lab_id: int | None = None
    if req.lab:
        lab_id = Lab.objects.filter(name=req.lab).values_list("pk", flat=True).first()
    elif policy.lab_ids is not None and len(policy.lab_ids) == 1:
        (lab_id,) = policy.lab_ids
    UnmetRequest.objects.create(
        user=user, at=at, lab_id=lab_id, gpu=req.gpu, min_memory_gb=req.min_memory_gb
    )


# --- stopping ----------------------------------------------------------------------------------


def session_stop(
    *, session: ComputeSession, reason: EndReason, actor: User | None = None
) -> ComputeSession:
    """Ask for ``session`` to end. Idempotent for a session already stopping.

    A session the agent never started ends at once; otherwise it goes to ``stopping`` (the
    machine to ``cleaning``), and the agent is told to stop and wipe.
    """
    for _ in range(5):  # retry if the session moved under us (e.g. requested -> starting)
        session.refresh_from_db()
        if session.state in TERMINAL:
            raise Conflict(f"session already {session.state}")
        if session.state == SessionState.STOPPING:
            return session
        if (
            session.state == SessionState.REQUESTED
            and session.machine.status == MachineStatus.OFFLINE
        ):
            # The agent is away and never reported a start: nothing ran, nothing to wipe.
            if transition(
                session,
                SessionState.ENDED,
                reason=reason,
                actor=actor,
                end_reason=reason,
                ended_at=timezone.now(),
                jupyter_url="",
                jupyter_token="",
                machine_message=f"session {session.pk} cancelled",
            ):
                return session
            continue
        with transaction.atomic():
            if transition(
                session,
                SessionState.STOPPING,
                reason=reason,
                actor=actor,
                end_reason=reason,
                jupyter_url="",
            ):
                stop = agent_events.session_stop(session.pk, reason)
                agent_events.send_on_commit(session.machine_id, stop)
                return session
    raise Conflict("the session is changing state; try again")


def session_get_for(*, user: User, session_id: int) -> ComputeSession:
    """The user's own session; anybody else's is indistinguishable from a missing one."""
    session = (
        ComputeSession.objects.for_owner(user)
        .select_related("machine", "machine__lab")
        .filter(pk=session_id)
        .first()
    )
    if session is None:
        raise NotFound("no such session")
    return session


# --- what the agent reports --------------------------------------------------------------------


def session_mark_running(*, session: ComputeSession, url: str) -> bool:
    """Jupyter is ready at ``url``. Repeated for a running session (a restarted agent took it
    back and had to open its tunnel again): the new URL replaces the old one."""
    now = timezone.now()
    if session.state == SessionState.RUNNING:
        if not url or url[:500] == session.jupyter_url:
            return False
        with transaction.atomic():
            updated = ComputeSession.objects.filter(
                pk=session.pk, state=SessionState.RUNNING
            ).update(jupyter_url=url[:500])
            if updated:
                session.jupyter_url = url[:500]
                session_event(
                    session,
                    SessionEvent.Kind.PROGRESS,
                    "The machine's agent restarted and opened the tunnel again: new address.",
                )
        return bool(updated)
    if session.state == SessionState.REQUESTED and not transition(session, SessionState.STARTING):
        # Someone moved it first: carry on only if that was the start we were about to record.
        session.refresh_from_db()
        if session.state != SessionState.STARTING:
            return False
    expires = now + dt.timedelta(minutes=session.duration_minutes)
    closes = availability.lab_closes_at(session.machine.lab_id, now)
    if closes is not None:
        expires = min(expires, closes)
    if not transition(
        session,
        SessionState.RUNNING,
        started_at=now,
        expires_at=expires,
        jupyter_url=url[:500],
    ):
        return False
    waited = (now - session.created_at).total_seconds()
    transaction.on_commit(lambda: metrics.TIME_TO_READY.observe(waited))
    return True


def session_mark_failed(*, session: ComputeSession, error: str, phase: str = "start") -> bool:
    """The agent could not start Jupyter (or its tunnel), or either died mid-session.

    A session that was running (or that the agent says was: ``phase`` running) crashed: it
    stops (``crashed``) and the receipt the agent sends next ends it. Before ``running`` the
    session fails (``start_failed``). False for a session already stopping or over.
    """
    if session.state not in ACTIVE:
        return False
    if phase == "running" or session.state == SessionState.RUNNING:
        return transition(
            session,
            SessionState.STOPPING,
            reason=EndReason.CRASHED,
            message=f"{END_REASON_SENTENCES[EndReason.CRASHED]} {error}"[:500],
            end_reason=EndReason.CRASHED,
            jupyter_url="",
            machine_message=f"session {session.pk} crashed",
        )
    return transition(
        session,
        SessionState.FAILED,
        reason=EndReason.START_FAILED,
        message=f"{END_REASON_SENTENCES[EndReason.START_FAILED]} {error}"[:500],
        end_reason=EndReason.START_FAILED,
        ended_at=timezone.now(),
        jupyter_url="",
        jupyter_token="",
        machine_message=f"session {session.pk} failed",
    )


def session_record_receipt(
    *,
    session: ComputeSession,
    verified: bool,
    files_removed: int,
    bytes_removed: int,
    processes_killed: int,
    details: list[str],
    checks: list[dict[str, Any]] | None = None,
    account: str = "",
    duration_seconds: float | None = None,
) -> None:
    """Store the agent's wipe receipt, end the session, and free or quarantine the machine."""
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
            cleanup_checks=(checks or [])[:64],
            cleanup_account=account[:256],
            jupyter_token="",
            jupyter_url="",
        )
        session.refresh_from_db()
        if first and not verified:
            # Before the session ends: its machine then settles in quarantine, not available.
            machine_quarantine(
                machine=session.machine, message=f"unverified wipe of session {session.pk}"
            )
        _end_on_receipt(session, now)
        if not first:
            return
        transaction.on_commit(lambda: _count_wipe(verified, duration_seconds))
        session_event(
            session,
            SessionEvent.Kind.PROGRESS,
            "Workspace wiped and verified."
            if verified
            else "The wipe could not be verified; staff will check the machine.",
        )
        # The session may have ended before (lost agent, failed start): release it now.
        settle(session.machine, message=f"session {session.pk} wiped")


def _count_wipe(verified: bool, duration_seconds: float | None) -> None:
    metrics.WIPES.labels(outcome="verified" if verified else "unverified").inc()
    if duration_seconds is not None:
        metrics.WIPE_DURATION.observe(duration_seconds)


def _end_on_receipt(session: ComputeSession, now: dt.datetime) -> None:
    if session.state == SessionState.STOPPING:
        # Any receipt ends a stopping session, even a repeated one: it proves the wipe.
        transition(
            session,
            SessionState.ENDED,
            ended_at=now,
            reason=session.end_reason,
            machine_message=f"session {session.pk} wiped",
        )
    elif session.state in LIVE:
        # A wipe before any stop: the agent restarted and cleared the session while the
        # server still thought it alive. It cannot continue; end it as lost.
        transition(
            session,
            SessionState.ENDED,
            reason=EndReason.AGENT_LOST,
            end_reason=EndReason.AGENT_LOST,
            ended_at=now,
            jupyter_url="",
            jupyter_token="",
            machine_message=f"session {session.pk} wiped",
        )


def session_progress(*, session: ComputeSession, step: str, message: str) -> None:
    """A start step on the agent; the first one moves the session to ``starting``."""
    if session.state == SessionState.REQUESTED:
        transition(session, SessionState.STARTING)
    if session.state in (SessionState.STARTING, SessionState.RUNNING):
        session_event(session, SessionEvent.Kind.PROGRESS, message or step)


def session_notice(*, session: ComputeSession, kind: str, message: str) -> None:
    """Something the student should know while the session runs (a limit was hit, the disk is
    full): a warning on the session's timeline, pushed to the dashboard."""
    if session.state in LIVE:
        session_event(session, SessionEvent.Kind.WARNING, message or kind)


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


SessionReport: TypeAlias = (
    protocol.SessionProgress
    | protocol.SessionReady
    | protocol.SessionFailed
    | protocol.SessionNotice
    | protocol.SessionReceipt
    | protocol.SessionActivity
)

_REPORTS: dict[str, Callable[[ComputeSession, Any], object]] = {
    "session.progress": lambda s, msg: session_progress(
        session=s, step=msg.step, message=msg.message
    ),
    "session.ready": lambda s, msg: session_mark_running(session=s, url=msg.url),
    "session.failed": lambda s, msg: session_mark_failed(
        session=s, error=msg.error, phase=msg.phase
    ),
    "session.notice": lambda s, msg: session_notice(session=s, kind=msg.kind, message=msg.message),
    "session.receipt": lambda s, msg: session_record_receipt(
        session=s,
        verified=msg.verified,
        files_removed=msg.files_removed,
        bytes_removed=msg.bytes_removed,
        processes_killed=msg.processes_killed,
        details=list(msg.details),
        checks=[check.model_dump() for check in msg.checks],
        account=msg.account or "",
        duration_seconds=msg.duration_seconds,
    ),
    "session.activity": lambda s, msg: session_record_activity(
        session=s,
        last_activity=msg.last_activity,
        kernels_busy=msg.kernels_busy,
        connections=msg.connections,
    ),
}


def apply_agent_report(*, machine_id: int, msg: SessionReport) -> bool:
    """Apply what a machine's agent reports about one of its sessions (progress, readiness,
    failure, notices, receipts, activity). False if the session is not on that machine: an
    agent may only speak for its own."""
    session = (
        ComputeSession.objects.select_related("machine", "owner")
        .filter(pk=msg.session_id, machine_id=machine_id)
        .first()
    )
    if session is None:
        return False
    _REPORTS[msg.type](session, msg)
    return True


def session_start_command(*, session_id: int) -> protocol.SessionStart | None:
    """What the agent needs to start ``session_id``, or None if it should not start now.

    Read when the command is sent, not when it was queued: a start for a session cancelled
    meanwhile is not sent. A start may be repeated for a starting session: the agent answers
    a duplicate with its `ready` again (one that was lost with a dropped connection).
    """
    session = (
        ComputeSession.objects.select_related("machine__lab", "owner")
        .filter(pk=session_id, state__in=[SessionState.REQUESTED, SessionState.STARTING])
        .first()
    )
    if session is None:
        return None
    policy = policy_for(session.owner)
    remaining = max(60, int((session.expires_at - timezone.now()).total_seconds()))
    limits = session_limits(policy, session.machine)
    return protocol.SessionStart(
        msgid=protocol.new_msgid(),
        session_id=session.pk,
        token=session.jupyter_token,
        duration_seconds=remaining,
        terminals=policy.allow_terminals,
        memory_limit_bytes=limits.memory_bytes,
        limits=limits,
        nexus_url=settings.NEXCOMPUTE_PUBLIC_URL,
        access=_access(session),
    )


def _access(session: ComputeSession) -> protocol.SessionAccess | None:
    """Cloudflare Access for the session when its lab has it. An owner without an email can
    never match an Access token: the door then stays shut (fail closed), and says so."""
    lab = session.machine.lab
    if not lab.access_enabled:
        return None
    return protocol.SessionAccess(
        team_domain=lab.access_team_domain,
        audience=lab.access_audience,
        email=session.owner.email or "no-email-on-record@invalid",
    )


def session_limits(policy: EffectivePolicy, machine: Machine) -> protocol.SessionLimits:
    """The policy's limits for one session on ``machine`` (memory as a share of its RAM)."""
    memory = machine.memory_bytes * policy.memory_percent // 100 if machine.memory_bytes else 0
    return protocol.SessionLimits(
        memory_bytes=memory or None,
        cpu_weight=policy.cpu_weight,
        cpu_quota=policy.cpu_quota,
        max_tasks=policy.max_tasks,
        workspace_bytes=policy.workspace_gb * 1024**3,
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
    if session.state != SessionState.RUNNING:
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
    closes = availability.lab_closes_at(session.machine.lab_id, now)
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
            pk=session.pk, state=SessionState.RUNNING, expires_at=old_expires
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
