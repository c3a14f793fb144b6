"""Sessions through the real Agent and a real websocket: reply, progress, ready, receipt, and
the hello/reconcile after a reconnect or a restart."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from conftest import FAKE_JUPYTER, WAIT, FakeNexus, needs_root, write_config_file

from nexcompute_agent.agent import Agent
from nexcompute_agent.protocol import Reply, SessionStart, SessionStop, dump

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [needs_root, pytest.mark.timeout(120)]

FAKE = FAKE_JUPYTER  # where the session account can run it (conftest)


def config(tmp_path: Path, nexus: FakeNexus, workspace_root: Path, user: str) -> Any:
    return write_config_file(
        tmp_path / "agent.toml",
        nexus.url,
        workspace_root=str(workspace_root),
        session_user=user,
        jupyter_command=[str(FAKE), "lab"],
        session_stop_grace=0.5,
        session_max_processes=64,
        session_cgroup="off",
    )


async def test_session_messages_flow_and_hello_lists_live_sessions(
    tmp_path: Path, nexus: FakeNexus, workspace_root: Path, session_user: str, start_agent: Any
) -> None:
    agent, _ = await start_agent(config(tmp_path, nexus, workspace_root, session_user))
    conn = await nexus.next_connection()
    assert conn.hello.sessions == []
    start = SessionStart(msgid="a1", session_id=3, token="tok", duration_seconds=60)
    await conn.ws.send(dump(start))
    reply = await conn.next_frame(lambda m: isinstance(m, Reply))
    assert reply.msgid == "a1" and reply.ok
    ready = await conn.next_frame(lambda m: m.type == "session.ready")
    assert ready.session_id == 3 and ready.url.endswith("/lab?token=tok")
    refused = SessionStart(msgid="a2", session_id=4, token="tok", duration_seconds=60)
    await conn.ws.send(dump(refused))
    reply = await conn.next_frame(lambda m: isinstance(m, Reply))
    assert not reply.ok and "already runs session 3" in (reply.error or "")

    await conn.ws.close()  # server restart: the agent says what it runs in the next hello
    conn = await nexus.next_connection()
    assert [(s.session_id, s.state) for s in conn.hello.sessions] == [(3, "running")]

    await conn.ws.send(dump(SessionStop(msgid="b1", session_id=3, reason="lease expired")))
    reply = await conn.next_frame(lambda m: isinstance(m, Reply))
    assert reply.ok and reply.data == {"known": True}
    receipt = await conn.next_frame(lambda m: m.type == "session.receipt")
    assert receipt.session_id == 3 and receipt.verified
    assert "lease expired" in receipt.details[0]
    assert agent.live_sessions() == []


async def test_a_restarted_agent_wipes_before_hello_and_reports_after_welcome(
    tmp_path: Path, nexus: FakeNexus, workspace_root: Path, session_user: str, start_agent: Any
) -> None:
    cfg = config(tmp_path, nexus, workspace_root, session_user)
    agent, task = await start_agent(cfg)
    conn = await nexus.next_connection()
    await conn.ws.send(dump(SessionStart(msgid="a1", session_id=8, token="t", duration_seconds=9)))
    await conn.next_frame(lambda m: m.type == "session.ready")
    agent.request_stop()  # stops the programs, keeps the record
    assert await asyncio.wait_for(task, WAIT) == 0
    assert (workspace_root / "8").exists()

    again = Agent(cfg, presence=agent.presence)
    task2 = asyncio.create_task(again.run())
    try:
        conn = await nexus.next_connection()
        # Wiped before hello, and listed as ended so that the server waits for its receipt
        # instead of ending it as agent_lost.
        assert [(s.session_id, s.state) for s in conn.hello.sessions] == [(8, "ended")]
        assert not (workspace_root / "8").exists()
        receipt = await conn.next_frame(lambda m: m.type == "session.receipt")
        assert receipt.session_id == 8 and receipt.verified
        assert "agent restarted" in receipt.details[0]
    finally:
        again.request_stop()
        await asyncio.wait_for(task2, WAIT)
