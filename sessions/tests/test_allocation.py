"""Allocation and the session life cycle, at the service layer."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import time_machine
from django.contrib.auth.models import Group

from accounts.models import QuotaPolicy, User
from machines.models import Machine, MachineEvent, MachineStatus
from nexcompute.errors import BadRequest, Conflict, NotFound
from sessions.models import ComputeSession, SessionEvent
from sessions.occupancy import transition
from sessions.services import (
    Requirements,
    hours_used_this_week,
    session_mark_failed,
    session_mark_running,
    session_request,
    session_stop,
    week_start,
)
from sessions.states import EndReason, SessionState
from tests.factories import LabFactory, MachineFactory, SessionFactory, default_policy_with

pytestmark = pytest.mark.django_db


def test_it_reserves_a_free_machine_and_records_both_sides(owner: User, machine: Machine) -> None:
    session = session_request(user=owner)

    assert (session.state, session.owner, session.machine) == (
        SessionState.REQUESTED,
        owner,
        machine,
    )
    assert session.duration_minutes == 120  # NEXCOMPUTE_DEFAULT_SESSION_MINUTES
    machine.refresh_from_db()
    assert machine.status == MachineStatus.RESERVED
    event = session.events.get()
    assert (event.kind, event.to_state, event.actor) == ("state", "requested", owner)
    reserved = MachineEvent.objects.get(machine=machine, kind="reserved", actor=owner)
    assert (reserved.from_status, reserved.to_status) == ("available", "reserved")


def test_the_default_length_never_exceeds_the_policy(owner: User, machine: Machine) -> None:
    default_policy_with(max_session_minutes=45)

    assert session_request(user=owner).duration_minutes == 45


@pytest.mark.parametrize(
    "fields",
    [
        {"status": MachineStatus.BUSY},
        {"status": MachineStatus.OFFLINE},
        {"status": MachineStatus.CLEANING},
        {"status": MachineStatus.QUARANTINED},
        {"status": MachineStatus.OWNER_PRESENT},
        {"enabled": False},
        {"draining": True},
    ],
)
def test_it_never_allocates_a_machine_that_is_not_free(owner: User, fields: dict[str, Any]) -> None:
    MachineFactory(**fields)

    with pytest.raises(Conflict, match="no free machine"):
        session_request(user=owner)
    assert not ComputeSession.objects.exists()


def test_it_keeps_gpu_machines_for_those_who_ask(owner: User) -> None:
    gpu = MachineFactory(gpu_count=1)
    plain = MachineFactory()

    assert session_request(user=owner).machine == plain
    default_policy_with(max_concurrent_sessions=2)
    assert session_request(user=owner, requirements=Requirements(gpu=True)).machine == gpu


def test_it_filters_by_memory_and_lab(owner: User) -> None:
    default_policy_with(max_concurrent_sessions=5)
    small = MachineFactory(memory_bytes=8 * 1024**3)
    big = MachineFactory(memory_bytes=64 * 1024**3)
    elsewhere = MachineFactory(lab=LabFactory(name="Annex"))

    assert session_request(user=owner, requirements=Requirements(min_memory_gb=32)).machine == big
    with pytest.raises(Conflict):
        session_request(user=owner, requirements=Requirements(min_memory_gb=65))
    assert session_request(user=owner, requirements=Requirements(lab="Annex")).machine == elsewhere
    assert session_request(user=owner).machine == small


def test_it_refuses_a_non_positive_duration(owner: User, machine: Machine) -> None:
    with pytest.raises(BadRequest):
        session_request(user=owner, duration_minutes=-5)


def test_it_answers_not_found_for_an_unknown_machine(owner: User) -> None:
    with pytest.raises(NotFound):
        session_request(user=owner, machine_id=987654)


def test_group_policies_combine_to_the_most_generous(owner: User, machine: Machine) -> None:
    group = Group.objects.create(name="thesis")
    QuotaPolicy.objects.create(name="thesis", group=group, max_session_minutes=600)
    owner.groups.add(group)

    assert session_request(user=owner, duration_minutes=600).duration_minutes == 600


def test_a_requested_session_on_an_offline_machine_ends_at_once(
    owner: User, machine: Machine
) -> None:
    session = session_request(user=owner)
    Machine.objects.filter(pk=machine.pk).update(status=MachineStatus.OFFLINE)

    session_stop(session=session, reason=EndReason.USER, actor=owner)

    session.refresh_from_db()
    assert (session.state, session.end_reason) == (SessionState.ENDED, "user")
    assert session.ended_at is not None
    assert session.events.last().actor == owner  # type: ignore[union-attr]
    machine.refresh_from_db()
    assert machine.status == MachineStatus.OFFLINE  # it comes back through the agent's hello


def test_a_requested_session_on_an_online_machine_is_wiped_first(
    owner: User, machine: Machine
) -> None:
    session = session_request(user=owner)

    session_stop(session=session, reason=EndReason.USER, actor=owner)

    session.refresh_from_db()
    assert session.state == SessionState.STOPPING
    machine.refresh_from_db()
    assert machine.status == MachineStatus.CLEANING


def test_a_running_session_goes_to_stopping_and_its_machine_to_cleaning(
    owner: User, machine: Machine
) -> None:
    session = session_request(user=owner)
    assert transition(session, SessionState.STARTING)
    assert session_mark_running(session=session, url="http://pc/lab?token=t")

    session_stop(session=session, reason=EndReason.ADMIN)

    session.refresh_from_db()
    assert (session.state, session.end_reason, session.jupyter_url) == (
        SessionState.STOPPING,
        "admin",
        "",
    )
    machine.refresh_from_db()
    assert machine.status == MachineStatus.CLEANING
    # Asking again is harmless; asking after the end is a conflict.
    assert session_stop(session=session, reason=EndReason.USER).state == SessionState.STOPPING
    transition(session, SessionState.ENDED)
    with pytest.raises(Conflict, match="already ended"):
        session_stop(session=session, reason=EndReason.USER)


def test_running_sets_the_lease_url_and_machine_busy(owner: User, machine: Machine) -> None:
    with time_machine.travel(dt.datetime(2026, 3, 2, 10, tzinfo=dt.UTC), tick=False):
        session = session_request(user=owner, duration_minutes=30)
        token = session.jupyter_token
        assert session_mark_running(session=session, url="http://pc:8888/lab")

    session.refresh_from_db()
    assert session.state == SessionState.RUNNING
    assert session.started_at == dt.datetime(2026, 3, 2, 10, tzinfo=dt.UTC)
    assert session.expires_at == dt.datetime(2026, 3, 2, 10, 30, tzinfo=dt.UTC)
    assert (session.jupyter_url, session.jupyter_token) == ("http://pc:8888/lab", token)
    assert list(session.events.values_list("to_state", flat=True)) == [
        "requested",
        "starting",
        "running",
    ]
    machine.refresh_from_db()
    assert machine.status == MachineStatus.BUSY


def test_a_failed_start_ends_the_session_and_sends_the_machine_to_cleaning(
    owner: User, machine: Machine
) -> None:
    session = session_request(user=owner)
    transition(session, SessionState.STARTING)

    assert session_mark_failed(session=session, error="jupyter not found")

    session.refresh_from_db()
    assert (session.state, session.end_reason) == (SessionState.FAILED, "start_failed")
    assert "jupyter not found" in session.events.last().message  # type: ignore[union-attr]
    machine.refresh_from_db()
    assert machine.status == MachineStatus.CLEANING


def test_week_start_is_monday_midnight_utc() -> None:
    sunday_night = dt.datetime(2026, 3, 8, 23, 59, tzinfo=dt.UTC)
    assert week_start(sunday_night) == dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
    assert week_start(dt.datetime(2026, 3, 9, tzinfo=dt.UTC)) == dt.datetime(
        2026, 3, 9, tzinfo=dt.UTC
    )


def test_hours_used_count_only_this_weeks_running_time(owner: User) -> None:
    now = dt.datetime(2026, 3, 4, 12, tzinfo=dt.UTC)  # Wednesday
    monday = dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
    # 2 h before the week began (not counted) and 1 h after.
    SessionFactory(
        owner=owner,
        state=SessionState.ENDED,
        started_at=monday - dt.timedelta(hours=2),
        ended_at=monday + dt.timedelta(hours=1),
    )
    SessionFactory(
        owner=owner,
        state=SessionState.ENDED,
        started_at=now - dt.timedelta(days=9),
        ended_at=now - dt.timedelta(days=8),
    )  # last week
    SessionFactory(
        owner=owner, state=SessionState.RUNNING, started_at=now - dt.timedelta(minutes=30)
    )
    SessionFactory(owner=owner, state=SessionState.REQUESTED)  # never started: nothing used

    assert hours_used_this_week(owner, now) == pytest.approx(1.5)


def test_a_live_session_keeps_its_machine_from_another_request(owner: User, other: User) -> None:
    machine = MachineFactory()
    session_request(user=owner)
    # Even if the status were wrongly reset, the database refuses a second live session.
    Machine.objects.filter(pk=machine.pk).update(status=MachineStatus.AVAILABLE)

    with pytest.raises(Conflict):
        session_request(user=other)
    assert ComputeSession.objects.filter(machine=machine).count() == 1
    assert SessionEvent.objects.count() == 1


def test_marking_running_a_stale_copy_of_a_session_stopped_meanwhile_reports_false(
    owner: User, machine: Machine
) -> None:
    session = session_request(user=owner)
    stale = ComputeSession.objects.get(pk=session.pk)
    session_stop(session=session, reason=EndReason.USER)  # the machine is online: stopping

    assert session_mark_running(session=stale, url="http://pc/lab") is False

    stale.refresh_from_db()
    assert (stale.state, stale.jupyter_url) == (SessionState.STOPPING, "")


def test_marking_running_a_stale_copy_that_another_process_started_still_runs_it(
    owner: User, machine: Machine
) -> None:
    session = session_request(user=owner)
    stale = ComputeSession.objects.get(pk=session.pk)
    assert transition(session, SessionState.STARTING)

    assert session_mark_running(session=stale, url="http://pc/lab") is True

    stale.refresh_from_db()
    assert stale.state == SessionState.RUNNING
