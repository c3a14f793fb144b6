"""State changes of compute sessions. Views, consumers, admin actions and tasks call these.

Every transition goes through ``sessions.occupancy.transition``: a conditional UPDATE
(``WHERE state = old``), so that two processes racing on one session cannot both act (the loser
sees a row count of 0), which also moves the machine's status along.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Case, Q, Value, When
from django.db.models.functions import Random
from django.utils import timezone

from accounts.models import EffectivePolicy, User
from accounts.services import policy_for
from machines import availability
from machines.models import Lab, Machine, MachineQuerySet, MachineStatus
from machines.services import machine_quarantine, machine_set_status
from nexcompute import agent_events, metrics, realtime, words
from nexcompute.errors import BadRequest, Conflict, NotFound, PolicyDenied
from nexcompute_agent import protocol
from sessions.capability import capability_for, capability_hash
from sessions.models import ComputeSession, SessionEvent, UnmetRequest
from sessions.occupancy import OCCUPANCY, settle, transition
from sessions.states import (
    ACTIVE,
    END_REASON_SENTENCES,
    LIVE,
    PROGRESS_SENTENCES,
    TERMINAL,
    EndReason,
    SessionState,
)

log = logging.getLogger(__name__)

# How many times one request looks for a free machine (and waits for a held one) before 409.
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


def _open_labs(now: dt.datetime, lab_ids: Iterable[int] | None = None) -> dict[int, dt.datetime]:
    """Each open lab's closing time (UTC), by lab id; closed labs are left out. Only the labs
    in ``lab_ids`` if given."""
    return {
        lab_id: until
        for lab_id, until in availability.closing_times(now, lab_ids).items()
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


def _matching(qs: MachineQuerySet, req: Requirements) -> MachineQuerySet:
    """``qs`` narrowed to the machines that meet ``req`` (lab, GPU, memory)."""
    if req.lab:
        qs = qs.filter(lab__name=req.lab)
    if req.gpu:
        qs = qs.filter(gpu_count__gt=0)
    if req.min_memory_gb:
        qs = qs.filter(memory_bytes__gte=int(req.min_memory_gb * 1024**3))
    return qs


def _fitting(
    policy: EffectivePolicy, req: Requirements, open_labs: dict[int, dt.datetime] | None
) -> MachineQuerySet:
    """Free machines that fit ``req`` in ``open_labs`` (None: in any lab, open or not); no
    order, nothing read yet."""
    if req.gpu and not policy.allow_gpu:
        raise PolicyDenied("your quota policy does not allow GPU machines")
    qs = _matching(Machine.objects.usable_by(policy).free(), req)
    if open_labs is not None:
        qs = qs.filter(lab_id__in=open_labs)
    return qs


def _preference(req: Requirements) -> list[Any]:
    """The order allocation tries fitting machines in: GPU machines last unless asked for (to
    keep them for those who do), then at random, which spreads concurrent requests over the
    free machines instead of all racing for the first one."""
    order: list[Any] = []
    if not req.gpu:
        order.append(Case(When(gpu_count__gt=0, then=Value(1)), default=Value(0)))
    # Machines with a warm sandbox first (instant connect; docs/sandbox.md), GPU ones still last.
    order.append(Case(When(warm_ready=True, then=Value(0)), default=Value(1)))
    order.append(Random())
    return order


def _pick_unlocked(
    policy: EffectivePolicy, req: Requirements, open_labs: dict[int, dt.datetime]
) -> Machine | None:
    """The preferred fitting free machine that no other transaction holds, row-locked for
    this one (until it ends).

    ``FOR UPDATE SKIP LOCKED``: a request never queues behind another's claim (the
    contended-allocation bench spent most of its p99 there: every loser of a race waited for
    the winner's whole transaction to commit, then tried the next machine, each try a
    savepoint and an UPDATE).
    """
    qs = (
        _fitting(policy, req, open_labs)
        .order_by(*_preference(req))
        .select_for_update(skip_locked=True, of=("self",))
    )
    return qs.first()


def _wait_for(machine_id: int) -> Machine | None:
    """``machine_id`` row-locked for this transaction once whoever holds it is done, if it is
    still free then (PostgreSQL re-checks the condition after the wait); None if it was taken.
    One row at a time: a multi-row waiting ``FOR UPDATE`` in random order deadlocks."""
    return Machine.objects.filter(pk=machine_id).free().select_for_update(of=("self",)).first()


def _claim(machine: Machine) -> bool:
    """Reserve ``machine`` if, and only if, it is still free: the race guard of allocation."""
    won = (
        Machine.objects.filter(pk=machine.pk)
        .free()
        .update(status=OCCUPANCY[SessionState.REQUESTED].status, warm_ready=False)
    )
    return won == 1


def _create_on(
    machine: Machine,
    *,
    user: User,
    req: Requirements,
    minutes: int,
    expires: dt.datetime,
) -> ComputeSession | None:
    """Claim ``machine`` and create the session on it; None if another request won it (a row
    this transaction holds locked (``_candidates``) is always won)."""
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


def _candidates(
    policy: EffectivePolicy,
    req: Requirements,
    machine_id: int | None,
    open_labs: dict[int, dt.datetime],
) -> Iterator[Machine]:
    """The machines one request tries to claim, in order, inside its transaction.

    The preferred machine nobody else is claiming (no waiting). Only when every fitting free
    machine is held by someone else (claims in flight, a heartbeat write) does it wait for
    them, one at a time, and take the first still free: a request is refused only when
    nothing fitting is free once those claims are settled.
    """
    if machine_id is not None:
        yield _asked_machine(policy, machine_id, open_labs)
        return
    for _ in range(_CLAIM_ATTEMPTS):
        machine = _pick_unlocked(policy, req, open_labs)
        if machine is None:
            # Every fitting free machine is held: wait for one holder, then look again (the
            # claims that committed meanwhile are gone from the next look).
            held = _fitting(policy, req, open_labs).values_list("pk", flat=True).first()
            if held is None:
                return
            machine = _wait_for(held)
        if machine is not None:
            yield machine
            return


class _FifoSlots:
    """A counting semaphore that serves waiters in arrival order: a released slot is handed
    to the oldest waiter, never to a thread arriving meanwhile (``threading.Semaphore`` lets
    those barge in, and a few threads then starve the rest: p99 6 s in the bench)."""

    def __init__(self, size: int) -> None:
        self.lock = threading.Lock()
        self.free = size
        self.waiters: collections.deque[threading.Event] = collections.deque()

    def acquire(self, timeout: float) -> bool:
        with self.lock:
            if self.free > 0 and not self.waiters:
                self.free -= 1
                return True
            turn = threading.Event()
            self.waiters.append(turn)
        if turn.wait(timeout):
            return True
        with self.lock:
            if turn.is_set():  # handed over just as the wait ran out
                return True
            self.waiters.remove(turn)
            return False

    def release(self) -> None:
        with self.lock:
            if self.waiters:
                self.waiters.popleft().set()
            else:
                self.free += 1


_SLOTS: dict[int, _FifoSlots] = {}
_SLOTS_LOCK = threading.Lock()


@contextlib.contextmanager
def _admitted() -> Iterator[None]:
    """At most NEXCOMPUTE_ALLOCATION_CONCURRENCY session requests allocate at once in one
    process; the others wait their turn (first come, first served) for up to
    NEXCOMPUTE_ALLOCATION_WAIT_SECONDS, then get a 409.

    In a rush the CPU (Python's, PostgreSQL's) is what requests share. All at once, each
    progresses at 1/N speed and a granted request, three times the work of a refusal, ends
    last (bench/allocate.py: p99 2.2 s with 32 at once); a few at a time, each runs at full
    speed and every request waits about the same. (Under daphne a process's sync views run in
    one thread anyway; this bounds Celery and WSGI workers, and the bench's threads.)
    """
    size = settings.NEXCOMPUTE_ALLOCATION_CONCURRENCY
    with _SLOTS_LOCK:
        slots = _SLOTS.setdefault(size, _FifoSlots(size))
    if not slots.acquire(timeout=settings.NEXCOMPUTE_ALLOCATION_WAIT_SECONDS):
        raise Conflict("too many session requests at once; try again in a moment")
    try:
        yield
    finally:
        slots.release()


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
    database refuses a machine in two live sessions. Under contention a request takes the
    preferred machine nobody else is claiming (``_candidates``), a refusal takes no lock, and
    a process allocates a few requests at a time (``_admitted``).
    """
    with _admitted():
        return _session_request(
            user=user,
            machine_id=machine_id,
            requirements=requirements,
            duration_minutes=duration_minutes,
            now=now,
        )


def _session_request(
    *,
    user: User,
    machine_id: int | None = None,
    requirements: Requirements | None = None,
    duration_minutes: int | None = None,
    now: dt.datetime | None = None,
) -> ComputeSession:
    """``session_request`` once admitted."""
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
    if machine_id is None:
        # Opening hours only of the labs that have a free fitting machine.
        free_in = _fitting(policy, req, None).order_by().values_list("lab_id", flat=True)
        lab_ids = set(free_in.distinct())
        open_labs = _open_labs(now, lab_ids) if lab_ids else {}
        if not open_labs:
            # Nothing free fits: refused without a lock or a transaction (most requests of a
            # rush end here once the machines are taken). The quota is still checked first, so
            # a student over quota hears that (403) rather than "try later" (409).
            check_may_start(user, policy, minutes, now)
            _record_unmet(user=user, policy=policy, req=req, at=now)
            raise Conflict(
                _never_fits(policy, req) or "no free machine fits your request right now"
            )
    else:
        open_labs = _open_labs(now)
    with transaction.atomic():
        # Serialise one user's requests, so two at once cannot both pass the quota check.
        # NO KEY UPDATE: rows that only point at the user (a refusal's UnmetRequest, its
        # foreign-key check takes KEY SHARE) are not held up meanwhile.
        User.objects.select_for_update(no_key=True).filter(pk=user.pk).first()
        check_may_start(user, policy, minutes, now)
        expires = now + dt.timedelta(minutes=minutes)
        for machine in _candidates(policy, req, machine_id, open_labs):
            closes = open_labs[machine.lab_id]
            session = _create_on(
                machine,
                user=user,
                req=req,
                minutes=minutes,
                expires=min(expires, closes),
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
                    message=(
                        f"The lab closes at {words.clock(closes, machine.lab.tz)}; the lease "
                        "ends then."
                    ),
                )
            realtime.session_updated_on_commit(user.pk, session.pk)
            agent_events.send_on_commit(machine.pk, agent_events.session_start(session.pk))
            return session
    if machine_id is not None:
        raise Conflict("that machine was just taken; try another")
    _record_unmet(user=user, policy=policy, req=req, at=now)
    raise Conflict(_never_fits(policy, req) or "no free machine fits your request right now")


def _never_fits(policy: EffectivePolicy, req: Requirements) -> str:
    """Why no machine the user may use could ever take ``req`` (busy or not), or "" if some
    could: waiting helps only in the second case, so the answer must tell them apart."""
    # Disabled, draining or offline machines count: they may come back.
    if _matching(Machine.objects.usable_by(policy), req).exists():
        return ""
    where = f"lab {req.lab}" if req.lab else "your labs"
    wanted = [
        *(["a GPU"] if req.gpu else []),
        *([f"{req.min_memory_gb:g} GB of memory or more"] if req.min_memory_gb else []),
    ]
    if not wanted:
        return f"there is no machine in {where}"
    return f"no machine in {where} has {' and '.join(wanted)}"


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
    """A start step on the agent; the first one moves the session to ``starting``.

    The timeline gets the step's plain sentence (``PROGRESS_SENTENCES``), once per step: the
    agent's own ``message`` is for its log (it may name paths and ports), and a repeated start
    (a resend, a reconnect) reports the same steps again."""
    if session.state == SessionState.REQUESTED:
        transition(session, SessionState.STARTING)
    sentence = PROGRESS_SENTENCES.get(step)
    if sentence is None or session.state not in (SessionState.STARTING, SessionState.RUNNING):
        return
    try:
        with transaction.atomic():  # the unique (session, key) refuses a second line
            SessionEvent.objects.create(
                session=session,
                kind=SessionEvent.Kind.PROGRESS,
                key=f"step:{step}",
                message=sentence,
            )
    except IntegrityError:
        return
    realtime.session_updated_on_commit(session.owner_id, session.pk)


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
    source: str | None = None,
    cpu_percent: float | None = None,
) -> None:
    """The agent's activity report (the idle policy reads it; docs/policy.md, "Idle")."""
    ComputeSession.objects.filter(pk=session.pk).update(
        last_activity=last_activity,
        kernels_busy=kernels_busy,
        connections=connections,
        activity_source=source or "",
        activity_cpu_percent=cpu_percent,
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
        source=msg.source,
        cpu_percent=msg.cpu_percent,
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
    capability = session_capability_issue(session=session)
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
        capability=capability,
    )


def session_capability_issue(*, session: ComputeSession) -> str:
    """The session-scoped capability for the start frame (``sessions.capability``): its hash
    is recorded the first time; a start sent again carries the same value."""
    value = capability_for(session)
    digest = capability_hash(value)
    if session.capability_hash != digest:
        ComputeSession.objects.filter(pk=session.pk, state__in=LIVE).update(capability_hash=digest)
        session.capability_hash = digest
    return value


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
    old_expires = session.expires_at
    new_expires = old_expires + dt.timedelta(minutes=minutes)
    refusal = _extend_refusals(session, policy_for(session.owner), [minutes], now)[minutes]
    if refusal is not None:
        raise Conflict(refusal)
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
            message=(
                f"Lease extended by {minutes} min, until "
                f"{words.clock(new_expires, session.machine.lab.tz)}."
            ),
            actor=actor,
        )
        realtime.session_updated_on_commit(session.owner_id, session.pk)
    return session


def _extend_refusals(
    session: ComputeSession, policy: EffectivePolicy, choices: list[int], now: dt.datetime
) -> dict[int, str | None]:
    """For each of ``choices`` (minutes): why extending running ``session`` by it is not
    allowed now, or None. The lab's closing time and the week's hours are read once, and only
    when a choice gets that far (the Lab extension asks for several choices every poll)."""
    assert session.started_at is not None
    closes: list[dt.datetime | None] = []
    used: list[float] = []
    refusals: dict[int, str | None] = {}
    for minutes in choices:
        new_expires = session.expires_at + dt.timedelta(minutes=minutes)
        lifetime = (new_expires - session.started_at).total_seconds() / 60
        if lifetime > policy.max_session_minutes + 1e-9:
            refusals[minutes] = (
                f"a session may last at most {policy.max_session_minutes} min; "
                f"this one would last {lifetime:.0f} min"
            )
            continue
        if not closes:
            closes.append(availability.lab_closes_at(session.machine.lab_id, now))
        if closes[0] is None or new_expires > closes[0]:
            when = f"at {words.clock(closes[0], session.machine.lab.tz)}" if closes[0] else "now"
            refusals[minutes] = f"the lab closes {when}; the session cannot run past that"
            continue
        if not used:
            used.append(hours_used_this_week(session.owner, now))
        remaining = (new_expires - now).total_seconds() / 3600
        if used[0] + remaining > policy.max_hours_per_week + 1e-9:
            refusals[minutes] = (
                f"weekly quota: {used[0]:.1f} h of {policy.max_hours_per_week} h used; "
                f"extending by {minutes} min would exceed it"
            )
            continue
        refusals[minutes] = None
    return refusals


@dataclass(frozen=True)
class ExtendChoices:
    """What Extend may add right now: ``default`` is one click (the step, or the largest
    allowed choice below it), ``choices`` all allowed ones; empty with ``reason`` if none."""

    default: int | None
    choices: list[int]
    reason: str


def lease_extend_choices(*, session: ComputeSession, now: dt.datetime) -> ExtendChoices:
    if session.state != SessionState.RUNNING or session.started_at is None:
        return ExtendChoices(None, [], f"only a running session can be extended ({session.state})")
    step = settings.NEXCOMPUTE_EXTEND_STEP_MINUTES
    candidates = sorted({max(1, step // 2), step, step * 2})
    policy = policy_for(session.owner)
    allowed: list[int] = []
    reason = ""
    for minutes, refusal in _extend_refusals(session, policy, candidates, now).items():
        if refusal is None:
            allowed.append(minutes)
        elif not reason:
            reason = refusal
    below = [m for m in allowed if m <= step]
    default = step if step in allowed else (max(below) if below else None)
    return ExtendChoices(default, allowed, "" if allowed else reason)
