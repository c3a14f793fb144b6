"""Lost or reordered agent messages never leave a session or a machine stuck."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import time_machine

from accounts.models import User
from machines.models import Machine, MachineStatus
from sessions import policy
from sessions.models import ComputeSession, SessionEvent
from sessions.services import (
    session_mark_running,
    session_request,
    session_stop,
)
from sessions.states import EndReason, SessionState
from tests.factories import MachineFactory, record_receipt

pytestmark = pytest.mark.django_db

START = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _in_memory_layer(in_memory_layer: None) -> None:
    """Every test here uses the in-process channel layer (fixture in conftest.py)."""


@pytest.fixture
def clock() -> Iterator[time_machine.Coordinates]:
    with time_machine.travel(START, tick=False) as traveller:
        yield traveller


def receipt(session: ComputeSession, verified: bool = True) -> None:
    record_receipt(
        session, verified=verified, files_removed=3, bytes_removed=30, processes_killed=1
    )


def test_a_receipt_for_a_session_still_thought_alive_ends_it(owner: User) -> None:
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)
    session_mark_running(session=session, url="http://x/lab?token=t")

    receipt(session)  # the agent restarted and wiped it before any stop

    session.refresh_from_db()
    machine.refresh_from_db()
    assert (session.state, session.end_reason) == (SessionState.ENDED, EndReason.AGENT_LOST)
    assert session.jupyter_url == "" and session.jupyter_token == ""
    assert machine.status == MachineStatus.AVAILABLE


def test_any_receipt_ends_a_stopping_session_even_a_second_one(owner: User) -> None:
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)
    receipt(session)  # an early receipt while requested: ends it as lost
    session.refresh_from_db()
    assert session.state == SessionState.ENDED
    # A new session on the machine, stopped, gets its receipt: it ends, never stuck.
    second = session_request(user=owner, machine_id=machine.pk)
    session_mark_running(session=second, url="http://x/lab?token=t")
    session_stop(session=second, reason=EndReason.USER)
    ComputeSession.objects.filter(pk=second.pk).update(cleanup_finished_at=START)
    receipt(second)
    second.refresh_from_db()
    assert second.state == SessionState.ENDED


def test_a_start_that_never_finishes_is_resent_once_then_fails(
    owner: User, clock: time_machine.Coordinates, settings: Any
) -> None:
    settings.NEXCOMPUTE_START_RESEND_SECONDS = 90
    settings.NEXCOMPUTE_START_TIMEOUT_SECONDS = 300
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)

    clock.shift(60)
    assert policy.sweep_starts() == 0
    clock.shift(40)
    assert policy.sweep_starts() == 1
    assert policy.sweep_starts() == 0  # once
    assert SessionEvent.objects.filter(session=session, key="start-resend").count() == 1

    clock.shift(300)
    assert policy.sweep_starts() == 1
    session.refresh_from_db()
    machine.refresh_from_db()
    assert (session.state, session.end_reason) == (SessionState.FAILED, EndReason.START_FAILED)
    assert machine.status == MachineStatus.CLEANING  # wiped before it is offered again
    receipt(session)
    machine.refresh_from_db()
    assert machine.status == MachineStatus.AVAILABLE


def test_a_wipe_that_never_came_is_asked_for_again(
    owner: User, clock: time_machine.Coordinates, settings: Any
) -> None:
    settings.NEXCOMPUTE_CLEANUP_RESEND_SECONDS = 120
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)
    session_mark_running(session=session, url="http://x/lab?token=t")
    from sessions.services import session_mark_failed

    session_mark_failed(session=session, error="tunnel died")  # running -> stopping
    session.refresh_from_db()
    assert session.state == SessionState.STOPPING
    Machine.objects.filter(pk=machine.pk).update(status=MachineStatus.CLEANING)
    ComputeSession.objects.filter(pk=session.pk).update(state=SessionState.FAILED, ended_at=START)
    clock.shift(130)
    assert policy.sweep_starts() == 1
    assert policy.sweep_starts() == 0
    assert SessionEvent.objects.filter(session=session, key="wipe-resend:1").count() == 1


def test_a_session_without_activity_reports_is_never_called_idle(
    owner: User, clock: time_machine.Coordinates, settings: Any
) -> None:
    settings.NEXCOMPUTE_IDLE_MINUTES = 60.0
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk, duration_minutes=240)
    session_mark_running(session=session, url="http://x/lab?token=t")
    clock.shift(dt.timedelta(hours=2))
    assert policy.sweep_idle() == 0
    session.refresh_from_db()
    assert session.state == SessionState.RUNNING
