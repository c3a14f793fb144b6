"""The lease policy with real processes: a Celery worker (two in the race test) and Celery beat
on real Redis (not eager mode), against the test database, with policy periods of seconds.

Sessions are put into ``running`` with the services; no real agent is needed. For the owner's
return a fake agent speaks the protocol over a real websocket to daphne.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db.models import Count
from django.utils import timezone
from websockets.sync.client import ClientConnection, connect

from accounts.models import User
from machines.models import AvailabilityWindow, Machine, MachineEvent, MachineStatus
from machines.services import enrollment_token_create, lab_get_or_create, machine_enroll
from nexcompute_agent import protocol
from sessions.models import ComputeSession, SessionEvent
from sessions.services import (
    session_mark_running,
    session_record_activity,
    session_request,
    session_stop,
)
from sessions.states import EndReason, SessionState
from tests.factories import AGENT_SPECS, MachineFactory, UserFactory
from tests.procs import ProcessSet, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def policy_env(tmp_path: Path, period: float = 0.5) -> dict[str, str]:
    """Seconds instead of minutes: every rule fires within a few seconds."""
    beat = {
        f"NEXCOMPUTE_BEAT_{name}_SECONDS": str(period)
        for name in (
            "EXPIRE_SESSIONS",
            "LEASE_WARNINGS",
            "IDLE_SESSIONS",
            "OWNER_RETURNED",
            "LOST_SESSIONS",
            "STUCK_CLEANUPS",
        )
    }
    return {
        **beat,
        "NEXCOMPUTE_EXPIRY_WARNINGS_MINUTES": "0.05,0.025",  # 3 s and 1.5 s before the end
        "NEXCOMPUTE_IDLE_MINUTES": "0.06",  # 3.6 s
        "NEXCOMPUTE_IDLE_WARNING_MINUTES": "0.03",  # warned 1.8 s before
        "NEXCOMPUTE_OWNER_GRACE_MINUTES": "0.05",  # 3 s
        "NEXCOMPUTE_AGENT_LOST_MINUTES": "0.05",
        "NEXCOMPUTE_WINDOW_WARNING_MINUTES": "0.05",
        "NEXCOMPUTE_CLEANUP_RESEND_SECONDS": "1",
        "NEXCOMPUTE_CLEANUP_QUARANTINE_SECONDS": "3",
        "EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend",
        "EMAIL_FILE_PATH": str(tmp_path / "mail"),
    }


@pytest.fixture
def enforcer(procs: ProcessSet, live_env: dict[str, str], tmp_path: Path) -> Iterator[ProcessSet]:
    """One worker and one beat with the short policy."""
    live_env.update(policy_env(tmp_path))
    procs.celery_worker("worker")
    procs.celery_beat(tmp_path / "beat-schedule")
    yield procs


def running(
    user: User, machine: Machine | None = None, seconds: float = 3600, busy: bool = True
) -> ComputeSession:
    """A running session; ``busy`` (a kernel computing) keeps the idle rule out of the way."""
    machine = machine or MachineFactory()
    session = session_request(user=user, machine_id=machine.pk, duration_minutes=60)
    assert session_mark_running(session=session, url="http://pc/lab")
    session_record_activity(
        session=session, last_activity=timezone.now(), kernels_busy=int(busy), connections=1
    )
    # Leases are asked for in whole minutes; these tests need seconds.
    expires = min(timezone.now() + dt.timedelta(seconds=seconds), session.expires_at)
    ComputeSession.objects.filter(pk=session.pk).update(expires_at=expires)
    session.refresh_from_db()
    return session


def state_of(session: ComputeSession) -> str:
    return ComputeSession.objects.get(pk=session.pk).state


def stop_events(session: ComputeSession) -> list[SessionEvent]:
    return list(session.events.filter(kind="state", to_state=SessionState.STOPPING))


def warning_keys(session: ComputeSession) -> list[str]:
    return list(session.events.filter(kind="warning").exclude(key="").values_list("key", flat=True))


def test_it_expires_a_lease_within_5_s_and_warns_once_per_point(
    enforcer: ProcessSet, owner: User
) -> None:
    session = running(owner, seconds=5)

    wait_for(lambda: state_of(session) == SessionState.STOPPING, timeout=15, what="expiry")
    stop = stop_events(session)
    assert len(stop) == 1
    assert stop[0].reason == EndReason.EXPIRED
    assert stop[0].at - session.expires_at < dt.timedelta(seconds=5)
    time.sleep(1.5)  # more sweeps run: nothing is sent or stopped again
    keys = sorted(warning_keys(session))
    assert [k.split(":")[1] for k in keys] == ["0.025", "0.05"]
    assert len(stop_events(session)) == 1


def test_it_warns_then_stops_an_idle_session(enforcer: ProcessSet, owner: User) -> None:
    session = running(owner, busy=False)  # an open tab (connections) but nothing running
    session_record_activity(
        session=session, last_activity=timezone.now(), kernels_busy=0, connections=3
    )

    wait_for(lambda: state_of(session) == SessionState.STOPPING, timeout=15, what="idle stop")
    session.refresh_from_db()
    assert session.end_reason == EndReason.IDLE
    idle = session.events.get(key__startswith="idle:")
    assert idle.at < stop_events(session)[0].at
    time.sleep(1)
    assert len(warning_keys(session)) == 1


def test_it_warns_then_stops_at_the_labs_close(enforcer: ProcessSet, owner: User) -> None:
    now = timezone.now()
    closes = (now + dt.timedelta(seconds=5)).replace(microsecond=0)
    # Put the lab in a fixed-offset zone where it is around noon now, so that a window from an
    # hour ago to 5 s ahead never crosses local midnight, whenever the test runs.
    offset = 12 - now.hour  # hours east of UTC, -11..12
    zone = "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"  # Etc signs are inverted
    machine = MachineFactory()
    machine.lab.timezone = zone
    machine.lab.save(update_fields=["timezone"])
    local_now = now.astimezone(zoneinfo.ZoneInfo(zone))
    local_closes = closes.astimezone(zoneinfo.ZoneInfo(zone))
    assert local_closes.date() == (local_now - dt.timedelta(hours=1)).date()
    AvailabilityWindow.objects.create(
        lab=machine.lab,
        weekday=local_now.weekday(),
        start=(local_now - dt.timedelta(hours=1)).time().replace(microsecond=0),
        end=local_closes.time(),
    )
    session = running(owner, machine)
    assert session.expires_at == closes

    wait_for(lambda: state_of(session) == SessionState.STOPPING, timeout=15, what="window close")
    session.refresh_from_db()
    assert session.end_reason == EndReason.WINDOW_CLOSED
    assert stop_events(session)[0].at - closes < dt.timedelta(seconds=5)
    time.sleep(1)
    assert [k.split(":")[0] for k in warning_keys(session)] == ["window"]


def test_a_session_on_an_offline_machine_ends_as_agent_lost(
    enforcer: ProcessSet, owner: User
) -> None:
    from machines.services import machine_disconnected

    session = running(owner)
    machine_disconnected(machine_id=session.machine_id, reason="agent disconnected (1006)")
    gone = timezone.now()

    wait_for(lambda: state_of(session) == SessionState.ENDED, timeout=15, what="agent_lost")
    session.refresh_from_db()
    assert session.end_reason == EndReason.AGENT_LOST
    assert session.ended_at is not None
    assert session.ended_at - gone >= dt.timedelta(seconds=3)


def test_a_stuck_stop_is_resent_then_the_machine_quarantined(
    enforcer: ProcessSet, owner: User, staff: User, tmp_path: Path
) -> None:
    staff.email = "staff@uni.example"
    staff.save(update_fields=["email"])
    session = running(owner)
    session_stop(session=session, reason=EndReason.USER)

    wait_for(
        lambda: Machine.objects.get(pk=session.machine_id).status == MachineStatus.QUARANTINED,
        timeout=15,
        what="quarantine",
    )
    resends = list(session.events.filter(key__startswith="cleanup:resend:"))
    assert 1 <= len(resends) <= 2  # resent each second after the first, until 3 s
    assert len({e.key for e in resends}) == len(resends)
    quarantined = MachineEvent.objects.filter(machine_id=session.machine_id, kind="quarantine")
    assert quarantined.count() == 1
    assert state_of(session) == SessionState.ENDED
    mails = wait_for(lambda: list((tmp_path / "mail").glob("*.log")), timeout=5, what="mail")
    text = "".join(m.read_text() for m in mails)
    assert "staff@uni.example" in text
    assert "quarantined" in text


# --- the owner returns: a fake agent over a real websocket ----------------------------------------


def beat(ws: ClientConnection, owner_present: bool) -> None:
    ws.send(
        json.dumps(
            {
                "type": "heartbeat",
                "metrics": {"cpu_percent": 1.0, "memory_percent": 10.0},
                "owner_present": owner_present,
            }
        )
    )


def drain(ws: ClientConnection) -> list[dict[str, Any]]:
    frames = []
    while True:
        try:
            frames.append(json.loads(ws.recv(timeout=0.05)))
        except TimeoutError:
            return frames


def test_owner_returned_warns_at_once_and_stops_after_the_grace(
    procs: ProcessSet, live_env: dict[str, str], tmp_path: Path, owner: User
) -> None:
    live_env.update(policy_env(tmp_path))
    _, port = procs.daphne()
    procs.celery_worker("worker")
    procs.celery_beat(tmp_path / "beat-schedule")
    _, token = enrollment_token_create(lab=lab_get_or_create(name="Lab W"))
    machine, credential = machine_enroll(token=token, hostname="pc-w")

    with connect(
        f"ws://127.0.0.1:{port}/ws/agent/",
        additional_headers={"Authorization": f"Bearer {credential}"},
    ) as ws:
        hello = {
            "type": "hello",
            "protocol_version": protocol.PROTOCOL_VERSION,
            "agent_version": "0.1.0",
            "hostname": "pc-w",
            "specs": AGENT_SPECS,
            "sessions": [],
            "owner_present": False,
        }
        ws.send(json.dumps(hello))
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        wait_for(lambda: Machine.objects.get(pk=machine.pk).status == MachineStatus.AVAILABLE)
        session = running(owner, Machine.objects.get(pk=machine.pk))

        beat(ws, owner_present=True)  # someone sits down at the keyboard
        warned = wait_for(
            lambda: session.events.filter(key__startswith="owner:").first(),
            timeout=5,
            what="owner warning",
        )

        def stopped() -> bool:
            beat(ws, owner_present=True)  # the agent keeps beating; the owner stays
            drain(ws)
            return state_of(session) == SessionState.STOPPING

        wait_for(stopped, timeout=15, interval=0.3, what="owner_returned stop")
        session.refresh_from_db()
        assert session.end_reason == EndReason.OWNER_RETURNED
        stop = stop_events(session)
        assert len(stop) == 1
        assert stop[0].at - warned.at >= dt.timedelta(seconds=3)  # the grace
        assert len(warning_keys(session)) == 1

        # The agent wipes and reports; the machine is not offered while the owner is there.
        receipt = {
            "type": "session.receipt",
            "session_id": session.pk,
            "verified": True,
            "files_removed": 2,
            "bytes_removed": 10,
            "processes_killed": 1,
            "duration_seconds": 0.1,
        }
        ws.send(json.dumps(receipt))
        wait_for(
            lambda: Machine.objects.get(pk=machine.pk).status == MachineStatus.OWNER_PRESENT,
            timeout=5,
            what="owner_present",
        )
        assert state_of(session) == SessionState.ENDED


# --- two workers, one beat ------------------------------------------------------------------------


def test_two_workers_never_stop_a_session_twice_nor_warn_twice(
    procs: ProcessSet, live_env: dict[str, str], tmp_path: Path
) -> None:
    live_env.update(policy_env(tmp_path, period=0.1))
    # At DEBUG: "succeeded in" is one of Celery's routine lines, hidden at INFO.
    live_env["LOG_LEVEL"] = "DEBUG"
    worker_a = procs.celery_worker("worker-a", "--loglevel=DEBUG")
    worker_b = procs.celery_worker("worker-b", "--loglevel=DEBUG")
    procs.celery_beat(tmp_path / "beat-schedule")
    sessions = [
        running(UserFactory(), seconds=4 + (i % 10) * 0.3)
        for i in range(40)  # expiries spread over 3 s: sweeps overlap on both workers
    ]

    wait_for(
        lambda: not ComputeSession.objects.filter(state=SessionState.RUNNING).exists(),
        timeout=30,
        what="all expired",
    )
    time.sleep(1.5)  # let more overlapping sweeps run

    per_session = dict(
        SessionEvent.objects.filter(kind="state", to_state=SessionState.STOPPING)
        .values_list("session_id")
        .annotate(n=Count("pk"))
    )
    assert per_session == {s.pk: 1 for s in sessions}
    cleaning = (
        MachineEvent.objects.filter(kind="cleaning")
        .values("machine_id")
        .annotate(n=Count("pk"))
        .filter(n__gt=1)
    )
    assert not cleaning.exists()
    warnings = (
        SessionEvent.objects.filter(kind="warning")
        .exclude(key="")
        .values("session_id", "key")
        .annotate(n=Count("pk"))
    )
    assert warnings.count() >= len(sessions)  # at least the last point for each
    assert all(w["n"] == 1 for w in warnings)
    assert ComputeSession.objects.filter(end_reason=EndReason.EXPIRED).count() == len(sessions)
    # Both workers did the work.
    for worker in (worker_a, worker_b):
        assert "sessions.tasks.expire_sessions" in worker.log()
        assert "succeeded" in worker.log()
