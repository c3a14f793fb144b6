"""Owner presence as the server counts it: the lab's idle limit (an idle or locked owner is
away), the re-offer delay after the owner leaves, and the returning owner winning at once."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import time_machine
from asgiref.sync import sync_to_async

from machines.models import Lab, Machine, MachineEvent, MachineStatus
from machines.presence import OwnerPresence, PresenceRules, counts_present
from machines.services import enrollment_token_create, lab_get_or_create, machine_enroll
from machines.tests.test_agent_consumer import BEAT, HELLO, communicator

pytestmark = pytest.mark.django_db(transaction=True)


def test_idle_or_locked_past_the_limit_counts_as_away() -> None:
    rules = PresenceRules(idle_minutes=30)
    assert counts_present(rules=rules, owner_present=True, idle_seconds=None)  # utmp: unknown
    assert counts_present(rules=rules, owner_present=True, idle_seconds=29 * 60)
    assert not counts_present(rules=rules, owner_present=True, idle_seconds=30 * 60)
    assert not counts_present(rules=rules, owner_present=False, idle_seconds=0)
    # 0: idleness never counts (the old behaviour).
    assert counts_present(rules=PresenceRules(), owner_present=True, idle_seconds=10**6)


def test_leaving_counts_only_after_the_reoffer_delay_and_returning_at_once() -> None:
    owner = OwnerPresence(PresenceRules(reoffer_minutes=5), present=True)
    assert owner.update(False, now=1000.0) is True  # just left
    assert owner.update(False, now=1000.0 + 299) is True
    assert owner.update(True, now=1000.0 + 200) is True  # back: the clock starts again
    assert owner.update(False, now=2000.0) is True
    assert owner.update(False, now=2000.0 + 300) is False  # away for the whole delay
    assert owner.update(True, now=2400.0) is True  # a returning owner counts at once
    assert OwnerPresence(PresenceRules(), present=True).update(False, now=0.0) is False


@pytest.fixture
def lab_credential(db: Any) -> tuple[Lab, str]:
    lab = lab_get_or_create(name="Lab")
    _, token = enrollment_token_create(lab=lab)
    _, cred = machine_enroll(token=token, hostname="pc1")
    return lab, cred


async def _set_lab(lab: Lab, **fields: int) -> None:
    await sync_to_async(lambda: Lab.objects.filter(pk=lab.pk).update(**fields))()


async def _machine() -> Machine:
    return await sync_to_async(lambda: Machine.objects.get())()


async def _beat(comm: Any, **fields: Any) -> Machine:
    """Send a heartbeat, then a ping-free round trip: the link handles frames in order, so a
    second beat's handling proves the first one's is done."""
    await comm.send_json_to({**BEAT, **fields})
    await comm.send_json_to({"type": "reply", "msgid": "sync", "ok": True})
    await comm.receive_nothing(timeout=0.3)
    return await _machine()


async def _connect(cred: str, present: bool) -> Any:
    comm = communicator(cred)
    ok, _ = await comm.connect()
    assert ok
    await comm.send_json_to({**HELLO, "owner_present": present})
    assert (await comm.receive_json_from(timeout=5))["type"] == "welcome"
    return comm


async def test_a_locked_screen_left_logged_in_stops_blocking_the_machine(
    lab_credential: tuple[Lab, str],
) -> None:
    lab, cred = lab_credential
    await _set_lab(lab, owner_idle_minutes=20, owner_reoffer_minutes=0)
    comm = await _connect(cred, present=True)
    try:
        machine = await _beat(comm, owner_present=True, idle_seconds=60.0, locked=True)
        assert (machine.owner_present, machine.status) == (True, MachineStatus.OWNER_PRESENT)
        machine = await _beat(comm, owner_present=True, idle_seconds=21 * 60.0, locked=True)
        assert (machine.owner_present, machine.status) == (False, MachineStatus.AVAILABLE)
        event = await sync_to_async(
            lambda: MachineEvent.objects.filter(kind="owner_left").latest("pk")
        )()
        assert "screen locked for 21 min" in event.message
        # They unlock and touch the mouse: back at once.
        machine = await _beat(comm, owner_present=True, idle_seconds=0.0, locked=False)
        assert (machine.owner_present, machine.status) == (True, MachineStatus.OWNER_PRESENT)
    finally:
        await comm.disconnect()


async def test_the_machine_is_offered_again_only_after_the_reoffer_delay(
    lab_credential: tuple[Lab, str],
) -> None:
    lab, cred = lab_credential
    await _set_lab(lab, owner_idle_minutes=30, owner_reoffer_minutes=5)
    start = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)
    with time_machine.travel(start, tick=True) as clock:
        comm = await _connect(cred, present=True)
        try:
            machine = await _beat(comm, owner_present=False, idle_seconds=None)
            assert machine.status == MachineStatus.OWNER_PRESENT  # left, but only just
            clock.shift(dt.timedelta(minutes=4))
            machine = await _beat(comm, owner_present=False, idle_seconds=None)
            assert machine.status == MachineStatus.OWNER_PRESENT
            clock.shift(dt.timedelta(minutes=1, seconds=1))
            machine = await _beat(comm, owner_present=False, idle_seconds=None)
            assert (machine.owner_present, machine.status) == (False, MachineStatus.AVAILABLE)
            # The owner returns: no delay for that.
            machine = await _beat(comm, owner_present=True, idle_seconds=0.0)
            assert machine.status == MachineStatus.OWNER_PRESENT
        finally:
            await comm.disconnect()
