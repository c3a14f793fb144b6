"""Several web processes (docs/deploy.md): two real daphne processes behind HAProxy from Debian,
sharing Redis and PostgreSQL, real agents dialling the proxy.

Each test first proves the agents really are spread over both processes (each process's own
``nexcompute_agents_connected``), then makes things cross: commands sent by the process that
does not hold the agent's socket, dashboard updates of agents on the other process, and a
``kill -9`` of a process, after which its agents must be back through the other one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import User
from accounts.services import api_token_create
from machines.models import Machine, MachineStatus
from sessions.models import ComputeSession
from tests.procs import Proc, ProcessSet, free_port, port_open, wait_for
from tests.test_agent_link import enroll
from tests.test_sessions_e2e import (  # noqa: F401 (fixtures)
    api,
    configure,
    end_session,
    jupyter,
    no_user_processes,
    request_session,
    session_user,
    workspace_root,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

HAPROXY = "/usr/sbin/haproxy"


def haproxy_config(port: int, backends: list[int]) -> str:
    """deploy/haproxy.cfg with this test's ports (its bind and server lines replaced)."""
    text = (Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg").read_text()
    text = re.sub(r"(?m)^\s*server web\d+ .*\n", "", text)
    text = re.sub(r"(?m)^(\s*)bind 127\.0\.0\.1:\d+", rf"\g<1>bind 127.0.0.1:{port}", text)
    servers = "".join(f"    server web{i + 1} 127.0.0.1:{p}\n" for i, p in enumerate(backends))
    return text.rstrip("\n") + "\n" + servers


class Web:
    """Two daphne processes and the proxy in front of them."""

    def __init__(self, procs: ProcessSet, tmp_path: Path) -> None:
        self.a, self.port_a = procs.daphne(name="web-a")
        self.b, self.port_b = procs.daphne(name="web-b")
        self.port = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.port, [self.port_a, self.port_b]))
        self.proxy = procs.start("haproxy", [HAPROXY, "-f", str(cfg), "-db"])
        wait_for(lambda: port_open(self.port), what="haproxy listening")
        # HAProxy starts with its servers up (both already listen): it forwards at once.
        wait_for(
            lambda: (
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=5).status_code == 200
            ),
            what="HAProxy forwards",
        )

    def agents_on(self, port: int) -> int:
        """Agent sockets held by the daphne process on ``port`` (its own gauge)."""
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        match = re.search(r"^nexcompute_agents_connected(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
        assert match, text[:500]
        return int(float(match.group(1)))

    def spread(self) -> tuple[int, int]:
        return self.agents_on(self.port_a), self.agents_on(self.port_b)


@pytest.fixture
def web(procs: ProcessSet, tmp_path: Path, live_env: dict[str, str]) -> Web:
    assert Path(HAPROXY).exists(), "HAProxy missing: scripts/ensure-test-tools.sh installs it"
    live_env["NEXCOMPUTE_METRICS_ALLOWED_NETWORKS"] = "127.0.0.1/32"
    live_env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each process counts its own agents
    return Web(procs, tmp_path)


def statuses() -> list[str]:
    return list(Machine.objects.order_by("pk").values_list("status", flat=True))


def dashboard_cookie(user: User) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def dashboard_updates(
    port: int, cookie: str, want: set[int], since: dt.datetime, timeout: float = 20
) -> dict[int, dict[str, Any]]:
    """Metrics updates, on the dashboard socket of the process on ``port``, of every machine in
    ``want`` from heartbeats later than ``since``."""
    got: dict[int, dict[str, Any]] = {}
    async with asyncio.timeout(timeout):
        import websockets

        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws/dashboard/",
            additional_headers={"Cookie": f"sessionid={cookie}"},
            origin=f"http://127.0.0.1:{port}",  # type: ignore[arg-type]
        ) as ws:
            while not want <= got.keys():
                msg = json.loads(await ws.recv())
                for m in msg.get("machines", []) if msg.get("type") == "machines" else []:
                    seen = dt.datetime.fromisoformat(m["last_seen"])
                    if "metrics" in m and seen > since:
                        got[m["id"]] = m
    return got


def test_agents_spread_over_two_processes_and_come_back_after_kill_9(
    web: Web, procs: ProcessSet, tmp_path: Path, staff: User
) -> None:
    agents = []
    for i in range(4):
        config = enroll(web.port, tmp_path, name=f"agent{i}")
        agents.append(procs.agent(config, f"agent{i}"))
    wait_for(lambda: statuses() == [MachineStatus.AVAILABLE] * 4, what="four machines online")
    # Spread: each process holds some of the agents (leastconn), none is held twice.
    wait_for(lambda: web.spread() == (2, 2), what="two agents on each process")
    ids = set(Machine.objects.values_list("pk", flat=True))

    # Dashboard updates cross: a dashboard on each process sees every machine's heartbeats,
    # two of which arrive at the other process.
    cookie = dashboard_cookie(staff)
    for port in (web.port_a, web.port_b):
        got = asyncio.run(dashboard_updates(port, cookie, ids, since=timezone.now()))
        assert got.keys() == ids
        assert all(0 <= m["metrics"]["cpu_percent"] <= 100 for m in got.values())

    # Commands cross: each process pings every agent (half of them held by the other one).
    _, token = api_token_create(user=staff)
    for port in (web.port_a, web.port_b):
        for machine_id in ids:
            r = httpx.post(
                f"http://127.0.0.1:{port}/api/machines/{machine_id}/ping",
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            assert r.status_code == 200 and r.json()["ok"] is True, (port, r.text)

    # kill -9 of process A. The attack happened: it is gone, two agents lost their socket.
    web.a.kill9()
    assert not web.a.alive()
    killed_at = timezone.now()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{web.port_a}/healthz", timeout=2)
    # Its agents are back through the proxy on B: B holds all four, no agent process died,
    # every machine is available, and B's dashboard shows fresh heartbeats from all of them.
    wait_for(lambda: web.agents_on(web.port_b) == 4, timeout=60, what="all agents on B")
    assert all(agent.alive() for agent in agents)
    assert statuses() == [MachineStatus.AVAILABLE] * 4
    got = asyncio.run(dashboard_updates(web.port_b, cookie, ids, since=killed_at))
    assert got.keys() == ids
    for machine_id in ids:
        r = httpx.post(
            f"http://127.0.0.1:{web.port}/api/machines/{machine_id}/ping",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert r.status_code == 200 and r.json()["ok"] is True, r.text
    # Reconnected, not restarted: the two agents of A logged the lost socket and a retry.
    lost = [a for a in agents if "disconnected (" in a.log()]
    assert len(lost) == 2, [a.log()[-800:] for a in agents]


def holder(web: Web) -> tuple[Proc, int, int]:
    """(the process holding the one agent, its port, the other process's port)."""
    a, b = web.spread()
    assert sorted((a, b)) == [0, 1], (a, b)
    return (web.a, web.port_a, web.port_b) if a == 1 else (web.b, web.port_b, web.port_a)


def test_a_session_started_through_the_other_process_survives_kill_9_of_the_agents_process(
    web: Web,
    procs: ProcessSet,
    tmp_path: Path,
    owner: User,
    session_env: Path,
    session_user: int,  # noqa: F811
    workspace_root: Path,  # noqa: F811
) -> None:
    procs.celery_worker()
    config = enroll(web.port, tmp_path)
    configure(config, session_env, workspace_root)
    agent = procs.agent(config)
    wait_for(lambda: statuses() == [MachineStatus.AVAILABLE], what="machine online")
    wait_for(lambda: sum(web.spread()) == 1, what="the agent counted")
    held_by, _, other_port = holder(web)

    # session.start crosses: the request goes to the process that does not hold the socket.
    _, token = api_token_create(user=owner)
    session = request_session(other_port, token)
    assert session["state"] == "running", session
    base, _, query = session["url"].partition("/lab?")
    jtoken = query.removeprefix("token=")
    assert jupyter("GET", f"{base}/api/status", jtoken).status_code == 200

    # kill -9 of the process holding the agent's socket; the agent comes back on the other.
    held_by.kill9()
    assert not held_by.alive()
    wait_for(lambda: web.agents_on(other_port) == 1, timeout=60, what="agent on the other")
    assert agent.alive()
    # Nothing lost: the session is running at the same URL, Jupyter answers, the machine busy.
    wait_for(lambda: statuses() == [MachineStatus.BUSY], what="busy")
    row = ComputeSession.objects.get(pk=session["id"])
    assert row.state == "running" and row.end_reason == "", (row.state, row.end_reason)
    with api(web.port, token) as client:
        again = client.get(f"/api/sessions/{session['id']}").json()
    assert again["state"] == "running" and again["url"] == session["url"]
    assert jupyter("GET", f"{base}/api/status", jtoken).status_code == 200

    # session.stop through the proxy (the survivor): ended, wiped, verified; offered again.
    ended = end_session(web.port, token, session["id"])
    assert ended["cleanup"]["verified"] is True, ended
    wait_for(lambda: no_user_processes(session_user), what="no process of the account")
    wait_for(lambda: statuses() == [MachineStatus.AVAILABLE], what="offered again")
