"""The occupancy table: a session's state decides its machine's status, applied by transition()."""

from __future__ import annotations

import pytest

from accounts.models import User
from machines.models import MachineEvent, MachineStatus
from nexcompute.agent_events import StopReason
from sessions.models import ComputeSession
from sessions.occupancy import OCCUPANCY, machine_status_for, transition
from sessions.services import session_mark_running, session_request, session_stop
from sessions.states import EndReason, SessionState
from tests.factories import MachineFactory, SessionFactory, record_receipt

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _in_memory_layer(in_memory_layer: None) -> None:
    """Every test here uses the in-process channel layer (fixture in conftest.py)."""


def test_every_state_has_a_row() -> None:
    assert set(OCCUPANCY) == set(SessionState)


def test_every_end_reason_is_a_stop_reason() -> None:
    assert set(EndReason.values) <= {reason.value for reason in StopReason}


def test_a_session_moves_its_machine_through_the_table(owner: User) -> None:
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)
    statuses = [machine.status]

    def now() -> str:
        machine.refresh_from_db()
        return machine.status

    statuses.append(now())
    transition(session, SessionState.STARTING)
    statuses.append(now())
    session_mark_running(session=session, url="http://pc/lab")
    statuses.append(now())
    session_stop(session=session, reason=EndReason.USER)
    statuses.append(now())
    record_receipt(session)
    statuses.append(now())

    assert statuses == ["available", "reserved", "reserved", "busy", "cleaning", "available"]
    changes = MachineEvent.objects.filter(machine=machine).order_by("at", "pk")
    assert [(e.kind, e.from_status, e.to_status) for e in changes] == [
        ("reserved", "available", "reserved"),
        ("busy", "reserved", "busy"),
        ("cleaning", "busy", "cleaning"),
        ("status", "cleaning", "available"),
    ]


def test_a_transition_leaves_an_offline_machine_offline(owner: User) -> None:
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)
    session_mark_running(session=session, url="http://pc/lab")
    machine.status = MachineStatus.OFFLINE
    machine.save(update_fields=["status"])

    session_stop(session=session, reason=EndReason.USER)

    machine.refresh_from_db()
    assert machine.status == MachineStatus.OFFLINE


@pytest.mark.parametrize(
    ("state", "status"),
    [
        (SessionState.REQUESTED, MachineStatus.RESERVED),
        (SessionState.STARTING, MachineStatus.RESERVED),
        (SessionState.RUNNING, MachineStatus.BUSY),
        (SessionState.STOPPING, MachineStatus.CLEANING),
    ],
)
def test_hello_shows_the_status_of_the_live_session(state: str, status: str) -> None:
    session: ComputeSession = SessionFactory.create(state=state)

    assert machine_status_for(session.machine) == status


def test_hello_keeps_a_machine_cleaning_while_a_wipe_is_owed(owner: User) -> None:
    lost = SessionFactory.create(state=SessionState.ENDED, end_reason=EndReason.AGENT_LOST)

    assert machine_status_for(lost.machine) == MachineStatus.CLEANING
    record_receipt(lost)
    lost.machine.refresh_from_db()
    assert machine_status_for(lost.machine) == MachineStatus.AVAILABLE
