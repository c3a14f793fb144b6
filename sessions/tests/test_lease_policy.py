"""The lease policy with a controlled clock: the beat's tasks are called directly (not eager
mode, no worker) while time-machine moves time."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import time_machine
from django.core import mail
from django.test import Client

from accounts.models import User
from machines.models import AvailabilityWindow, ClosedDate, Machine, MachineEvent, MachineStatus
from machines.services import machine_disconnected, machine_set_owner_present
from sessions import policy, tasks
from sessions.models import ComputeSession, SessionEvent
from sessions.occupancy import reconcile
from sessions.services import (
    hours_used_this_week,
    lease_extend,
    session_mark_running,
    session_record_activity,
    session_request,
    session_stop,
)
from sessions.states import EndReason, SessionState
from tests.factories import MachineFactory, SessionFactory, record_receipt

pytestmark = pytest.mark.django_db

MONDAY_10 = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def clock() -> Iterator[time_machine.Coordinates]:
    with time_machine.travel(MONDAY_10, tick=False) as traveller:
        yield traveller


@pytest.fixture(autouse=True)
def policy_defaults(settings: Any) -> None:
    settings.NEXCOMPUTE_EXPIRY_WARNINGS_MINUTES = [10.0, 2.0]
    settings.NEXCOMPUTE_IDLE_MINUTES = 60.0
    settings.NEXCOMPUTE_IDLE_WARNING_MINUTES = 10.0
    settings.NEXCOMPUTE_OWNER_GRACE_MINUTES = 10.0
    settings.NEXCOMPUTE_AGENT_LOST_MINUTES = 5.0
    settings.NEXCOMPUTE_WINDOW_WARNING_MINUTES = 10.0
    settings.NEXCOMPUTE_CLEANUP_RESEND_SECONDS = 120.0
    settings.NEXCOMPUTE_CLEANUP_QUARANTINE_SECONDS = 600.0


@pytest.fixture(autouse=True)
def _in_memory_layer(in_memory_layer: None) -> None:
    """Every test here uses the in-process channel layer (fixture in conftest.py)."""


def running(user: User, machine: Machine | None = None, minutes: int = 60) -> ComputeSession:
    machine = machine or MachineFactory()
    session = session_request(user=user, machine_id=machine.pk, duration_minutes=minutes)
    assert session_mark_running(session=session, url="http://pc/lab")
    # The agent reports Jupyter's activity right after `ready` (idle is never guessed).
    session_record_activity(
        session=session, last_activity=session.started_at, kernels_busy=0, connections=0
    )
    session.refresh_from_db()
    return session


def reload(session: ComputeSession) -> ComputeSession:
    session.refresh_from_db()
    return session


def warnings(session: ComputeSession) -> list[SessionEvent]:
    return list(session.events.filter(kind=SessionEvent.Kind.WARNING).exclude(key=""))


def stops(session: ComputeSession) -> list[SessionEvent]:
    return list(session.events.filter(kind=SessionEvent.Kind.STATE, to_state=SessionState.STOPPING))


def at(minutes: float) -> dt.datetime:
    return MONDAY_10 + dt.timedelta(minutes=minutes)


# --- expiry ------------------------------------------------------------------------------------


def test_it_expires_a_lease_at_expires_at(owner: User, clock: time_machine.Coordinates) -> None:
    session = running(owner, minutes=60)
    clock.move_to(at(59.9))
    assert tasks.expire_sessions() == 0
    assert reload(session).state == SessionState.RUNNING

    clock.move_to(at(60))
    assert tasks.expire_sessions() == 1
    assert tasks.expire_sessions() == 0  # run again (overlap, redelivery): nothing more

    session = reload(session)
    assert session.state == SessionState.STOPPING
    assert session.end_reason == EndReason.EXPIRED
    assert [e.reason for e in stops(session)] == ["expired"]
    assert stops(session)[0].message == "The session reached the end of its lease."
    assert Machine.objects.get(pk=session.machine_id).status == MachineStatus.CLEANING


def test_an_extended_lease_is_not_expired(owner: User, clock: time_machine.Coordinates) -> None:
    session = running(owner, minutes=60)
    clock.move_to(at(50))
    lease_extend(session=session, minutes=30)
    clock.move_to(at(60))

    assert tasks.expire_sessions() == 0
    assert reload(session).state == SessionState.RUNNING


# --- warnings before the end ------------------------------------------------------------------


def test_it_warns_once_at_each_point(owner: User, clock: time_machine.Coordinates) -> None:
    session = running(owner, minutes=60)
    clock.move_to(at(49))
    assert tasks.send_lease_warnings() == 0

    clock.move_to(at(50))
    assert tasks.send_lease_warnings() == 1
    assert tasks.send_lease_warnings() == 0  # the same point again: already sent
    clock.move_to(at(55))
    assert tasks.send_lease_warnings() == 0
    clock.move_to(at(58))
    assert tasks.send_lease_warnings() == 1
    assert tasks.send_lease_warnings() == 0

    sent = warnings(session)
    assert [w.message for w in sent] == [
        "Your session ends in 10 min, at 11:00 UTC. Extend it or save your work.",
        "Your session ends in 2 min, at 11:00 UTC. Extend it or save your work.",
    ]


def test_an_extension_earns_fresh_warnings(owner: User, clock: time_machine.Coordinates) -> None:
    session = running(owner, minutes=60)
    clock.move_to(at(51))
    assert tasks.send_lease_warnings() == 1
    lease_extend(session=session, minutes=30)
    clock.move_to(at(81))
    assert tasks.send_lease_warnings() == 1
    assert len(warnings(session)) == 2


def test_a_point_already_passed_is_not_sent_late(
    owner: User, clock: time_machine.Coordinates
) -> None:
    session = running(owner, minutes=60)
    clock.move_to(at(59))
    tasks.send_lease_warnings()
    tasks.send_lease_warnings()
    assert [w.key.split(":")[:2] for w in warnings(session)] == [["expiry", "2"]]


def test_warnings_show_in_the_api_timeline(
    owner: User, owner_client: Client, clock: time_machine.Coordinates
) -> None:
    session = running(owner, minutes=60)
    clock.move_to(at(50))
    tasks.send_lease_warnings()
    clock.move_to(at(60))
    tasks.expire_sessions()

    events = owner_client.get(f"/api/sessions/{session.pk}/events").json()
    kinds = [(e["kind"], e["state"]) for e in events]
    assert kinds[-2:] == [("warning", None), ("state", "stopping")]
    assert events[-2]["message"].startswith("Your session ends in 10 min")
    body = owner_client.get(f"/api/sessions/{session.pk}").json()
    assert body["end_reason"] == "expired"
    assert body["end_reason_text"] == "The session reached the end of its lease."


# --- idle --------------------------------------------------------------------------------------


def test_it_warns_then_stops_an_idle_session(owner: User, clock: time_machine.Coordinates) -> None:
    session = running(owner, minutes=240)
    clock.move_to(at(5))
    # An open tab (a connection) is not activity; Jupyter's last_activity is.
    session_record_activity(session=session, last_activity=at(5), kernels_busy=0, connections=2)

    clock.move_to(at(54))
    assert tasks.stop_idle_sessions() == 0
    clock.move_to(at(55))
    assert tasks.stop_idle_sessions() == 1
    assert tasks.stop_idle_sessions() == 0
    assert len(warnings(session)) == 1
    assert "idle since 10:05 UTC" in warnings(session)[0].message
    assert "stopped at 11:05 UTC" in warnings(session)[0].message

    clock.move_to(at(64))
    assert tasks.stop_idle_sessions() == 0
    clock.move_to(at(65))
    assert tasks.stop_idle_sessions() == 1
    session = reload(session)
    assert session.state == SessionState.STOPPING
    assert session.end_reason == EndReason.IDLE
    assert len(stops(session)) == 1


def test_activity_after_the_warning_keeps_the_session(
    owner: User, clock: time_machine.Coordinates
) -> None:
    session = running(owner, minutes=240)
    clock.move_to(at(50))
    assert tasks.stop_idle_sessions() == 1  # idle since the start
    session_record_activity(session=session, last_activity=at(52), kernels_busy=0, connections=1)
    clock.move_to(at(65))
    assert tasks.stop_idle_sessions() == 0
    assert reload(session).state == SessionState.RUNNING


def test_a_busy_kernel_is_not_idle(owner: User, clock: time_machine.Coordinates) -> None:
    """A long computation with the tab closed: no connection, but a kernel is busy."""
    session = running(owner, minutes=240)
    session_record_activity(session=session, last_activity=at(0), kernels_busy=1, connections=0)
    clock.move_to(at(120))
    assert tasks.stop_idle_sessions() == 0
    assert not warnings(session)
    assert reload(session).state == SessionState.RUNNING


def test_idle_stop_can_be_turned_off(
    owner: User, settings: Any, clock: time_machine.Coordinates
) -> None:
    settings.NEXCOMPUTE_IDLE_MINUTES = 0
    session = running(owner, minutes=240)
    clock.move_to(at(200))
    assert tasks.stop_idle_sessions() == 0
    assert reload(session).state == SessionState.RUNNING


# --- the lab's closing time ---------------------------------------------------------------------


def test_it_warns_then_stops_at_the_labs_close(
    owner: User, clock: time_machine.Coordinates
) -> None:
    machine = MachineFactory()
    AvailabilityWindow.objects.create(lab=machine.lab, weekday=0, start=dt.time(8), end=dt.time(11))
    session = running(owner, machine, minutes=120)
    assert session.expires_at == at(60)  # clipped to the close

    clock.move_to(at(49))
    assert tasks.send_lease_warnings() == 0
    clock.move_to(at(50))
    assert tasks.send_lease_warnings() == 1
    clock.move_to(at(58))
    assert tasks.send_lease_warnings() == 0  # the close's warning stands in for the lease's
    assert [w.message for w in warnings(session)] == [
        (
            "The lab closes at 11:00 UTC (in 10 min); your session will be stopped then. "
            "Save your work."
        )
    ]

    clock.move_to(at(60))
    assert tasks.expire_sessions() == 1
    session = reload(session)
    assert session.end_reason == EndReason.WINDOW_CLOSED
    assert stops(session)[0].message == "The lab closed for the day."


def test_a_closure_added_meanwhile_stops_the_session(
    owner: User, clock: time_machine.Coordinates
) -> None:
    machine = MachineFactory()
    session = running(owner, machine, minutes=240)
    ClosedDate.objects.create(lab=machine.lab, date=MONDAY_10.date(), reason="power cut")

    assert tasks.expire_sessions() == 1
    assert reload(session).end_reason == EndReason.WINDOW_CLOSED


# --- the machine's owner returns ----------------------------------------------------------------


def test_owner_returned_warns_at_once_and_stops_after_the_grace(
    owner: User, clock: time_machine.Coordinates
) -> None:
    session = running(owner, minutes=240)
    clock.move_to(at(30))
    machine_set_owner_present(machine_id=session.machine_id, present=True)
    # What the agent link's on_owner_presence hook calls.
    assert policy.session_owner_returned(machine_id=session.machine_id) == 1
    assert policy.session_owner_returned(machine_id=session.machine_id) == 0
    assert len(warnings(session)) == 1
    assert "stopped in 10 min, at 10:40 UTC" in warnings(session)[0].message

    clock.move_to(at(39))
    assert tasks.enforce_owner_returned() == 0
    clock.move_to(at(40))
    assert tasks.enforce_owner_returned() == 1
    assert tasks.enforce_owner_returned() == 0
    session = reload(session)
    assert session.end_reason == EndReason.OWNER_RETURNED
    assert len(stops(session)) == 1

    # After the wipe the machine is not offered while the owner is there.
    record_receipt(session, files_removed=1, bytes_removed=1)
    assert Machine.objects.get(pk=session.machine_id).status == MachineStatus.OWNER_PRESENT


def test_the_sweep_warns_if_the_hook_was_missed(
    owner: User, clock: time_machine.Coordinates
) -> None:
    session = running(owner, minutes=240)
    machine_set_owner_present(machine_id=session.machine_id, present=True)
    clock.move_to(at(30))
    assert tasks.enforce_owner_returned() == 0  # warns now, stops only after the grace
    assert len(warnings(session)) == 1
    clock.move_to(at(40))
    assert tasks.enforce_owner_returned() == 1


def test_an_owner_who_leaves_within_the_grace_keeps_the_session(
    owner: User, clock: time_machine.Coordinates
) -> None:
    session = running(owner, minutes=240)
    machine_set_owner_present(machine_id=session.machine_id, present=True)
    policy.session_owner_returned(machine_id=session.machine_id)
    clock.move_to(at(5))
    machine_set_owner_present(machine_id=session.machine_id, present=False)
    clock.move_to(at(20))
    assert tasks.enforce_owner_returned() == 0
    assert reload(session).state == SessionState.RUNNING


# --- offline machines --------------------------------------------------------------------------


def test_a_session_on_a_machine_offline_past_the_grace_is_lost(
    owner: User, clock: time_machine.Coordinates
) -> None:
    session = running(owner, minutes=240)
    clock.move_to(at(10))
    machine_disconnected(machine_id=session.machine_id, reason="agent disconnected (1006)")

    clock.move_to(at(14.9))
    assert tasks.end_lost_sessions() == 0
    clock.move_to(at(15))
    assert tasks.end_lost_sessions() == 1
    assert tasks.end_lost_sessions() == 0
    session = reload(session)
    assert session.state == SessionState.ENDED
    assert session.end_reason == EndReason.AGENT_LOST

    # When the agent returns, the wipe is demanded again.
    commands = reconcile(machine_id=session.machine_id, agent_sessions=[])
    assert {"type": "agent.session_stop", "session_id": session.pk, "reason": "wipe"} in commands


def test_a_stopping_session_on_a_lost_machine_keeps_its_reason(
    owner: User, clock: time_machine.Coordinates
) -> None:
    session = running(owner, minutes=240)
    session_stop(session=session, reason=EndReason.USER)
    machine_disconnected(machine_id=session.machine_id, reason="agent disconnected (1006)")
    clock.move_to(at(5))
    assert tasks.end_lost_sessions() == 1
    session = reload(session)
    assert (session.state, session.end_reason) == (SessionState.ENDED, EndReason.USER)
    assert {"type": "agent.session_stop", "session_id": session.pk, "reason": "wipe"} in reconcile(
        machine_id=session.machine_id, agent_sessions=[]
    )


def test_a_session_the_restarted_agent_took_back_keeps_running(
    owner: User, clock: time_machine.Coordinates
) -> None:
    session = running(owner, minutes=240)
    machine_disconnected(machine_id=session.machine_id, reason="agent disconnected (1006)")
    clock.move_to(at(1))
    commands = reconcile(machine_id=session.machine_id, agent_sessions=[session.pk])
    assert commands == []
    session = reload(session)
    assert (session.state, session.jupyter_url) == (SessionState.RUNNING, "http://pc/lab")
    # Its tunnel was opened again with a new name: the second `ready` gives the new URL.
    assert session_mark_running(session=session, url="https://new.trycloudflare.com/lab")
    assert reload(session).jupyter_url == "https://new.trycloudflare.com/lab"
    assert reload(session).state == SessionState.RUNNING
    assert not session_mark_running(session=session, url="https://new.trycloudflare.com/lab")


def test_a_session_the_restarted_agent_could_not_take_back_waits_for_its_reason(
    owner: User, other: User
) -> None:
    """Told `ended` in hello, the server neither ends it as lost nor stops it: the agent's
    `session.failed` and receipt that follow end it as crashed."""
    session = running(owner, minutes=240)
    commands = reconcile(machine_id=session.machine_id, agent_sessions=[], ended=[session.pk])
    assert commands == []
    assert reload(session).state == SessionState.RUNNING
    # The attack on the old behaviour: without the `ended` ref it would be lost at once.
    lost = running(other, minutes=240)
    reconcile(machine_id=lost.machine_id, agent_sessions=[])
    assert reload(lost).end_reason == EndReason.AGENT_LOST


# --- cleanup enforcement -----------------------------------------------------------------------


def test_a_stuck_stop_is_resent_then_the_machine_quarantined(
    owner: User,
    staff: User,
    clock: time_machine.Coordinates,
    django_capture_on_commit_callbacks: Any,
) -> None:
    staff.email = "staff@uni.example"
    staff.save(update_fields=["email"])
    session = running(owner, minutes=240)
    session_stop(session=session, reason=EndReason.USER)

    clock.move_to(MONDAY_10 + dt.timedelta(seconds=119))
    assert tasks.enforce_cleanups() == 0
    clock.move_to(MONDAY_10 + dt.timedelta(seconds=120))
    with django_capture_on_commit_callbacks() as callbacks:
        assert tasks.enforce_cleanups() == 1
        assert tasks.enforce_cleanups() == 0  # recorded once per resend
    assert callbacks  # the stop goes to the agent after commit
    clock.move_to(MONDAY_10 + dt.timedelta(seconds=240))
    assert tasks.enforce_cleanups() == 1
    resends = session.events.filter(key__startswith="cleanup:resend:")
    assert resends.count() == 2

    clock.move_to(MONDAY_10 + dt.timedelta(seconds=600))
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.enforce_cleanups() == 1
    assert tasks.enforce_cleanups() == 0

    machine = Machine.objects.get(pk=session.machine_id)
    assert machine.status == MachineStatus.QUARANTINED
    assert "no cleanup receipt" in machine.quarantine_reason
    assert MachineEvent.objects.filter(machine=machine, kind="quarantine").count() == 1
    session = reload(session)
    assert session.state == SessionState.ENDED
    assert session.end_reason == EndReason.USER
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["staff@uni.example"]
    assert machine.name in mail.outbox[0].subject
    # The wipe is still owed: demanded again when the agent reconnects.
    assert {"type": "agent.session_stop", "session_id": session.pk, "reason": "wipe"} in reconcile(
        machine_id=machine.pk, agent_sessions=[]
    )


def test_a_receipt_in_time_stops_enforcement(owner: User, clock: time_machine.Coordinates) -> None:
    session = running(owner, minutes=240)
    session_stop(session=session, reason=EndReason.USER)
    clock.move_to(MONDAY_10 + dt.timedelta(seconds=60))
    record_receipt(session, files_removed=3, bytes_removed=10, processes_killed=1)
    clock.move_to(MONDAY_10 + dt.timedelta(seconds=900))
    assert tasks.enforce_cleanups() == 0
    assert Machine.objects.get(pk=session.machine_id).status == MachineStatus.AVAILABLE


# --- weekly hours from the event rows ------------------------------------------------------------


def test_weekly_hours_are_counted_from_the_event_rows(
    owner: User, clock: time_machine.Coordinates
) -> None:
    session = running(owner, minutes=60)
    clock.move_to(at(30))
    session_stop(session=session, reason=EndReason.USER)  # running for 30 min
    clock.move_to(at(40))  # stopping (wiping) time is not running time
    record_receipt(session)
    clock.move_to(at(90))
    second = running(owner, minutes=60)
    clock.move_to(at(105))
    assert hours_used_this_week(owner, at(105)) == pytest.approx(0.75)
    assert second.state == SessionState.RUNNING
    # A row that claims to have run but has no running events counts nothing.
    ComputeSession.objects.filter(pk=session.pk).update(started_at=at(-600))
    assert hours_used_this_week(owner, at(105)) == pytest.approx(0.75)


def test_weekly_hours_clip_a_session_that_began_last_week(
    owner: User, clock: time_machine.Coordinates
) -> None:
    monday = dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
    SessionFactory(
        owner=owner,
        state=SessionState.ENDED,
        started_at=monday - dt.timedelta(hours=3),
        ended_at=monday + dt.timedelta(hours=2),
    )
    assert hours_used_this_week(owner, MONDAY_10) == pytest.approx(2)
