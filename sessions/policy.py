"""Lease policy: the time-based rules that Celery beat enforces (docs/policy.md).

Each rule has a sweep, ``sweep_<rule>(now=...)``, that picks candidate session ids with one
query and hands each id to a per-session function. The per-session functions re-load the row
and act only through claims, so two workers running the same sweep at once (or ``acks_late``
redelivering one) do no harm:

- a state change is ``sessions.services.transition``'s conditional UPDATE (one winner);
- a once-only event (a warning point, a resend of the stop) is claimed by inserting its
  ``SessionEvent`` with a ``key``: the ``one_event_per_key`` constraint refuses the second.

Pushes to browsers and agents, and e-mail, go out after commit.
"""

from __future__ import annotations

import datetime as dt
import logging
import math

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from accounts.models import User
from machines import availability
from machines.models import Machine, MachineEvent, MachineStatus
from machines.services import machine_quarantine
from nexcompute import agent_events, metrics, realtime, words
from nexcompute.agent_events import StopReason
from nexcompute.errors import Conflict
from sessions import notify
from sessions.models import ComputeSession, SessionEvent
from sessions.occupancy import session_agent_lost, transition
from sessions.services import session_mark_failed, session_stop
from sessions.states import ACTIVE, LIVE, EndReason, SessionState

log = logging.getLogger(__name__)
Kind = SessionEvent.Kind


def _minutes(value: float) -> dt.timedelta:
    return dt.timedelta(minutes=value)


def _hhmm(at: dt.datetime, session: ComputeSession) -> str:
    """A time in the lab's zone, the zone named: ``13:02 CET`` (the student may be elsewhere;
    the dashboard shows its own times in the student's zone)."""
    return words.clock(at, session.machine.lab.tz)


def _in_minutes(delta: dt.timedelta) -> str:
    minutes = max(1, math.ceil(delta.total_seconds() / 60))
    return f"{minutes} min"


def event_once(
    *, session: ComputeSession, key: str, message: str, kind: str = Kind.WARNING
) -> bool:
    """Record (and push to the owner) an event that may happen only once per ``key``.

    Returns False if it was already recorded, by this or another worker: the INSERT is the
    claim, and the unique constraint on (session, key) decides between racing workers.
    """
    try:
        with transaction.atomic():
            SessionEvent.objects.create(session=session, kind=kind, key=key, message=message[:500])
    except IntegrityError:
        return False
    realtime.session_updated_on_commit(session.owner_id, session.pk)
    if kind == Kind.WARNING:  # each warning point is an "ending soon" mail, keyed the same
        notify.mail_on_commit(session, kind=notify.ENDING, key=key)
    return True


def _stop(session: ComputeSession, reason: EndReason) -> bool:
    """Stop ``session`` for ``reason``. ``session_stop`` claims the change with the conditional
    UPDATE, so of two workers stopping one session only one records it; the other finds it
    stopping already. False if the session had ended meanwhile."""
    if session.state not in ACTIVE:
        return False
    try:
        session_stop(session=session, reason=reason)
    except Conflict:
        return False
    return True


def _closes_for(session: ComputeSession, now: dt.datetime) -> dt.datetime | None:
    return availability.lab_closes_at(session.machine.lab_id, now)


def _running(session_id: int) -> ComputeSession | None:
    return (
        ComputeSession.objects.select_related("machine", "owner")
        .filter(pk=session_id, state=SessionState.RUNNING)
        .first()
    )


# --- expiry and the lab's closing time ---------------------------------------------------------


def session_enforce_lease(*, session_id: int, now: dt.datetime) -> bool:
    """Stop a running session past its lease (``expired``) or whose lab has closed
    (``window_closed``). Returns True if it is stopping now."""
    session = _running(session_id)
    return session is not None and _enforce_lease(session, now, _closes_for(session, now))


def _enforce_lease(session: ComputeSession, now: dt.datetime, closes: dt.datetime | None) -> bool:
    if closes is None:
        # The lease is clipped to the close, so at the close the lab's hours are the reason.
        return _stop(session, EndReason.WINDOW_CLOSED)
    if session.expires_at <= now:
        expired_at = session.expires_at
        if not _stop(session, EndReason.EXPIRED):
            return False
        # Lease enforcement lag: from the expiry to the stop on its way to the agent (the
        # stop command is sent when this transaction commits).
        transaction.on_commit(
            lambda: metrics.LEASE_LAG.observe(
                max(0.0, (timezone.now() - expired_at).total_seconds())
            )
        )
        return True
    return False


def sweep_expiry(*, now: dt.datetime | None = None) -> int:
    now = now or timezone.now()
    closes = availability.closing_times(now)
    closed = [lab_id for lab_id, until in closes.items() if until is None]
    ids = ComputeSession.objects.filter(state=SessionState.RUNNING).filter(
        Q(expires_at__lte=now) | Q(machine__lab_id__in=closed)
    )
    stopped = 0
    for session_id, lab_id in ids.values_list("pk", "machine__lab_id"):
        session = _running(session_id)  # re-read: another worker may have stopped it
        if session is not None:
            stopped += _enforce_lease(session, now, closes.get(lab_id))
    return stopped


# --- warnings before the lease ends -------------------------------------------------------------


def session_warn_lease_end(*, session_id: int, now: dt.datetime) -> bool:
    """Warn the owner before the session ends, once per warning point.

    If the lab closes before (or when) the lease ends, one warning
    NEXCOMPUTE_WINDOW_WARNING_MINUTES before the close; otherwise one per point of
    NEXCOMPUTE_EXPIRY_WARNINGS_MINUTES, keyed by the expiry so that an extension earns fresh
    warnings. A point already passed when a later one is due is skipped, not sent late.
    """
    session = _running(session_id)
    return session is not None and _warn_lease_end(session, now, _closes_for(session, now))


def _warn_lease_end(session: ComputeSession, now: dt.datetime, closes: dt.datetime | None) -> bool:
    if closes is None:
        return False  # closed now: the expiry sweep stops it
    if closes <= session.expires_at:
        if closes - now > _minutes(settings.NEXCOMPUTE_WINDOW_WARNING_MINUTES):
            return False
        return event_once(
            session=session,
            key=f"window:{int(closes.timestamp())}",
            message=(
                f"The lab closes at {_hhmm(closes, session)} (in {_in_minutes(closes - now)}); "
                "your session will be stopped then. Save your work."
            ),
        )
    remaining = session.expires_at - now
    if remaining <= dt.timedelta(0):
        return False
    due = [
        point
        for point in settings.NEXCOMPUTE_EXPIRY_WARNINGS_MINUTES
        if remaining <= _minutes(point)
    ]
    if not due:
        return False
    point = min(due)
    return event_once(
        session=session,
        key=f"expiry:{point:g}:{int(session.expires_at.timestamp())}",
        message=(
            f"Your session ends in {_in_minutes(remaining)}, at "
            f"{_hhmm(session.expires_at, session)}. Extend it or save your work."
        ),
    )


def sweep_warnings(*, now: dt.datetime | None = None) -> int:
    now = now or timezone.now()
    closes = availability.closing_times(now)
    lead = max(
        [settings.NEXCOMPUTE_WINDOW_WARNING_MINUTES, *settings.NEXCOMPUTE_EXPIRY_WARNINGS_MINUTES]
    )
    window_lead = _minutes(settings.NEXCOMPUTE_WINDOW_WARNING_MINUTES)
    closing_soon = [i for i, c in closes.items() if c is not None and c - now <= window_lead]
    ids = ComputeSession.objects.filter(state=SessionState.RUNNING, expires_at__gt=now).filter(
        Q(expires_at__lte=now + _minutes(lead)) | Q(machine__lab_id__in=closing_soon)
    )
    sent = 0
    for session_id, lab_id in ids.values_list("pk", "machine__lab_id"):
        session = _running(session_id)
        if session is not None:
            sent += _warn_lease_end(session, now, closes.get(lab_id))
    return sent


# --- idle --------------------------------------------------------------------------------------


def idle_rule_text() -> str:
    """The idle rule in one line for the session card (docs/policy.md, "What counts as
    activity")."""
    idle = settings.NEXCOMPUTE_IDLE_MINUTES
    if idle <= 0:
        return "Sessions are never stopped for being idle."
    wait = f"{round(idle)} min" if idle >= 1 else f"{max(1, round(idle * 60))} s"
    return (
        f"Stopped after {wait} idle: no typing or clicks in Jupyter Lab, no cell running, no "
        "terminal input and almost no CPU use. An open tab alone is idle; a running program "
        "is not."
    )


def _idle_since(session: ComputeSession) -> dt.datetime:
    assert session.started_at is not None
    if session.last_activity is None:
        return session.started_at
    return max(session.last_activity, session.started_at)


def session_enforce_idle(*, session_id: int, now: dt.datetime) -> str:
    """Warn a running session idle for NEXCOMPUTE_IDLE_MINUTES less the warning lead; stop it
    (``idle``) once idle for the full time and warned. Activity is the agent's
    ``last_activity``: the latest of a kernel executing, terminal input, the student's own
    interaction in Lab and the session's CPU use above a threshold (the agent's rule,
    docs/policy.md "Idle"); a busy kernel counts as active now. An open tab, its polling and
    open connections are not activity. Returns "warned", "stopped" or ""."""
    idle = settings.NEXCOMPUTE_IDLE_MINUTES
    if idle <= 0:
        return ""
    session = _running(session_id)
    if session is None or session.started_at is None or session.kernels_busy > 0:
        return ""
    if session.last_activity is None:
        return ""  # the agent has not reported the session's activity: never guess "idle"
    since = _idle_since(session)
    stop_at = since + _minutes(idle)
    warn_at = stop_at - _minutes(min(settings.NEXCOMPUTE_IDLE_WARNING_MINUTES, idle))
    if now < warn_at or stop_at >= session.expires_at:
        return ""  # not idle long enough, or the lease ends first (its warnings cover it)
    # Keyed by the start of this idle spell: activity starts a new spell and a new warning.
    key = f"idle:{int(since.timestamp())}"
    warned = event_once(
        session=session,
        key=key,
        message=(
            f"Your session has been idle since {_hhmm(since, session)}; it will be stopped at "
            f"{_hhmm(max(stop_at, now), session)} unless you use it (run a cell, open a notebook)."
        ),
    )
    if warned:
        return "warned"  # warn first; a later sweep stops
    if now >= stop_at:
        return "stopped" if _stop(session, EndReason.IDLE) else ""
    return ""


def sweep_idle(*, now: dt.datetime | None = None) -> int:
    now = now or timezone.now()
    idle = settings.NEXCOMPUTE_IDLE_MINUTES
    if idle <= 0:
        return 0
    lead = min(settings.NEXCOMPUTE_IDLE_WARNING_MINUTES, idle)
    cutoff = now - _minutes(idle - lead)
    ids = (
        ComputeSession.objects.filter(
            state=SessionState.RUNNING,
            kernels_busy=0,
            started_at__isnull=False,
            last_activity__isnull=False,
        )
        .annotate(since=Greatest(Coalesce("last_activity", "started_at"), F("started_at")))
        .filter(since__lte=cutoff)
        .values_list("pk", flat=True)
    )
    return sum(bool(session_enforce_idle(session_id=i, now=now)) for i in ids)


# --- the machine's owner returned --------------------------------------------------------------


def _presence_key(machine_id: int) -> str:
    """One key per spell of presence: the event that recorded the owner's arrival."""
    arrived = (
        MachineEvent.objects.filter(machine_id=machine_id, kind="owner_present")
        .order_by("-at", "-pk")
        .values_list("pk", flat=True)
        .first()
    )
    return f"owner:{arrived or 0}"


def _owner_warning(session: ComputeSession, key: str) -> bool:
    grace = settings.NEXCOMPUTE_OWNER_GRACE_MINUTES
    return event_once(
        session=session,
        key=key,
        message=(
            f"Someone sat down at {session.machine.name}; your session will be stopped in "
            f"{_in_minutes(_minutes(grace))}, at "
            f"{_hhmm(timezone.now() + _minutes(grace), session)}. Save your work."
        ),
    )


def session_owner_returned(*, machine_id: int) -> int:
    """The agent reports the machine's owner at the keyboard: warn the machine's live session at
    once. The stop follows after NEXCOMPUTE_OWNER_GRACE_MINUTES (``sweep_owner_returned``).
    Returns how many sessions were warned (0 if already warned)."""
    key = _presence_key(machine_id)
    sessions = ComputeSession.objects.select_related("machine").filter(
        machine_id=machine_id, state__in=ACTIVE
    )
    return sum(_owner_warning(s, key) for s in sessions)


def session_enforce_owner_returned(*, session_id: int, now: dt.datetime) -> bool:
    """Stop a session whose owner-present warning is older than the grace while the owner is
    still there (warning first, if the agent link's hook missed it). True if stopped now."""
    session = (
        ComputeSession.objects.select_related("machine", "owner")
        .filter(pk=session_id, state__in=ACTIVE, machine__owner_present=True)
        .first()
    )
    if session is None:
        return False
    key = _presence_key(session.machine_id)
    if _owner_warning(session, key):
        return False
    warned_at = SessionEvent.objects.filter(session=session, key=key).values_list("at", flat=True)
    at = warned_at.first()
    if at is None or now - at < _minutes(settings.NEXCOMPUTE_OWNER_GRACE_MINUTES):
        return False
    return _stop(session, EndReason.OWNER_RETURNED)


def sweep_owner_returned(*, now: dt.datetime | None = None) -> int:
    now = now or timezone.now()
    ids = ComputeSession.objects.filter(state__in=ACTIVE, machine__owner_present=True).values_list(
        "pk", flat=True
    )
    return sum(session_enforce_owner_returned(session_id=i, now=now) for i in ids)


# --- offline machines --------------------------------------------------------------------------


def sweep_lost(*, now: dt.datetime | None = None) -> int:
    """Sessions on a machine offline longer than NEXCOMPUTE_AGENT_LOST_MINUTES end as
    ``agent_lost``; the wipe is demanded again when the agent returns (``reconcile``)."""
    now = now or timezone.now()
    cutoff = now - _minutes(settings.NEXCOMPUTE_AGENT_LOST_MINUTES)
    # ``last_seen`` is written when the socket closes, so it is when the machine went offline.
    sessions = ComputeSession.objects.select_related("machine", "owner").filter(
        Q(machine__last_seen__lte=cutoff) | Q(machine__last_seen__isnull=True),
        state__in=LIVE,
        machine__status=MachineStatus.OFFLINE,
    )
    return sum(_end_lost(s) for s in sessions)


def _end_lost(session: ComputeSession) -> bool:
    if session.state != SessionState.STOPPING:
        return session_agent_lost(session=session)
    # Already stopping for another reason (the user, expiry...): that stays the reason. The
    # wipe is still owed and demanded when the agent returns (``ComputeSession.objects.unwiped``).
    return transition(
        session,
        SessionState.ENDED,
        reason=session.end_reason,
        message=(
            "The lab computer went offline before confirming the wipe; it is wiped when it "
            "comes back."
        ),
        ended_at=timezone.now(),
        jupyter_url="",
        jupyter_token="",
    )


# --- cleanup enforcement -----------------------------------------------------------------------


def _stopping_since(session: ComputeSession) -> dt.datetime | None:
    return (
        SessionEvent.objects.filter(
            session=session, kind=Kind.STATE, to_state=SessionState.STOPPING
        )
        .order_by("-at")
        .values_list("at", flat=True)
        .first()
    )


def staff_notify(*, subject: str, body: str) -> None:
    """E-mail staff (active staff users with an address, and ADMINS), after commit."""
    recipients = set(
        User.objects.filter(is_staff=True, is_active=True)
        .exclude(email="")
        .values_list("email", flat=True)
    ) | {addr for _, addr in settings.ADMINS}
    if not recipients:
        log.warning("no staff e-mail address to tell: %s", subject)
        return

    def send() -> None:
        try:
            send_mail(f"[NexCompute] {subject}", body, settings.SERVER_EMAIL, sorted(recipients))
        except Exception:  # the MachineEvent in admin still tells staff
            log.exception("could not e-mail staff: %s", subject)

    transaction.on_commit(send)


def session_enforce_cleanup(*, session_id: int, now: dt.datetime) -> str:
    """A session in ``stopping`` without a receipt: re-send the stop every
    NEXCOMPUTE_CLEANUP_RESEND_SECONDS (each resend recorded once); past
    NEXCOMPUTE_CLEANUP_QUARANTINE_SECONDS quarantine the machine, tell staff and end the
    session (the wipe is still demanded when the agent reconnects). Returns "resent",
    "quarantined" or ""."""
    session = (
        ComputeSession.objects.select_related("machine__lab", "owner")
        .filter(pk=session_id, state=SessionState.STOPPING, cleanup_finished_at__isnull=True)
        .first()
    )
    if session is None:
        return ""
    since = _stopping_since(session)
    if since is None:
        return ""
    waited = (now - since).total_seconds()
    machine: Machine = session.machine
    if waited >= settings.NEXCOMPUTE_CLEANUP_QUARANTINE_SECONDS:
        minutes = f"{settings.NEXCOMPUTE_CLEANUP_QUARANTINE_SECONDS / 60:g}"
        with transaction.atomic():
            # The transition is the claim: one worker quarantines, tells staff, ends it.
            if not transition(
                session,
                SessionState.ENDED,
                reason=session.end_reason,
                message=(
                    f"The machine did not confirm the wipe within {minutes} min; it was taken "
                    "out of service and staff were told."
                ),
                ended_at=now,
                jupyter_url="",
                jupyter_token="",
            ):
                return ""
            machine_quarantine(
                machine=machine,
                message=f"no cleanup receipt for session {session.pk} after {minutes} min",
            )
            staff_notify(
                subject=f"machine {machine.name} quarantined",
                body=(
                    f"Session {session.pk} of {session.owner} on {machine.name} "
                    f"(lab {machine.lab}) was told to stop at "
                    f"{since:%Y-%m-%d %H:%M:%S} UTC, and the machine has not confirmed the wipe "
                    f"within {minutes} min. The machine is quarantined: check it, then enable "
                    f"it again in admin.\n\n{settings.NEXCOMPUTE_PUBLIC_URL}/admin/machines/"
                    f"machine/{machine.pk}/change/\n"
                ),
            )
        return "quarantined"
    resend = settings.NEXCOMPUTE_CLEANUP_RESEND_SECONDS
    if waited < resend:
        return ""
    nth = int(waited // resend)
    with transaction.atomic():
        if not event_once(
            session=session,
            key=f"cleanup:resend:{nth}",
            kind=Kind.PROGRESS,
            message="The machine has not confirmed the wipe yet; the stop was sent again.",
        ):
            return ""
        stop = agent_events.session_stop(session.pk, session.end_reason)
        agent_events.send_on_commit(machine.pk, stop)
    return "resent"


def sweep_cleanup(*, now: dt.datetime | None = None) -> int:
    now = now or timezone.now()
    first = min(
        settings.NEXCOMPUTE_CLEANUP_RESEND_SECONDS, settings.NEXCOMPUTE_CLEANUP_QUARANTINE_SECONDS
    )
    since = (
        SessionEvent.objects.filter(
            session=OuterRef("pk"), kind=Kind.STATE, to_state=SessionState.STOPPING
        )
        .order_by("-at")
        .values("at")[:1]
    )
    # An offline machine cannot answer a resend; its session ends as agent_lost instead.
    ids = (
        ComputeSession.objects.filter(state=SessionState.STOPPING, cleanup_finished_at__isnull=True)
        .exclude(machine__status=MachineStatus.OFFLINE)
        .annotate(since=Subquery(since))
        .filter(since__lte=now - dt.timedelta(seconds=first))
        .values_list("pk", flat=True)
    )
    return sum(bool(session_enforce_cleanup(session_id=i, now=now)) for i in ids)


# --- starts that never finish, wipes that never came -------------------------------------------


def session_enforce_start(*, session_id: int, now: dt.datetime) -> str:
    """A session still requested/starting after NEXCOMPUTE_START_RESEND_SECONDS gets its start
    sent again (once; the agent answers a duplicate with ``ready``); after
    NEXCOMPUTE_START_TIMEOUT_SECONDS it fails (``start_failed``) and the machine is wiped.
    Returns "resent", "failed" or ""."""
    session = (
        ComputeSession.objects.select_related("machine", "owner")
        .filter(pk=session_id, state__in=[SessionState.REQUESTED, SessionState.STARTING])
        .first()
    )
    if session is None or session.machine.status == MachineStatus.OFFLINE:
        return ""  # an offline machine's sessions end as agent_lost instead
    age = (now - session.created_at).total_seconds()
    if age >= settings.NEXCOMPUTE_START_TIMEOUT_SECONDS:
        with transaction.atomic():
            if not session_mark_failed(
                session=session, error="the machine did not start Jupyter Lab in time"
            ):
                return ""
            stop = agent_events.session_stop(session.pk, StopReason.START_FAILED)
            agent_events.send_on_commit(session.machine_id, stop)
        return "failed"
    if age >= settings.NEXCOMPUTE_START_RESEND_SECONDS and event_once(
        session=session,
        key="start-resend",
        kind=Kind.PROGRESS,
        message="The machine is slow to start; asking it again.",
    ):
        agent_events.send_on_commit(session.machine_id, agent_events.session_start(session.pk))
        return "resent"
    return ""


def _wipe_owed(machine_id: int, now: dt.datetime) -> int:
    """Ask an online machine again for wipes of ended sessions that have no receipt."""
    period = settings.NEXCOMPUTE_CLEANUP_RESEND_SECONDS
    asked = 0
    for session in ComputeSession.objects.unwiped(machine_id).select_related("owner"):
        ended = session.ended_at or session.created_at
        rounds = int((now - ended).total_seconds() // period)
        if rounds >= 1 and event_once(
            session=session,
            key=f"wipe-resend:{rounds}",
            kind=Kind.PROGRESS,
            message="Asking the machine again to confirm the wipe.",
        ):
            stop = agent_events.session_stop(session.pk, StopReason.WIPE)
            agent_events.send_on_commit(machine_id, stop)
            asked += 1
    return asked


def sweep_starts(*, now: dt.datetime | None = None) -> int:
    now = now or timezone.now()
    cutoff = now - dt.timedelta(
        seconds=min(
            settings.NEXCOMPUTE_START_RESEND_SECONDS, settings.NEXCOMPUTE_START_TIMEOUT_SECONDS
        )
    )
    ids = ComputeSession.objects.filter(
        state__in=[SessionState.REQUESTED, SessionState.STARTING], created_at__lte=cutoff
    ).values_list("pk", flat=True)
    done = sum(bool(session_enforce_start(session_id=i, now=now)) for i in ids)
    cleaning = Machine.objects.filter(status=MachineStatus.CLEANING).values_list("pk", flat=True)
    return done + sum(_wipe_owed(machine_id, now) for machine_id in cleaning)
