"""Agent link close codes through a real daphne (docs/protocol.md, "Close codes").

Daphne refuses close codes outside 1000 and 3000-4999 and the peer then sees 1011: every
application reason is a 4xxx code, and these tests read them on real sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from asgiref.sync import async_to_sync
from django.utils import timezone

from machines.models import Machine, MachineStatus
from machines.services import enrollment_token_create, lab_get_or_create, machine_revoke_credential
from nexcompute import agent_events
from nexcompute.realtime import machine_group
from nexcompute_agent import protocol
from tests.procs import ProcessSet, wait_for
from tests.test_agent_link import enroll

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def credential_for(port: int) -> str:
    _, token = enrollment_token_create(lab=lab_get_or_create(name="Lab C"))
    response = httpx.post(
        f"http://127.0.0.1:{port}/api/agents/enroll",
        json={"token": token, "hostname": "raw-client"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["credential"])


async def close_code_after(port: int, credential: str, frame: str) -> int | None:
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/agent/",
        additional_headers={"Authorization": f"Bearer {credential}"},
        max_size=None,
        open_timeout=10,
    ) as ws:
        await ws.send(frame)
        try:
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None
    return None


def test_policy_and_size_violations_arrive_as_4xxx_not_1011(procs: ProcessSet) -> None:
    _, port = procs.daphne()
    credential = credential_for(port)

    not_hello = protocol.dump(
        protocol.Heartbeat(
            metrics=protocol.Metrics(cpu_percent=1, memory_percent=2), owner_present=False
        )
    )
    policy = async_to_sync(close_code_after)(port, credential, not_hello)
    huge = "x" * (protocol.MAX_FRAME_BYTES + 10)
    too_big = async_to_sync(close_code_after)(port, credential, huge)

    assert policy == protocol.CLOSE_POLICY == 4000
    assert too_big == protocol.CLOSE_TOO_BIG == 4009


def test_a_revocation_whose_message_was_lost_still_ends_the_link_at_the_next_command(
    procs: ProcessSet, tmp_path: Path
) -> None:
    """The credential is re-checked on every command: revoke it in the database only (as if
    the channel-layer message had been dropped), then send a command through the layer."""
    _, port = procs.daphne()
    agent = procs.agent(enroll(port, tmp_path, lab="Lab C"))
    wait_for(lambda: Machine.objects.get().status == MachineStatus.AVAILABLE, what="machine online")
    machine = Machine.objects.get()
    Machine.objects.filter(pk=machine.pk).update(credential_revoked_at=timezone.now())
    # The attack: the agent is still connected with a revoked credential.
    assert agent.alive()

    from channels.layers import get_channel_layer

    layer: Any = get_channel_layer()
    async_to_sync(layer.group_send)(
        machine_group(machine.pk), dict(agent_events.session_stop(123456, "user"))
    )

    wait_for(lambda: not agent.alive(), timeout=15, what="agent told to stop")
    assert agent.popen.returncode == 3, agent.log()
    assert "credential revoked by server" in agent.log()


def test_a_revocation_from_another_process_closes_the_socket_with_4001(
    procs: ProcessSet, tmp_path: Path
) -> None:
    _, port_a = procs.daphne(name="daphne-a")
    procs.daphne(name="daphne-b")
    agent = procs.agent(enroll(port_a, tmp_path, lab="Lab C"))
    wait_for(lambda: Machine.objects.get().status == MachineStatus.AVAILABLE, what="machine online")

    # This test process is not daphne-a: the revocation reaches the socket through Redis.
    machine_revoke_credential(machine=Machine.objects.get(), actor=None)

    wait_for(lambda: not agent.alive(), timeout=15, what="agent exits")
    assert agent.popen.returncode == 3
    assert "credential revoked by server" in agent.log()
