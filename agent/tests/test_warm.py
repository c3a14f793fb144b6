"""Warm sandboxes (sessions/warm.py) with the real `jupyter lab` from the session environment,
in its sandbox, as real pool accounts: the hand-over's token, the warm token and cookie that
must stop working, and the discard (full wipe with its proof) when the owner returns or the
server turns the warm pool off."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
import uuid
from http.cookiejar import CookieJar
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import FakeNexus, Sent, needs_root, session_config, write_config_file
from tests.kernel import http

from nexcompute_agent.protocol import (
    SessionLimits,
    SessionStart,
    SessionStop,
    WarmSet,
    dump,
)
from nexcompute_agent.sessions import SessionManager
from nexcompute_agent.sessions.warm import WARM_BASE

if TYPE_CHECKING:
    from conftest import FilePresence

pytestmark = [needs_root, pytest.mark.timeout(300)]

LIMITS = SessionLimits(memory_bytes=2 << 30, max_tasks=512)
WARM_ON = WarmSet(msgid="w1", enabled=True, limits=LIMITS, terminals=True, max_age_seconds=600)


def _config(tmp_path: Path, workspace_root: Path, pool: tuple[str, int], env: Path) -> Any:
    return session_config(
        tmp_path, workspace_root, "nexcompute-no-such-user",
        session_pool_prefix=pool[0], session_pool_size=pool[1],
        jupyter_command=[str(env / "bin" / "jupyter"), "lab"],
        jupyter_start_timeout=60, session_stop_grace=3, session_max_processes=512,
        activity_seconds=30,
    )  # fmt: skip


def _agent_config(
    tmp_path: Path, nexus: FakeNexus, workspace_root: Path, pool: tuple[str, int], env: Path
) -> Any:
    """A whole agent's config file (the warm tests that run the agent against the fake Nexus)."""
    return write_config_file(
        tmp_path / "agent.toml", nexus.url,
        workspace_root=str(workspace_root), session_user="nexcompute-no-such-user",
        session_pool_prefix=pool[0], session_pool_size=pool[1],
        jupyter_command=[str(env / "bin" / "jupyter"), "lab"],
        jupyter_start_timeout=60, session_stop_grace=3, session_max_processes=512,
        session_cgroup="off", session_workspace_gb=0.25,
    )  # fmt: skip


async def _until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _status(url: str, *, token: str | None = None, opener: Any = None) -> int:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"token {token}")
    try:
        with (opener or urllib.request.build_opener()).open(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0  # nothing answers


async def test_hand_over_makes_the_session_token_valid_and_the_warm_token_and_cookie_useless(
    tmp_path: Path, workspace_root: Path, session_pool: tuple[str, int], session_env: Path
) -> None:
    sent = Sent()
    mgr = SessionManager(_config(tmp_path, workspace_root, session_pool, session_env), sent)
    keeper = asyncio.create_task(mgr.warm.run())
    try:
        mgr.warm.configure(WARM_ON)
        await _until(lambda: mgr.warm.ready, 90, "the warm sandbox")
        warm = mgr.warm.sandbox
        assert warm is not None and warm.url is not None
        wid = warm.record.session_id
        assert wid >= WARM_BASE and warm.record.user is not None
        assert warm.record.user.startswith(session_pool[0])  # a fresh pool account
        base = warm.url.split("/lab?")[0]
        warm_token = warm.msg.token
        memory = mgr.warm.memory_bytes()
        assert memory is not None and memory > 10 << 20  # a real Jupyter, idle

        # The attack: whoever held the warm token (it never leaves the agent, but suppose)
        # uses it, and takes a login cookie by the URL-token sign-in.
        assert _status(f"{base}/api/status", token=warm_token) == 200
        jar = CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        assert _status(f"{base}/lab?token={warm_token}", opener=browser) == 200
        assert any(c.name.startswith("username-") for c in jar), list(jar)
        assert _status(f"{base}/api/contents", opener=browser) == 200  # the cookie works
        assert not any(getattr(m, "session_id", 0) >= WARM_BASE for m in sent.messages)

        token = "sess-" + uuid.uuid4().hex
        t0 = time.monotonic()
        reply = mgr.start(
            SessionStart(msgid="s1", session_id=51, token=token, duration_seconds=600,
                         limits=LIMITS, terminals=True)
        )  # fmt: skip
        assert reply == {"warm": True}
        ready = await sent.wait("session.ready", timeout=10)
        handed = time.monotonic() - t0
        assert ready.session_id == 51 and ready.url == f"{base}/lab?token={token}"
        # Milliseconds in principle; bounded loosely here (a shared 2-core test machine).
        assert handed < 2.0, handed
        steps = [m.step for m in sent.of("session.progress") if m.session_id == 51]
        assert steps == ["allocated", "ready"]

        assert _status(f"{base}/api/status", token=token) == 200
        status, _ = await asyncio.to_thread(http, "GET", f"{base}/api/contents", token)
        assert status == 200
        assert _status(f"{base}/api/status", token=warm_token) == 403
        assert _status(f"{base}/lab?token={warm_token}") in (302, 403)
        assert _status(f"{base}/api/contents", opener=browser) == 403  # the old cookie is dead
        assert mgr.warm.sandbox is None and 51 in mgr.sessions

        mgr.stop(SessionStop(msgid="s2", session_id=51, reason="user"))
        receipt = await sent.wait("session.receipt", timeout=60)
        assert receipt.session_id == 51 and receipt.verified, receipt.checks
        assert any("warm sandbox" in d for d in receipt.details)
        assert not Path(warm.record.workspace).exists()
        # Its logs went with it (they are named by the warm id it was built under).
        logs = Path(mgr.config.state_dir)
        assert (logs / f"session-{wid}-jupyter.log").parent == logs
        assert not list(logs.glob(f"session-{wid}-*.log")), list(logs.iterdir())
        # The machine is free again: the next warm sandbox is built, under a new warm id.
        await _until(lambda: mgr.warm.ready, 90, "the next warm sandbox")
        assert mgr.warm.sandbox is not None and mgr.warm.sandbox.record.session_id != wid
    finally:
        keeper.cancel()
        mgr.warm.discard("test over")
        await mgr.wait_idle()
        await mgr.shutdown()


async def test_a_session_with_other_limits_starts_cold_and_the_warm_sandbox_is_wiped(
    tmp_path: Path, workspace_root: Path, session_pool: tuple[str, int], session_env: Path
) -> None:
    sent = Sent()
    mgr = SessionManager(_config(tmp_path, workspace_root, session_pool, session_env), sent)
    keeper = asyncio.create_task(mgr.warm.run())
    try:
        mgr.warm.configure(WARM_ON)
        await _until(lambda: mgr.warm.ready, 90, "the warm sandbox")
        assert mgr.warm.sandbox is not None
        warm_ws = Path(mgr.warm.sandbox.record.workspace)
        other = SessionLimits(memory_bytes=1 << 30, max_tasks=512)
        reply = mgr.start(SessionStart(msgid="s1", session_id=52, token="t-" + uuid.uuid4().hex,
                                       duration_seconds=600, limits=other))  # fmt: skip
        assert reply == {}  # a cold start
        ready = await sent.wait("session.ready", timeout=90)
        assert ready.session_id == 52
        receipt = await sent.wait("warm.receipt", timeout=60)
        # It goes at once, with the reason the session could not take it.
        why = "the session's limits differ from the warm sandbox's"
        assert receipt.verified and receipt.reason == why, receipt
        assert mgr.warm.last_reason == why
        assert not warm_ws.exists()
        assert mgr.warm.sandbox is None  # none while a session runs
    finally:
        # Session 52 runs for 600 s: its watch and activity tasks are what wait_idle waits
        # for, so it is stopped (and wiped) first; the keeper is stopped before, so that no
        # warm sandbox is built once the machine is free again.
        keeper.cancel()
        if 52 in mgr.sessions:
            mgr.stop(SessionStop(msgid="s2", session_id=52, reason="user"))
        mgr.warm.discard("test over")
        await mgr.wait_idle()
        await mgr.shutdown()
    done = await sent.wait("session.receipt", timeout=60)
    assert done.session_id == 52 and done.verified, done.checks


async def test_owner_returning_wipes_the_warm_sandbox_and_none_is_kept_while_present(
    tmp_path: Path,
    nexus: FakeNexus,
    workspace_root: Path,
    session_pool: tuple[str, int],
    session_env: Path,
    presence: FilePresence,
    start_agent: Any,
) -> None:
    cfg = _agent_config(tmp_path, nexus, workspace_root, session_pool, session_env)
    agent, _ = await start_agent(cfg)
    conn = await nexus.next_connection()
    assert "session.warm" in conn.hello.capabilities
    # Before warm.set the agent sends no warm field (an older server forbids it).
    beat = await conn.next_frame(lambda m: m.type == "heartbeat")
    assert beat.warm is None
    await conn.ws.send(dump(WARM_ON))
    await conn.next_frame(lambda m: m.type == "reply" and m.msgid == "w1")
    await asyncio.wait_for(_beat(conn, True), 90)
    warm = agent.sessions.warm.sandbox
    assert warm is not None and warm.url is not None
    ws = Path(warm.record.workspace)
    base = warm.url.split("/lab?")[0]
    assert ws.is_dir() and _status(f"{base}/api/status", token=warm.msg.token) == 200

    presence.set(True)  # the owner sits down
    receipt = await conn.next_frame(lambda m: m.type == "warm.receipt")
    assert receipt.verified and receipt.reason == "the owner is present", receipt
    assert receipt.processes_killed >= 1 and receipt.files_removed >= 1
    assert receipt.checks and all(c.ok for c in receipt.checks)
    assert not ws.exists()
    assert _status(f"{base}/api/status", token=warm.msg.token) == 0  # nothing listens
    # While they stay: heartbeats say no warm sandbox, and none is built.
    for _ in range(10):
        beat = await conn.next_frame(lambda m: m.type == "heartbeat")
        assert beat.owner_present and beat.warm is False
        assert agent.sessions.warm.sandbox is None and agent.sessions.warm.building is None
    presence.set(False)  # they leave: a new one is built (the check above could fail)
    await asyncio.wait_for(_beat(conn, True), 90)
    # Left tidy for the next test: switched off, wiped with its proof.
    await conn.ws.send(dump(WarmSet(msgid="w3", enabled=False, reason="test over")))
    receipt = await conn.next_frame(lambda m: m.type == "warm.receipt")
    assert receipt.verified and receipt.reason == "test over"


async def test_warm_pool_turned_off_by_the_server_wipes_it_and_keeps_none(
    tmp_path: Path,
    nexus: FakeNexus,
    workspace_root: Path,
    session_pool: tuple[str, int],
    session_env: Path,
    start_agent: Any,
) -> None:
    cfg = _agent_config(tmp_path, nexus, workspace_root, session_pool, session_env)
    agent, _ = await start_agent(cfg)
    conn = await nexus.next_connection()
    await conn.ws.send(dump(WARM_ON))
    await asyncio.wait_for(_beat(conn, True), 90)
    warm = agent.sessions.warm.sandbox
    assert warm is not None
    ws = Path(warm.record.workspace)
    off = WarmSet(msgid="w2", enabled=False, reason="lab Physics is closed")
    await conn.ws.send(dump(off))
    receipt = await conn.next_frame(lambda m: m.type == "warm.receipt")
    assert receipt.verified and receipt.reason == "lab Physics is closed"
    assert not ws.exists()
    for _ in range(10):
        beat = await conn.next_frame(lambda m: m.type == "heartbeat")
        assert beat.warm is False and agent.sessions.warm.sandbox is None


async def _beat(conn: Any, warm: bool) -> None:
    while True:
        beat = await conn.next_frame(lambda m: m.type == "heartbeat")
        if beat.warm is warm:
            return
