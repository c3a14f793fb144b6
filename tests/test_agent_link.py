"""The agent link with real processes: daphne, the real agent, real Redis and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from accounts.models import User
from accounts.services import api_token_create
from machines.models import Machine, MachineStatus
from machines.services import (
    enrollment_token_create,
    lab_get_or_create,
    machine_revoke_credential,
    machines_mark_silent_offline,
)
from tests.procs import VENV_BIN, ProcessSet, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def enroll(port: int, tmp_path: Path, lab: str = "Lab A", name: str = "agent") -> Path:
    _, token = enrollment_token_create(lab=lab_get_or_create(name=lab))
    config = tmp_path / f"{name}.toml"
    out = subprocess.run(
        [
            str(VENV_BIN / "nexcompute-agent"),
            "enroll",
            "--server",
            f"http://127.0.0.1:{port}",
            f"--token={token}",
            "--config",
            str(config),
            "--workspace-root",
            str(tmp_path / "ws"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert config.stat().st_mode & 0o777 == 0o600
    # Top-level keys go before the first table (after it they would be the table's, ignored,
    # and the agent would share the default state folder with every other test's agent).
    extra = f'backoff_initial = 0.1\nbackoff_max = 1.0\nstate_dir = "{tmp_path / name}-state"\n'
    head, sep, tail = config.read_text().partition("\n[")
    config.write_text(f"{head}\n{extra}{sep}{tail}")
    return config


def machine_row() -> Machine:
    return Machine.objects.get()


def status() -> str:
    return machine_row().status


def test_it_brings_an_agent_online_and_offline(procs: ProcessSet, tmp_path: Path) -> None:
    daphne, port = procs.daphne()
    config = enroll(port, tmp_path)
    agent = procs.agent(config)

    wait_for(lambda: status() == MachineStatus.AVAILABLE, what="machine online")
    machine = machine_row()
    assert machine.specs["cpu_count"] >= 1
    assert machine.memory_bytes > 0
    assert machine.agent_version
    # Heartbeats reach the row (written at most every NEXCOMPUTE_METRICS_WRITE_SECONDS = 1).
    first_seen = machine.last_seen
    wait_for(lambda: machine_row().metrics.get("cpu_percent") is not None, what="metrics")
    wait_for(lambda: machine_row().last_seen != first_seen, what="last_seen moves")

    # kill -9: the socket closes, the machine is offline well within the grace.
    agent.kill9()
    wait_for(lambda: status() == MachineStatus.OFFLINE, timeout=5, what="offline after kill -9")

    # Restart: online again.
    procs.agent(config, "agent2")
    wait_for(lambda: status() == MachineStatus.AVAILABLE, what="online after restart")

    # The server dies; the agent reconnects (with backoff) when a server returns on that port.
    daphne.kill9()
    # Nobody closed that socket: the backstop marks the silent machine offline.
    assert machines_mark_silent_offline(older_than=dt.timedelta(0)) == 1
    assert status() == MachineStatus.OFFLINE
    procs.daphne(port, name="daphne2")
    wait_for(lambda: status() == MachineStatus.AVAILABLE, timeout=20, what="reconnect")


def test_a_command_reaches_an_agent_through_another_server_process(
    procs: ProcessSet, tmp_path: Path, staff: User
) -> None:
    _, port_a = procs.daphne(name="daphne-a")
    _, port_b = procs.daphne(name="daphne-b")
    config = enroll(port_a, tmp_path)
    procs.agent(config)  # connected to A only
    wait_for(lambda: status() == MachineStatus.AVAILABLE, what="machine online")

    _, token = api_token_create(user=staff)
    response = httpx.post(
        f"http://127.0.0.1:{port_b}/api/machines/{machine_row().pk}/ping",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json()["ok"] is True


def test_it_refuses_a_revoked_credential(procs: ProcessSet, tmp_path: Path) -> None:
    _, port = procs.daphne()
    config = enroll(port, tmp_path)
    agent = procs.agent(config)
    wait_for(lambda: status() == MachineStatus.AVAILABLE, what="machine online")

    machine_revoke_credential(machine=machine_row(), actor=None)
    # The live socket is cut with 4001 and the agent stops with exit code 3.
    wait_for(lambda: not agent.alive(), timeout=10, what="agent exits")
    assert agent.popen.returncode == 3, agent.log()
    assert status() == MachineStatus.OFFLINE

    # And a fresh start is refused before the socket opens.
    again = procs.agent(config, "agent-again")
    wait_for(lambda: not again.alive(), timeout=10, what="agent refused")
    assert again.popen.returncode == 3


def test_a_newer_connection_replaces_the_older(procs: ProcessSet, tmp_path: Path) -> None:
    _, port = procs.daphne()
    config = enroll(port, tmp_path)
    first = procs.agent(config, "first")
    wait_for(lambda: status() == MachineStatus.AVAILABLE, what="online")
    second = procs.agent(config, "second")
    wait_for(lambda: not first.alive(), timeout=10, what="older agent leaves")
    assert first.popen.returncode == 5
    assert second.alive()
    assert status() == MachineStatus.AVAILABLE


def test_dashboards_receive_batched_metrics(procs: ProcessSet, tmp_path: Path, owner: User) -> None:
    import asyncio

    import websockets
    from django.test import Client

    _, port = procs.daphne()
    config = enroll(port, tmp_path)
    procs.agent(config)
    wait_for(lambda: status() == MachineStatus.AVAILABLE, what="online")
    client = Client()
    client.force_login(owner)
    cookie = client.cookies["sessionid"].value
    machine_id = machine_row().pk

    async def listen() -> dict[str, Any]:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws/dashboard/",
            additional_headers={"Cookie": f"sessionid={cookie}"},
            origin=f"http://127.0.0.1:{port}",  # type: ignore[arg-type]
        ) as ws:
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg["type"] == "machines":
                    for m in msg["machines"]:
                        if m["id"] == machine_id and "metrics" in m:
                            return dict(m)

    update = asyncio.run(listen())
    assert 0 <= update["metrics"]["cpu_percent"] <= 100


def test_an_anonymous_dashboard_socket_is_refused(procs: ProcessSet) -> None:
    import asyncio

    import websockets

    _, port = procs.daphne()

    async def attempt() -> None:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws/dashboard/",
            origin=f"http://127.0.0.1:{port}",  # type: ignore[arg-type]
        ):
            pass

    with pytest.raises(websockets.InvalidStatus) as info:
        asyncio.run(attempt())
    assert info.value.response.status_code == 403


def test_enroll_refuses_a_used_token(procs: ProcessSet, tmp_path: Path) -> None:
    _, port = procs.daphne()
    _, token = enrollment_token_create(lab=lab_get_or_create(name="L"))
    argv = [
        str(VENV_BIN / "nexcompute-agent"),
        "enroll",
        "--server",
        f"http://127.0.0.1:{port}",
        f"--token={token}",
    ]
    first = subprocess.run(
        [*argv, "--config", str(tmp_path / "a.toml")], capture_output=True, text=True, timeout=30
    )
    assert first.returncode == 0, first.stderr
    second = subprocess.run(
        [*argv, "--config", str(tmp_path / "b.toml")], capture_output=True, text=True, timeout=30
    )
    assert second.returncode == 3
    assert "already used" in second.stderr
