"""Warm sandboxes, the server's side: when a machine keeps one (sessions/warm.py), the agent
link's warm.set / heartbeat.warm / warm.receipt, allocation preferring warm machines, and the
dashboard's "ready instantly"."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from accounts.models import User
from machines import services as machine_services
from machines.models import ClosedDate, Lab, Machine, MachineEvent, MachineStatus
from machines.services import enrollment_token_create, lab_get_or_create, machine_enroll
from machines.tests.test_agent_consumer import BEAT, HELLO, communicator
from nexcompute_agent import protocol
from sessions.services import session_request, session_start_command
from sessions.warm import warm_settings
from tests.factories import MachineFactory, default_policy_with

RECEIPT = {
    "type": "warm.receipt",
    "reason": "the owner is present",
    "verified": True,
    "files_removed": 12,
    "bytes_removed": 3400,
    "processes_killed": 3,
    "duration_seconds": 1.5,
    "checks": [{"name": "workspace", "ok": True, "detail": ""}],
}


@pytest.fixture(autouse=True)
def _warm_on(settings: Any) -> None:
    settings.NEXCOMPUTE_WARM_POOLS = True


@pytest.mark.django_db
def test_a_free_machine_in_an_open_lab_keeps_one_with_the_default_policys_limits(
    owner: User,
) -> None:
    machine = MachineFactory.create()
    wanted = warm_settings(machine_id=machine.pk)
    assert wanted.enabled and wanted.reason == ""
    # Exactly what a session of a default-policy user gets: the agent hands it over.
    session = session_request(user=owner)
    start = session_start_command(session_id=session.pk)
    assert start is not None
    assert (wanted.limits, wanted.terminals) == (start.limits, start.terminals)


@pytest.mark.django_db
@pytest.mark.parametrize("why", ["pools_off", "lab_off", "lab_closed", "owner", "maintenance"])
def test_no_warm_sandbox_when_off_closed_owner_present_or_out_of_service(
    why: str, settings: Any
) -> None:
    machine = MachineFactory.create()
    assert warm_settings(machine_id=machine.pk).enabled  # the test can fail
    if why == "pools_off":
        settings.NEXCOMPUTE_WARM_POOLS = False
    elif why == "lab_off":
        Lab.objects.filter(pk=machine.lab_id).update(warm_pool=False)
    elif why == "lab_closed":
        ClosedDate.objects.create(lab=machine.lab, date=timezone.now().date())
    elif why == "owner":
        Machine.objects.filter(pk=machine.pk).update(
            owner_present=True, status=MachineStatus.OWNER_PRESENT
        )
    else:
        Machine.objects.filter(pk=machine.pk).update(
            enabled=False, status=MachineStatus.MAINTENANCE
        )
    wanted = warm_settings(machine_id=machine.pk)
    assert not wanted.enabled and wanted.reason
    assert wanted.limits is None


@pytest.mark.django_db
def test_allocation_prefers_the_machine_with_a_warm_sandbox_and_the_claim_clears_it(
    owner: User,
) -> None:
    default_policy_with(max_concurrent_sessions=20, max_hours_per_week=1000)
    machines = MachineFactory.create_batch(6)
    for attempt in range(5):
        warm = machines[attempt]
        Machine.objects.filter(pk=warm.pk).update(warm_ready=True)
        session = session_request(user=owner, duration_minutes=5)
        assert session.machine_id == warm.pk, attempt
        warm.refresh_from_db()
        assert not warm.warm_ready and warm.status == MachineStatus.RESERVED


@pytest.fixture
def credential(transactional_db: Any, in_memory_layer: None) -> str:
    _, token = enrollment_token_create(lab=lab_get_or_create(name="Lab"))
    _, cred = machine_enroll(token=token, hostname="pc1")
    return cred


async def _hello(cred: str, **extra: Any) -> Any:
    comm = communicator(cred)
    ok, _ = await comm.connect()
    assert ok
    await comm.send_json_to({**HELLO, **extra})
    assert (await comm.receive_json_from(timeout=5))["type"] == "welcome"
    return comm


async def _machine() -> Machine:
    return await sync_to_async(lambda: Machine.objects.select_related("lab").get())()


async def _sync(comm: Any) -> None:
    """Frames are handled in order: a reply's handling proves the ones before it done."""
    await comm.send_json_to({"type": "reply", "msgid": "sync", "ok": True})
    await comm.receive_nothing(timeout=0.3)


@pytest.mark.django_db(transaction=True)
async def test_the_link_tells_the_agent_records_its_report_and_takes_a_lab_switch(
    credential: str,
) -> None:
    comm = await _hello(credential)
    told = await comm.receive_json_from(timeout=5)
    assert told["type"] == "warm.set" and told["enabled"] is True, told
    assert told["limits"]["workspace_bytes"] > 0
    await comm.send_json_to({"type": "reply", "msgid": told["msgid"], "ok": True, "data": {}})

    await comm.send_json_to({**BEAT, "warm": True})
    await _sync(comm)
    assert (await _machine()).warm_ready

    # Staff switch the lab's warm pool off: the agent is told at once.
    machine = await _machine()
    await sync_to_async(lambda: Lab.objects.filter(pk=machine.lab_id).update(warm_pool=False))()
    lab = await sync_to_async(lambda: Lab.objects.get(pk=machine.lab_id))()
    await sync_to_async(machine_services.lab_settings_changed)(lab=lab)
    off = await comm.receive_json_from(timeout=5)
    assert off["type"] == "warm.set" and off["enabled"] is False
    assert "warm pool is turned off" in off["reason"]

    await comm.send_json_to(RECEIPT)
    await comm.send_json_to({**BEAT, "warm": False})
    await _sync(comm)
    machine = await _machine()
    assert not machine.warm_ready and machine.status == MachineStatus.AVAILABLE
    kinds = await sync_to_async(
        lambda: list(MachineEvent.objects.filter(machine=machine).values_list("kind", flat=True))
    )()
    assert "warm_wiped" in kinds
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_an_unverified_warm_wipe_quarantines_the_machine(credential: str) -> None:
    comm = await _hello(credential)
    assert (await comm.receive_json_from(timeout=5))["type"] == "warm.set"
    bad = {**RECEIPT, "verified": False,
           "checks": [{"name": "processes", "ok": False, "detail": "pid 42 survived"}]}  # fmt: skip
    await comm.send_json_to(bad)
    await _sync(comm)
    machine = await _machine()
    assert machine.status == MachineStatus.QUARANTINED
    assert "pid 42 survived" in machine.quarantine_reason
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_an_agent_without_warm_sandboxes_is_told_nothing(credential: str) -> None:
    """N-1: an agent of the previous release (no ``session.warm``) gets no warm.set, and its
    heartbeats (no ``warm`` field) are read as before."""
    old = [c for c in protocol.CAPABILITIES if c != "session.warm"]
    comm = await _hello(credential, capabilities=old)
    await comm.receive_nothing(timeout=0.5)
    await comm.send_json_to(BEAT)
    await _sync(comm)
    assert not (await _machine()).warm_ready
    await comm.disconnect()


def test_heartbeat_without_warm_is_sent_without_the_field() -> None:
    """An agent not told warm.set sends frames an older server (which forbids unknown fields)
    still reads."""
    beat = protocol.Heartbeat(
        metrics=protocol.Metrics(cpu_percent=1, memory_percent=2), owner_present=False
    )
    assert "warm" not in protocol.dump(beat)
    assert '"warm":true' in protocol.dump(beat.model_copy(update={"warm": True}))
    parsed = protocol.parse_agent_message(protocol.dump(beat))
    assert isinstance(parsed, protocol.Heartbeat) and parsed.warm is None


@pytest.mark.django_db
def test_the_dashboard_card_says_ready_instantly(client: Any, owner: User) -> None:
    warm = MachineFactory.create(name="warm-pc", warm_ready=True)
    MachineFactory.create(name="cold-pc")
    client.force_login(owner)
    page = client.get("/").content.decode()
    card = page.split(f'data-machine-id="{warm.pk}"', 1)[1].split("</li>", 1)[0]
    assert 'data-warm="1"' in card and "ready instantly" in card
    assert "hidden" not in card.split('data-field="warm"', 1)[1].split(">", 1)[0]
    cold = page.split('data-warm="0"', 1)[1].split("</li>", 1)[0]
    assert "hidden" in cold.split('data-field="warm"', 1)[1].split(">", 1)[0]
