"""The connection loop against a real local websockets server."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import CREDENTIAL, WAIT, FakeNexus, FilePresence, write_config_file

from nexcompute_agent.agent import Agent, ConnectionState
from nexcompute_agent.protocol import (
    CAPABILITIES,
    PROTOCOL_VERSION,
    Ping,
    ServerError,
    SessionStart,
    SessionStop,
    dump,
)

if TYPE_CHECKING:
    from nexcompute_agent.config import AgentConfig


def is_type(kind: str) -> Any:
    return lambda m: m.type == kind


async def wait_until(cond: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_it_sends_hello_with_specs_then_heartbeats(
    nexus: FakeNexus, start_agent: Any
) -> None:
    agent, _ = await start_agent()
    conn = await nexus.next_connection()
    assert conn.hello.protocol_version == PROTOCOL_VERSION
    assert conn.hello.specs.cpu_count >= 1
    assert conn.hello.specs.memory_bytes > 0
    assert conn.hello.owner_present is False
    assert nexus.auth_headers[-1] == f"Bearer {CREDENTIAL}"
    first = await conn.next_frame(is_type("heartbeat"))
    second = await conn.next_frame(is_type("heartbeat"))
    assert 0 <= first.metrics.cpu_percent <= 100
    assert 0 <= second.metrics.memory_percent <= 100
    await wait_until(lambda: agent.state is ConnectionState.CONNECTED)
    assert agent.heartbeat_seconds == nexus.heartbeat_seconds


async def test_it_answers_ping(nexus: FakeNexus, start_agent: Any) -> None:
    await start_agent()
    conn = await nexus.next_connection()
    await conn.ws.send(dump(Ping(msgid="abc123")))
    reply = await conn.next_frame(is_type("reply"))
    assert (reply.msgid, reply.ok, reply.data) == ("abc123", True, {"pong": True})


async def test_session_commands_are_accepted_and_answered_by_messages(
    nexus: FakeNexus, start_agent: Any
) -> None:
    await start_agent()  # its session user does not exist: the start fails, plainly
    conn = await nexus.next_connection()
    await conn.ws.send(dump(SessionStart(msgid="s1", session_id=1, token="t", duration_seconds=60)))
    reply = await conn.next_frame(lambda m: m.type == "reply" and m.msgid == "s1")
    assert reply.ok is True
    failed = await conn.next_frame(is_type("session.failed"))
    assert "does not exist" in failed.error or "not found on the agent's PATH" in failed.error
    assert (await conn.next_frame(is_type("session.receipt"))).session_id == 1
    await conn.ws.send(dump(SessionStop(msgid="s2", session_id=2, reason="user")))
    reply = await conn.next_frame(lambda m: m.type == "reply" and m.msgid == "s2")
    assert (reply.ok, reply.data) == (True, {"known": False})
    assert (await conn.next_frame(is_type("session.receipt"))).session_id == 2


async def test_handler_exception_becomes_error_reply(nexus: FakeNexus, start_agent: Any) -> None:
    agent, _ = await start_agent()

    async def boom(agent: Agent, msg: Ping) -> dict[str, Any]:
        raise RuntimeError("disk on fire")

    agent.handlers["ping"] = boom
    conn = await nexus.next_connection()
    await conn.ws.send(dump(Ping(msgid="p1")))
    reply = await conn.next_frame(is_type("reply"))
    assert (reply.msgid, reply.ok, reply.error) == ("p1", False, "disk on fire")
    # The connection stays up: heartbeats keep coming on the same socket.
    await conn.next_frame(is_type("heartbeat"))
    assert not conn.closed.is_set()
    assert nexus.connections.empty()


async def test_bad_server_frames_are_ignored(nexus: FakeNexus, start_agent: Any) -> None:
    await start_agent()
    conn = await nexus.next_connection()
    await conn.ws.send("not json")
    await conn.ws.send('{"type": "launch_missiles"}')
    await conn.ws.send(dump(ServerError(code="invalid", detail="bad heartbeat")))
    await conn.ws.send(dump(Ping(msgid="after")))
    reply = await conn.next_frame(is_type("reply"))
    assert reply.msgid == "after" and reply.ok


async def test_it_reconnects_after_the_server_drops_it(nexus: FakeNexus, start_agent: Any) -> None:
    agent, _ = await start_agent()
    first = await nexus.next_connection()
    await first.ws.close(1011, "server restarting")
    second = await nexus.next_connection()
    assert second.hello.hostname == first.hello.hostname
    assert "1011" in (agent.last_disconnect_reason or "")
    await second.next_frame(is_type("heartbeat"))


async def test_a_lost_connection_is_retried_within_the_servers_reconnect_window(
    nexus: FakeNexus, start_agent: Any
) -> None:
    """Every agent of a restarted server process loses its connection at once: the first
    reconnect is spread over the window the welcome gave (jitter at its ceiling here, so the
    wait is the whole window), where a failed connect would wait only backoff_initial."""
    nexus.reconnect_window = 0.8
    ceilings: list[float] = []
    await start_agent(jitter=lambda c: ceilings.append(c) or c)
    first = await nexus.next_connection()
    await first.ws.close(1011, "server restarting")
    await nexus.next_connection()
    gap = nexus.attempts[-1] - nexus.attempts[-2]
    assert 0.8 <= gap < 0.8 + 0.4, gap
    assert 0.8 in ceilings  # the window was drawn from, beside the backoff's 0.05


async def test_without_a_window_a_lost_connection_is_retried_at_once(
    nexus: FakeNexus, start_agent: Any
) -> None:
    await start_agent(jitter=lambda c: c)
    first = await nexus.next_connection()
    await first.ws.close(1011, "server restarting")
    await nexus.next_connection()
    assert nexus.attempts[-1] - nexus.attempts[-2] < 0.4


async def test_rate_limit_close_reconnects(nexus: FakeNexus, start_agent: Any) -> None:
    agent, task = await start_agent()
    first = await nexus.next_connection()
    await first.ws.close(4008, "slow down")
    await nexus.next_connection()
    assert not task.done()


async def test_it_retries_without_welcome(nexus: FakeNexus, start_agent: Any) -> None:
    nexus.send_welcome = False
    agent, _ = await start_agent(welcome_timeout=0.2)
    await nexus.next_connection()
    await nexus.next_connection()
    assert "welcome" in (agent.last_disconnect_reason or "")


async def test_backoff_grows_to_the_cap(nexus: FakeNexus, start_agent: Any) -> None:
    nexus.reject = [503] * 6
    # Jitter at its ceiling makes the delays deterministic: 0.05, 0.1, 0.2, 0.4, 0.5, 0.5.
    await start_agent(jitter=lambda ceiling: ceiling)
    conn = await nexus.next_connection()
    assert conn.hello is not None
    gaps = [b - a for a, b in zip(nexus.attempts, nexus.attempts[1:], strict=False)]
    expected = [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    assert len(gaps) == len(expected)
    for gap, want in zip(gaps, expected, strict=True):
        assert want * 0.9 <= gap <= want + 0.25, (gaps, expected)
    assert gaps[3] > gaps[0]
    assert max(gaps) <= 0.5 + 0.25


async def test_backoff_with_full_jitter_stays_under_the_cap(
    nexus: FakeNexus, start_agent: Any
) -> None:
    nexus.reject = [502] * 8
    await start_agent()
    await nexus.next_connection()
    gaps = [b - a for a, b in zip(nexus.attempts, nexus.attempts[1:], strict=False)]
    assert len(gaps) == 8
    assert all(g <= 0.5 + 0.25 for g in gaps), gaps


async def test_a_refused_credential_stops_with_exit_3(nexus: FakeNexus, start_agent: Any) -> None:
    nexus.reject = [503, 401]
    nexus.me_status = 401
    agent, task = await start_agent()
    assert await asyncio.wait_for(task, WAIT) == 3
    assert len(nexus.attempts) == 2
    assert nexus.me_checks == 1
    assert "credential refused" in (agent.last_disconnect_reason or "")


async def test_a_403_the_api_does_not_confirm_is_retried(
    nexus: FakeNexus, start_agent: Any
) -> None:
    """daphne answers 403 to a handshake its application did not accept in time (an overloaded
    server in a reconnect storm): the agent asks the API, which accepts the credential, and
    retries instead of exiting."""
    nexus.reject = [403, 403]
    nexus.me_status = 200
    agent, task = await start_agent()
    conn = await nexus.next_connection()
    assert conn.hello is not None
    assert len(nexus.attempts) == 3  # two refused handshakes, then the one that was accepted
    assert nexus.me_checks == 2
    assert not task.done()


@pytest.mark.parametrize(("code", "exit_code"), [(4001, 3), (4002, 4), (4003, 5)])
async def test_fatal_close_codes_stop_the_agent(
    nexus: FakeNexus, start_agent: Any, code: int, exit_code: int
) -> None:
    agent, task = await start_agent()
    conn = await nexus.next_connection()
    await conn.ws.close(code, "test")
    assert await asyncio.wait_for(task, WAIT) == exit_code
    assert len(nexus.attempts) == 1


async def test_a_server_older_than_the_agent_is_retried_at_the_longest_backoff(
    nexus: FakeNexus, start_agent: Any, agent_config: AgentConfig
) -> None:
    """Told plainly that the server is behind (error frame and close reason), the agent does
    not exit: during a rolling upgrade the server catches up, and the machine comes back."""
    ceilings: list[float] = []
    agent, task = await start_agent(jitter=lambda c: ceilings.append(c) or 0.0)
    conn = await nexus.next_connection()
    await conn.ws.send(dump(ServerError(code="protocol_too_new", detail="upgrade the server")))
    await conn.ws.close(4002, "protocol_too_new: agent speaks 3, server 1-2; upgrade the server")
    again = await nexus.next_connection()
    assert not task.done()
    assert "does not speak protocol" in (agent.last_disconnect_reason or "")
    assert "upgrade the server" in (agent.last_disconnect_reason or "")
    assert ceilings and ceilings[-1] == agent_config.backoff_max
    assert again.hello.capabilities == list(CAPABILITIES)


async def test_owner_arriving_sends_a_heartbeat_at_once(
    nexus: FakeNexus, start_agent: Any, presence: FilePresence
) -> None:
    nexus.heartbeat_seconds = 30  # a regular beat cannot explain what we see below
    await start_agent()
    conn = await nexus.next_connection()
    first = await conn.next_frame(is_type("heartbeat"))
    assert first.owner_present is False
    presence.set(True)
    flipped_at = time.monotonic()
    beat = await conn.next_frame(is_type("heartbeat"))
    assert beat.owner_present is True
    assert beat.idle_seconds == 3.0
    assert time.monotonic() - flipped_at < 1.0


async def test_request_stop_closes_with_1000(nexus: FakeNexus, start_agent: Any) -> None:
    agent, task = await start_agent()
    conn = await nexus.next_connection()
    await conn.next_frame(is_type("heartbeat"))
    started = time.monotonic()
    agent.request_stop()
    assert await asyncio.wait_for(task, WAIT) == 0
    assert time.monotonic() - started < 2.0
    await asyncio.wait_for(conn.closed.wait(), WAIT)
    assert conn.close_code == 1000


async def test_request_stop_during_backoff_is_prompt(
    nexus: FakeNexus, tmp_path: Path, start_agent: Any
) -> None:
    nexus.reject = [503] * 100
    config = write_config_file(
        tmp_path / "slow.toml", nexus.url, backoff_initial=30.0, backoff_max=60.0
    )
    agent, task = await start_agent(config)
    await wait_until(lambda: len(nexus.attempts) >= 1)
    agent.request_stop()
    assert await asyncio.wait_for(task, 2.0) == 0


async def test_debug_logs_never_show_the_credential(
    nexus: FakeNexus, start_agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    nexus.reject = [503]
    await start_agent()
    conn = await nexus.next_connection()
    await conn.next_frame(is_type("heartbeat"))
    # The stand-in server's own logger prints the header it receives; the agent's must not.
    ours = [r for r in caplog.records if r.name.startswith("nexcompute_agent")]
    assert ours
    assert all(CREDENTIAL not in r.getMessage() for r in ours)
    assert all("Authorization" not in r.getMessage() for r in ours)


def _agent_command() -> list[str]:
    script = Path(sys.executable).with_name("nexcompute-agent")
    if script.exists():
        return [str(script)]
    found = shutil.which("nexcompute-agent")
    return [found] if found else [sys.executable, "-m", "nexcompute_agent"]


@pytest.mark.timeout(30)
async def test_sigterm_stops_a_real_agent_process(
    nexus: FakeNexus, agent_config: AgentConfig
) -> None:
    assert agent_config.path is not None
    proc = await asyncio.create_subprocess_exec(
        *_agent_command(),
        "run",
        "--config",
        str(agent_config.path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        conn = await asyncio.wait_for(nexus.connections.get(), 15)
        await conn.next_frame(is_type("heartbeat"))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 3.0)
        assert time.monotonic() - started < 3.0
        assert proc.returncode == 0, stderr.decode()
        await asyncio.wait_for(conn.closed.wait(), WAIT)
        assert conn.close_code == 1000
        assert CREDENTIAL.encode() not in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_a_group_readable_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nexcompute_agent.cli import main

    path = tmp_path / "agent.toml"
    write_config_file(path, "http://127.0.0.1:9")
    path.chmod(0o644)
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "chmod 600" in err
    assert CREDENTIAL not in err
