"""Quotas, policies and lab hours, as a student meets them through the API."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import time_machine
from django.test import Client

from accounts.models import User
from machines.models import AvailabilityWindow, ClosedDate, Lab, Machine, MachineStatus
from sessions.models import ComputeSession
from sessions.services import session_mark_running, session_request
from sessions.states import SessionState
from tests.factories import LabFactory, MachineFactory, SessionFactory, default_policy_with

pytestmark = pytest.mark.django_db

MONDAY_10 = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)  # a Monday morning


@pytest.fixture(autouse=True)
def frozen_clock() -> Iterator[time_machine.Coordinates]:
    with time_machine.travel(MONDAY_10, tick=False) as traveller:
        yield traveller


def post(client: Client, url: str, body: Any) -> Any:
    return client.post(url, body, content_type="application/json")


def hours(lab: Lab, weekday: int, start: str, end: str) -> None:
    AvailabilityWindow.objects.create(
        lab=lab, weekday=weekday, start=dt.time.fromisoformat(start), end=dt.time.fromisoformat(end)
    )


def running(user: User, **kwargs: Any) -> ComputeSession:
    session = session_request(user=user, **kwargs)
    assert session_mark_running(session=session, url="http://pc/lab")
    return session


# --- lab hours ---------------------------------------------------------------------------------


def test_it_refuses_a_request_outside_the_labs_hours(owner_client: Client) -> None:
    machine = MachineFactory()
    hours(machine.lab, 0, "12:00", "18:00")

    response = post(owner_client, "/api/sessions", {})
    assert response.status_code == 409  # nothing open fits
    response = post(owner_client, "/api/sessions", {"machine_id": machine.pk})

    assert response.status_code == 403
    assert "closed now" in response.json()["detail"]
    assert not ComputeSession.objects.exists()


def test_it_refuses_a_request_on_a_closed_date(owner_client: Client) -> None:
    machine = MachineFactory()
    ClosedDate.objects.create(lab=machine.lab, date=MONDAY_10.date(), reason="exams")

    response = post(owner_client, "/api/sessions", {"machine_id": machine.pk})

    assert response.status_code == 403
    assert "outside its hours" in response.json()["detail"]


def test_it_clips_the_lease_to_the_window_close(owner_client: Client) -> None:
    machine = MachineFactory()
    hours(machine.lab, 0, "08:00", "11:00")

    response = post(owner_client, "/api/sessions", {"duration_minutes": 120})

    assert response.status_code == 201, response.content
    assert response.json()["expires_at"] == "2026-03-02T11:00:00Z"
    session = ComputeSession.objects.get()
    assert session.duration_minutes == 120
    warning = session.events.get(kind="warning")
    assert "11:00" in warning.message


def test_it_states_the_closing_time_of_a_lab_in_another_zone_in_its_zone(
    owner_client: Client, owner: User
) -> None:
    machine = MachineFactory(lab=LabFactory(name="Berlin lab", timezone="Europe/Berlin"))
    hours(machine.lab, 0, "08:00", "12:00")  # 07:00-11:00 UTC in March

    response = post(owner_client, "/api/sessions", {"duration_minutes": 120})

    assert response.json()["expires_at"] == "2026-03-02T11:00:00Z"
    warning = ComputeSession.objects.get().events.get(kind="warning")
    assert "12:00 CET" in warning.message  # the lab's time, its zone named
    session = ComputeSession.objects.get()
    session_mark_running(session=session, url="http://pc/lab")
    refused = extend(owner_client, session, {"minutes": 30})
    assert refused.status_code == 409
    assert "12:00 CET" in refused.json()["detail"]


def test_it_does_not_clip_a_lease_that_ends_before_closing(owner_client: Client) -> None:
    machine = MachineFactory()
    hours(machine.lab, 0, "08:00", "18:00")

    response = post(owner_client, "/api/sessions", {"duration_minutes": 60})

    assert response.json()["expires_at"] == "2026-03-02T11:00:00Z"
    assert not ComputeSession.objects.get().events.filter(kind="warning").exists()


def test_it_picks_a_machine_in_an_open_lab(owner_client: Client) -> None:
    closed = MachineFactory(lab=LabFactory(name="Night lab"))
    hours(closed.lab, 0, "20:00", "00:00")
    open_ = MachineFactory()

    response = post(owner_client, "/api/sessions", {})

    assert response.json()["machine"]["id"] == open_.pk


# --- quotas ------------------------------------------------------------------------------------


def test_it_refuses_more_concurrent_sessions_than_the_quota(
    owner_client: Client, owner: User
) -> None:
    MachineFactory.create_batch(3)
    default_policy_with(max_concurrent_sessions=2)
    assert post(owner_client, "/api/sessions", {}).status_code == 201
    assert post(owner_client, "/api/sessions", {}).status_code == 201

    response = post(owner_client, "/api/sessions", {})

    assert response.status_code == 403
    assert response.json()["detail"] == "quota reached: 2 of 2 concurrent sessions in use"


def test_a_stopping_session_still_counts_and_an_ended_one_does_not(
    owner_client: Client, owner: User
) -> None:
    MachineFactory.create_batch(2)
    SessionFactory(owner=owner, state=SessionState.STOPPING)
    assert post(owner_client, "/api/sessions", {}).status_code == 403

    ComputeSession.objects.update(state=SessionState.ENDED)
    assert post(owner_client, "/api/sessions", {}).status_code == 201


def test_it_refuses_a_session_over_the_weekly_hours(owner_client: Client, owner: User) -> None:
    MachineFactory()
    default_policy_with(max_hours_per_week=20)
    SessionFactory(
        owner=owner,
        state=SessionState.ENDED,
        started_at=MONDAY_10 - dt.timedelta(hours=9),  # Monday 01:00
        ended_at=MONDAY_10 - dt.timedelta(hours=1),
    )
    SessionFactory(  # last week's 100 hours do not count
        owner=owner,
        state=SessionState.ENDED,
        started_at=MONDAY_10 - dt.timedelta(days=7),
        ended_at=MONDAY_10 - dt.timedelta(days=3),
    )
    default_policy_with(max_hours_per_week=10)

    response = post(owner_client, "/api/sessions", {"duration_minutes": 180})

    assert response.status_code == 403
    detail = response.json()["detail"]
    assert "weekly quota" in detail
    assert "8.0 h of 10 h" in detail
    assert post(owner_client, "/api/sessions", {"duration_minutes": 120}).status_code == 201


def test_it_refuses_a_session_longer_than_the_policy_allows(owner_client: Client) -> None:
    MachineFactory()
    default_policy_with(max_session_minutes=90)

    response = post(owner_client, "/api/sessions", {"duration_minutes": 91})

    assert response.status_code == 403
    assert response.json()["detail"] == "session length 91 min exceeds your limit of 90 min"


def test_it_refuses_a_gpu_when_the_policy_forbids_it(owner_client: Client) -> None:
    gpu = MachineFactory(gpu_count=1)
    MachineFactory()
    default_policy_with(allow_gpu=False)

    asked = post(owner_client, "/api/sessions", {"requirements": {"gpu": True}})
    named = post(owner_client, "/api/sessions", {"machine_id": gpu.pk})

    assert (asked.status_code, named.status_code) == (403, 403)
    assert "GPU" in asked.json()["detail"]
    assert "GPU" in named.json()["detail"]
    # Without asking, the GPU machine is not even a candidate.
    response = post(owner_client, "/api/sessions", {})
    assert response.status_code == 201
    assert response.json()["machine"]["id"] != gpu.pk


def test_it_keeps_students_to_the_labs_their_policy_names(owner_client: Client) -> None:
    allowed = LabFactory(name="Allowed lab")
    forbidden = MachineFactory(lab=LabFactory(name="Staff lab"))
    default_policy_with().labs.set([allowed])

    named = post(owner_client, "/api/sessions", {"machine_id": forbidden.pk})
    any_ = post(owner_client, "/api/sessions", {})

    assert named.status_code == 403
    assert "Staff lab" in named.json()["detail"]
    assert any_.status_code == 409  # the only free machine is not theirs to take
    machine = MachineFactory(lab=allowed)
    assert post(owner_client, "/api/sessions", {}).json()["machine"]["id"] == machine.pk


# --- requirements and explicit machines --------------------------------------------------------


def test_it_honours_memory_and_gpu_requirements(owner_client: Client) -> None:
    default_policy_with(max_concurrent_sessions=5)
    small = MachineFactory(memory_bytes=8 * 1024**3)
    big = MachineFactory(memory_bytes=64 * 1024**3)
    gpu = MachineFactory(gpu_count=2)

    too_big = post(owner_client, "/api/sessions", {"requirements": {"min_memory_gb": 100}})
    assert too_big.status_code == 409
    # None is that big, busy or not: waiting would not help, and the answer says so.
    assert too_big.json()["detail"] == "no machine in your labs has 100 GB of memory or more"
    got_big = post(owner_client, "/api/sessions", {"requirements": {"min_memory_gb": 32}})
    assert got_big.json()["machine"]["id"] == big.pk
    got_gpu = post(owner_client, "/api/sessions", {"requirements": {"gpu": True}})
    assert got_gpu.json()["machine"]["id"] == gpu.pk
    assert post(owner_client, "/api/sessions", {}).json()["machine"]["id"] == small.pk


def test_an_explicit_busy_machine_is_a_conflict(owner_client: Client) -> None:
    machine = MachineFactory(status=MachineStatus.BUSY)

    response = post(owner_client, "/api/sessions", {"machine_id": machine.pk})

    assert response.status_code == 409
    assert machine.name in response.json()["detail"]


def test_an_explicit_unknown_machine_is_not_found(owner_client: Client) -> None:
    response = post(owner_client, "/api/sessions", {"machine_id": 424242})

    assert response.status_code == 404
    assert response.json() == {"detail": "no such machine: 424242"}


def test_an_explicit_free_machine_is_given(owner_client: Client) -> None:
    MachineFactory()
    wanted = MachineFactory()

    response = post(owner_client, "/api/sessions", {"machine_id": wanted.pk})

    assert response.status_code == 201
    assert response.json()["machine"] == {"id": wanted.pk, "name": wanted.name}


# --- extend ------------------------------------------------------------------------------------


def extend(client: Client, session: ComputeSession, body: Any) -> Any:
    return post(client, f"/api/sessions/{session.pk}/extend", body)


def test_it_extends_a_running_session_within_policy(owner_client: Client, owner: User) -> None:
    MachineFactory()
    session = running(owner, duration_minutes=60)

    response = extend(owner_client, session, {"minutes": 30})

    assert response.status_code == 200, response.content
    assert response.json()["expires_at"] == "2026-03-02T11:30:00Z"
    session.refresh_from_db()
    assert session.expires_at == MONDAY_10 + dt.timedelta(minutes=90)
    extended = session.events.filter(kind="progress", message__contains="extended by 30 min")
    assert extended.count() == 1


def test_it_refuses_to_extend_past_the_maximum_lifetime(owner_client: Client, owner: User) -> None:
    MachineFactory()
    default_policy_with(max_session_minutes=120)
    session = running(owner, duration_minutes=100)

    response = extend(owner_client, session, {"minutes": 30})

    assert response.status_code == 409
    assert "at most 120 min" in response.json()["detail"]
    assert extend(owner_client, session, {"minutes": 20}).status_code == 200


def test_it_refuses_to_extend_past_the_window_close(owner_client: Client, owner: User) -> None:
    machine = MachineFactory()
    hours(machine.lab, 0, "08:00", "11:30")
    session = running(owner, duration_minutes=60)

    response = extend(owner_client, session, {"minutes": 45})

    assert response.status_code == 409
    assert "closes" in response.json()["detail"]
    session.refresh_from_db()
    assert session.expires_at == MONDAY_10 + dt.timedelta(hours=1)


def test_it_refuses_to_extend_past_the_weekly_hours(owner_client: Client, owner: User) -> None:
    MachineFactory()
    default_policy_with(max_hours_per_week=2)
    session = running(owner, duration_minutes=60)

    response = extend(owner_client, session, {"minutes": 90})

    assert response.status_code == 409
    assert "weekly quota" in response.json()["detail"]


def test_it_refuses_to_extend_a_session_that_is_not_running(
    owner_client: Client, owner: User
) -> None:
    MachineFactory()
    session = session_request(user=owner)

    response = extend(owner_client, session, {"minutes": 10})

    assert response.status_code == 409
    assert "only a running session" in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"minutes": 0},
        {"minutes": -5},
        {"minutes": 100000},
        {"minutes": "ten"},
        {"minutes": 1.5},
        {"minutes": 10, "extra": 1},
        [10],
        "10",
        None,
    ],
)
def test_it_refuses_a_bad_extend_body(owner_client: Client, owner: User, body: Any) -> None:
    MachineFactory()
    session = running(owner)

    response = extend(owner_client, session, body)

    assert response.status_code == 400
    assert response.json()["detail"]


def test_another_students_session_cannot_be_extended(other_client: Client, owner: User) -> None:
    MachineFactory()
    session = running(owner)
    before = session.expires_at

    response = extend(other_client, session, {"minutes": 10})

    assert response.status_code == 404
    assert response.json() == {"detail": "no such session"}
    session.refresh_from_db()
    assert session.expires_at == before


def test_extending_moves_time_for_quota_purposes(
    owner_client: Client, owner: User, frozen_clock: time_machine.Coordinates
) -> None:
    MachineFactory()
    default_policy_with(max_session_minutes=240)
    session = running(owner, duration_minutes=60)
    frozen_clock.shift(dt.timedelta(minutes=50))

    response = extend(owner_client, session, {"minutes": 60})

    assert response.status_code == 200
    assert response.json()["expires_at"] == "2026-03-02T12:00:00Z"
    assert machine_status(session) == MachineStatus.BUSY


def machine_status(session: ComputeSession) -> str:
    return Machine.objects.get(pk=session.machine_id).status
