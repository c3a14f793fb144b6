"""The session runtime against real processes: the fake Jupyter under tests/bin, a real session
user, the cloudflared stand-in. Each test checks the OS afterwards, not only the receipt."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pwd
import stat
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    CREDENTIAL,
    FAKE_JUPYTER,
    TEST_SESSION_USER,
    Sent,
    needs_root,
    session_config,
)

from nexcompute_agent.protocol import SessionStart, SessionStop
from nexcompute_agent.sessions import SessionManager, SessionRefused
from nexcompute_agent.sessions.cleanup import user_processes

pytestmark = [needs_root, pytest.mark.timeout(120)]

TOKEN = "-tok3n_starting-with-dash"
STANDIN = Path(__file__).resolve().parents[2] / "tests" / "standins" / "cloudflared"
FAKE = FAKE_JUPYTER  # where the session account can run it (conftest)
ALLOWED_ENV = {
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "JUPYTER_CONFIG_DIR",
    "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_PLATFORM_DIRS", "IPYTHONDIR",
    "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR",
    "TMPDIR", "PYTHONUSERBASE", "PWD",
}  # fmt: skip


def start_msg(session_id: int = 5, **kw: Any) -> SessionStart:
    return SessionStart(
        msgid=f"m{session_id}", session_id=session_id, token=TOKEN, duration_seconds=3600, **kw
    )


def stop_msg(session_id: int = 5) -> SessionStop:
    return SessionStop(msgid=f"s{session_id}", session_id=session_id, reason="ended by user")


def user_uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def temp_leftovers(uid: int) -> list[str]:
    """Files of ``uid`` in the host's temp folders (the sandbox's own are private tmpfs)."""
    from nexcompute_agent.sessions.wiper import Account, find_owned

    found, error = find_owned(
        Account(name="?", uid=uid, gid=uid), roots=["/tmp", "/var/tmp", "/dev/shm"]
    )
    assert error is None, error
    return [f for f in found if not f.startswith("/var/tmp/nexcompute-ws-")]  # workspaces


def wrapper(tmp_path: Path, **env: str) -> str:
    """A cloudflared on which the stand-in's knobs are set (the agent gives it a clean env)."""
    path = tmp_path / "cloudflared"
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    path.write_text(f'#!/bin/sh\n{exports} exec {STANDIN} "$@"\n')
    path.chmod(0o755)
    return str(path)


@pytest.fixture(autouse=True)
def nothing_of_the_session_account_outlives_a_test(session_user: str) -> Any:
    """Each test waits for what it started to be wiped: a process of the session account left
    behind fails the test that left it (and is ended), not the next start on that account."""
    yield
    left = user_processes(user_uid(session_user))
    described = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"{p.pid} {' '.join(p.cmdline()[:2])}")
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(left, timeout=5)
    assert not described, f"the test left processes of {session_user}: {described}"


@pytest.fixture
def make(tmp_path: Path, workspace_root: Path, session_user: str) -> Any:
    def build(**overrides: Any) -> tuple[SessionManager, Sent]:
        sent = Sent()
        config = session_config(tmp_path, workspace_root, session_user, **overrides)
        return SessionManager(config, sent), sent

    return build


async def test_it_starts_jupyter_as_the_session_user_and_wipes_everything(
    make: Any, session_user: str, workspace_root: Path
) -> None:
    cmd = [str(FAKE), "lab", "--fake-spawn"]
    mgr, sent = make(jupyter_command=cmd)
    capability = "nxcap_5_" + "c" * 43
    assert mgr.start(start_msg(terminals=False, capability=capability)) == {}
    ready = await sent.wait("session.ready")
    steps = [m.step for m in sent.of("session.progress")]
    # direct: no tunnel to open, so no such step (a cloudflared one has it: the quick tunnel's
    # test); the URL goes before the last step, which the server handles after it.
    assert steps == ["allocated", "workspace_ready", "jupyter_starting", "ready"]
    frames = [(m.type, getattr(m, "step", "")) for m in sent.messages]
    assert frames.index(("session.ready", "")) < frames.index(("session.progress", "ready"))
    assert ready.url.startswith("http://127.0.0.1:")
    assert ready.url.endswith(f"/lab?token={TOKEN}")
    assert [r.session_id for r in mgr.live()] == [5]

    ws = workspace_root / "5"
    st = ws.stat()
    uid = user_uid(session_user)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o700)
    seen = json.loads((ws / "fake-env.json").read_text())
    assert seen["uid"] == uid
    assert set(seen["env"]) <= ALLOWED_ENV
    assert seen["env"]["HOME"] == str(ws)
    assert not any(TOKEN in v for v in seen["env"].values())  # not inherited by kernels
    # The door's configuration: 0600, the session account's, with the token and the session.
    conf = ws / ".jupyter" / "jupyter_server_config.json"
    cst = conf.stat()
    assert (cst.st_uid, stat.S_IMODE(cst.st_mode)) == (uid, 0o600)
    door = json.loads(conf.read_text())
    assert door["IdentityProvider"]["token"] == TOKEN
    assert door["NexusIdentityProvider"]["session_id"] == 5
    # The extension's: enabled, with this session's capability (only in this 0600 file).
    assert door["ServerApp"]["jpserver_extensions"] == {"nexcompute_jupyter": True}
    assert door["NexComputeExtension"]["capability"] == capability
    assert door["NexComputeExtension"]["session_id"] == 5
    assert not any(capability in v for v in seen["env"].values())
    assert not any(capability in a for a in seen["argv"])
    assert CREDENTIAL not in conf.read_text()
    assert (
        "--ServerApp.identity_provider_class=nexcompute_jupyter.identity.NexusIdentityProvider"
        in seen["argv"]
    )
    assert CREDENTIAL not in json.dumps(seen)
    assert not any(TOKEN in a for a in seen["argv"])  # not visible in ps
    assert "--ServerApp.terminals_enabled=False" in seen["argv"]
    assert "--ip=127.0.0.1" in seen["argv"]
    state = json.loads((Path(mgr.config.state_dir) / "sessions.json").read_text())
    assert stat.S_IMODE((Path(mgr.config.state_dir) / "sessions.json").stat().st_mode) == 0o600
    assert state["sessions"]["5"]["procs"][0]["create_time"] > 0

    for _ in range(50):  # the daemon writes its pid once it has double-forked
        if (ws / "daemon.pid").exists():
            break
        await asyncio.sleep(0.05)
    daemon = int((ws / "daemon.pid").read_text())
    # The pid the daemon sees is its pid in the sandbox's own PID namespace.
    inside = {int(line.split()[-1]) for p in user_processes(uid)
              for line in Path(f"/proc/{p.pid}/status").read_text().splitlines()
              if line.startswith("NSpid:") and len(line.split()) == 3}  # fmt: skip
    assert daemon in inside and daemon < 100
    # The fake wrote to /tmp, /var/tmp and /dev/shm: the sandbox's own, not the host's.
    assert not temp_leftovers(uid)

    assert mgr.stop(stop_msg()) == {"known": True}
    receipt = await sent.wait("session.receipt")
    assert receipt.verified, receipt.details
    assert receipt.files_removed >= 8
    assert receipt.bytes_removed >= 1000
    assert receipt.processes_killed >= 2  # Jupyter and the double-forked daemon
    assert receipt.account == session_user
    assert {c.name for c in receipt.checks} >= {"sandbox", "processes", "files", "keyring"}
    assert all(c.ok for c in receipt.checks)
    assert not user_processes(uid)
    assert not temp_leftovers(uid)
    assert not ws.exists()
    assert Path("/etc/passwd").stat().st_size > 0  # the planted symlink was not followed
    assert mgr.live() == []
    assert json.loads((Path(mgr.config.state_dir) / "sessions.json").read_text())["sessions"] == {}


async def test_a_second_session_is_refused_and_a_duplicate_start_is_ok(make: Any) -> None:
    mgr, sent = make()
    mgr.start(start_msg(5))
    assert mgr.start(start_msg(5)) == {"duplicate": True}
    with pytest.raises(SessionRefused, match="already runs session 5"):
        mgr.start(start_msg(6))
    ready = await sent.wait("session.ready")
    assert mgr.start(start_msg(5)) == {"duplicate": True}
    assert sent.of("session.ready") == [ready, ready]  # the URL again, for a server unsure
    mgr.stop(stop_msg(5))
    assert (await sent.wait("session.receipt")).verified


async def test_a_running_session_reports_jupyters_activity(make: Any) -> None:
    mgr, sent = make(activity_seconds=0.2)
    mgr.start(start_msg())
    ready = await sent.wait("session.ready")
    first = await sent.wait("session.activity")
    # One report right after session.ready, then one every activity_seconds.
    assert sent.messages.index(first) > sent.messages.index(ready)
    assert first.session_id == 5
    # The fake Jupyter has a busy kernel: by the agent's rule (docs/policy.md) the session is
    # active now, whatever Jupyter's own last_activity (2026-01-02) says.
    assert first.source == "kernel"
    assert first.last_activity is not None
    assert abs((datetime.now(timezone.utc) - first.last_activity).total_seconds()) < 30
    assert (first.kernels_busy, first.connections) == (1, 2)
    t0 = time.monotonic()
    await sent.wait("session.activity", count=3)
    assert time.monotonic() - t0 >= 0.3
    task = mgr.sessions[5].activity
    mgr.stop(stop_msg())
    receipt = await sent.wait("session.receipt")
    assert receipt.verified
    assert task is not None and task.done()
    count = len(sent.of("session.activity"))
    await asyncio.sleep(0.5)
    assert len(sent.of("session.activity")) == count  # the reporter stopped with the session
    assert all(
        sent.messages.index(m) < sent.messages.index(receipt) for m in sent.of("session.activity")
    )


async def test_a_failed_activity_poll_is_skipped_and_the_session_lives_on(make: Any) -> None:
    mgr, sent = make(
        jupyter_command=[str(FAKE), "lab", "--fake-kernels-error"], activity_seconds=0.1
    )
    mgr.start(start_msg())
    await sent.wait("session.ready")
    await asyncio.sleep(0.6)
    assert not sent.of("session.activity")
    assert not sent.of("session.failed")
    assert [r.session_id for r in mgr.live()] == [5]
    task = mgr.sessions[5].activity
    assert task is not None and not task.done()  # still polling
    mgr.stop(stop_msg())
    assert (await sent.wait("session.receipt")).verified


async def test_activity_reports_are_not_kept_while_disconnected(make: Any) -> None:
    mgr, sent = make(activity_seconds=0.1)
    mgr.start(start_msg())
    await sent.wait("session.activity")
    sent.connected = False
    await asyncio.sleep(0.4)
    assert not any(m.type == "session.activity" for m in mgr.pending)
    sent.connected = True
    count = len(sent.of("session.activity"))
    await sent.wait("session.activity", count=count + 1)
    mgr.stop(stop_msg())
    assert (await sent.wait("session.receipt")).verified


async def test_jupyter_that_never_gets_ready_fails_and_is_wiped(
    make: Any, session_user: str
) -> None:
    mgr, sent = make(
        jupyter_command=[str(FAKE), "lab", "--fake-mode=never"], jupyter_start_timeout=1
    )
    mgr.start(start_msg())
    failed = await sent.wait("session.failed")
    assert "did not answer /api/status within 1s" in failed.error
    receipt = await sent.wait("session.receipt")
    assert receipt.verified and receipt.processes_killed >= 1
    assert not sent.of("session.ready")
    assert not user_processes(user_uid(session_user))


async def test_a_workspace_already_there_refuses_the_start(make: Any, workspace_root: Path) -> None:
    """Checked alone, before the account's checks and the workspace's making run side by side:
    a start never builds on (or mounts over) what is already at its workspace path."""
    planted = workspace_root / "5"
    planted.mkdir(parents=True)
    (planted / "left-behind").write_text("x")
    mgr, sent = make(jupyter_command=[str(FAKE), "lab", "--fake-spawn"])
    mgr.start(start_msg())
    failed = await sent.wait("session.failed")
    assert f"{planted} exists before the start" in failed.error
    receipt = await sent.wait("session.receipt")
    assert not receipt.verified  # quarantined: staff look at the machine
    assert not sent.of("session.ready")
    assert "workspace_ready" not in [m.step for m in sent.of("session.progress")]


async def test_jupyter_that_exits_at_once_fails_with_its_message(make: Any) -> None:
    mgr, sent = make(jupyter_command=[str(FAKE), "lab", "--fake-mode=exit"])
    mgr.start(start_msg())
    failed = await sent.wait("session.failed")
    assert "exited with code 3" in failed.error
    assert "refusing to start (test)" in failed.error
    assert (await sent.wait("session.receipt")).verified


async def test_jupyter_that_ignores_sigterm_is_killed(make: Any, session_user: str) -> None:
    mgr, sent = make(jupyter_command=[str(FAKE), "lab", "--fake-mode=ignore-term"])
    mgr.start(start_msg())
    await sent.wait("session.ready")
    t0 = time.monotonic()
    mgr.stop(stop_msg())
    receipt = await sent.wait("session.receipt")
    assert time.monotonic() - t0 < 15  # 0.5 s SIGINT + 0.5 s SIGTERM, SIGKILL, then the wipe
    assert receipt.verified
    assert any("ignored SIGINT and SIGTERM for 0.5s each; killed" in d for d in receipt.details)
    assert not user_processes(user_uid(session_user))


async def test_jupyter_dying_mid_session_ends_it(make: Any) -> None:
    mgr, sent = make(jupyter_command=[str(FAKE), "lab", "--fake-mode=die-after", "--fake-delay=1"])
    mgr.start(start_msg())
    await sent.wait("session.ready")
    failed = await sent.wait("session.failed")
    assert "Jupyter exited unexpectedly with code 1" in failed.error
    assert (await sent.wait("session.receipt")).verified
    assert mgr.live() == []


async def test_a_fork_bomb_stops_at_the_process_limit_and_is_cleaned(
    make: Any, session_user: str, workspace_root: Path
) -> None:
    mgr, sent = make(jupyter_command=[str(FAKE), "lab", "--fake-bomb=300"])
    mgr.start(start_msg())
    await sent.wait("session.ready")
    bomb = workspace_root / "5" / "bomb.txt"
    for _ in range(100):
        if bomb.exists() and bomb.read_text():
            break
        await asyncio.sleep(0.05)
    assert 10 < int(bomb.read_text()) < 64  # RLIMIT_NPROC=64 of the account stopped it
    mgr.stop(stop_msg())
    receipt = await sent.wait("session.receipt")
    assert receipt.verified, receipt.details
    assert receipt.processes_killed > 10
    assert not user_processes(user_uid(session_user))


async def test_a_session_user_that_cannot_run_jupyter_gets_a_plain_message(
    make: Any, tmp_path: Path
) -> None:
    private = tmp_path / "private-venv" / "bin"  # under pytest's 0700 tmp dir, like /root
    private.mkdir(parents=True)
    jupyter = private / "jupyter"
    jupyter.write_text(FAKE.read_text())
    jupyter.chmod(0o755)
    mgr, sent = make(jupyter_command=[str(jupyter), "lab"])
    mgr.start(start_msg())
    failed = await sent.wait("session.failed")
    assert f"{TEST_SESSION_USER} cannot run" in failed.error
    assert "make-session-env.sh" in failed.error
    assert (await sent.wait("session.receipt")).verified


async def test_a_jupyter_command_not_on_path_fails(make: Any) -> None:
    mgr, sent = make(jupyter_command=["no-such-jupyter-here", "lab"])
    mgr.start(start_msg())
    failed = await sent.wait("session.failed")
    assert "was not found on the agent's PATH" in failed.error


async def test_a_stop_for_an_unknown_session_wipes_its_leftovers(
    make: Any, session_user: str, workspace_root: Path
) -> None:
    uid = user_uid(session_user)
    ws = workspace_root / "77"
    (ws / "sub").mkdir(parents=True)
    (ws / "sub" / "file").write_text("left behind")
    os.chown(ws, uid, uid)
    stray = subprocess.Popen(["sleep", "60"], user=uid, start_new_session=True)
    mgr, sent = make()
    assert mgr.stop(stop_msg(77)) == {"known": False}
    receipt = await sent.wait("session.receipt")
    stray.wait(5)
    assert receipt.session_id == 77 and receipt.verified, receipt.checks
    # Entries removed: the workspace, its folder and its file.
    assert receipt.files_removed == 3 and receipt.processes_killed == 1
    assert "unknown to this agent" in receipt.details[0]
    assert not ws.exists()
    assert not user_processes(uid)


async def crash(mgr: SessionManager) -> None:
    """The agent "crashes": its objects are gone (its tasks end without a word), its processes
    and files are not. (A real kill -9 of a real agent: tests/test_sessions_e2e.py.)"""
    for task in list(mgr._tasks):
        task.cancel()
    await asyncio.gather(*mgr._tasks, return_exceptions=True)


async def test_after_a_crash_a_running_session_is_taken_back(
    make: Any, session_user: str, workspace_root: Path
) -> None:
    mgr, sent = make(jupyter_command=[str(FAKE), "lab", "--fake-spawn"])
    mgr.start(start_msg(9))
    ready = await sent.wait("session.ready")
    await crash(mgr)
    uid = user_uid(session_user)
    before = {p.pid for p in user_processes(uid)}
    assert before
    mgr2, sent2 = make(jupyter_command=[str(FAKE), "lab", "--fake-spawn"])
    sent2.connected = False
    await mgr2.recover()
    assert [(r.session_id, r.state) for r in mgr2.live()] == [(9, "running")]
    assert mgr2.pending == [], "nothing to report: the URL is the same"
    assert mgr2.sessions[9].url == ready.url
    assert {p.pid for p in user_processes(uid)} == before, "the same processes, none replaced"
    # Once taken back it is watched again: a stop ends and proves it as usual.
    sent2.connected = True
    mgr2.stop(stop_msg(9))
    receipt = await sent2.wait("session.receipt")
    assert receipt.verified, receipt.checks
    assert not user_processes(uid) and not (workspace_root / "9").exists()


@pytest.mark.parametrize("keep", [True, False])
async def test_a_stopping_agent_leaves_running_sessions_for_the_next_when_configured(
    make: Any, session_user: str, workspace_root: Path, keep: bool
) -> None:
    """An upgrade (`systemctl restart`, keep_sessions_on_stop) leaves the session running and
    the next agent takes it back; otherwise a stop ends it and the next agent wipes it."""
    cmd = [str(FAKE), "lab", "--fake-spawn"]
    mgr, sent = make(jupyter_command=cmd, keep_sessions_on_stop=keep)
    mgr.start(start_msg(9))
    await sent.wait("session.ready")
    uid = user_uid(session_user)
    before = {p.pid for p in user_processes(uid)}
    await mgr.shutdown()
    if keep:
        assert {p.pid for p in user_processes(uid)} == before
    # Otherwise Jupyter was stopped; whatever it left is the next agent's to wipe.
    mgr2, sent2 = make(jupyter_command=cmd, keep_sessions_on_stop=keep)
    sent2.connected = False
    await mgr2.recover()
    state = "running" if keep else "ended"
    assert [(r.session_id, r.state) for r in mgr2.live()] == [(9, state)]
    sent2.connected = True
    mgr2.flush()
    if keep:
        mgr2.stop(stop_msg(9))
    receipt = await sent2.wait("session.receipt")
    assert receipt.verified, receipt.checks
    assert not user_processes(uid)


async def test_a_recorded_sandbox_with_another_start_time_is_never_taken_back(
    make: Any, session_user: str, workspace_root: Path
) -> None:
    """Pids are recycled: the record's init pid alone proves nothing. A state file whose start
    time does not match (the attack: a pid now held by something else) is wiped, not adopted."""
    mgr, sent = make(jupyter_command=[str(FAKE), "lab", "--fake-spawn"])
    mgr.start(start_msg(9))
    await sent.wait("session.ready")
    await crash(mgr)
    path = Path(mgr.config.state_dir) / "sessions.json"
    state = json.loads(path.read_text())
    state["sessions"]["9"]["init_create_time"] -= 3.0
    path.write_text(json.dumps(state))
    mgr2, sent2 = make()
    sent2.connected = False
    await mgr2.recover()
    assert [(r.session_id, r.state) for r in mgr2.live()] == [(9, "ended")]
    failed, receipt = mgr2.pending
    assert failed.type == "session.failed" and failed.phase == "running"
    assert "init is not the one recorded" in failed.error
    assert receipt.type == "session.receipt" and receipt.verified
    assert not user_processes(user_uid(session_user))


async def test_after_a_crash_a_dead_jupyter_is_wiped_and_reported(
    make: Any, session_user: str, workspace_root: Path
) -> None:
    mgr, sent = make(jupyter_command=[str(FAKE), "lab", "--fake-spawn"])
    mgr.start(start_msg(9))
    await sent.wait("session.ready")
    await crash(mgr)
    uid = user_uid(session_user)
    # With the agent away, Jupyter dies too.
    for proc in user_processes(uid):
        proc.kill()
    deadline = asyncio.get_running_loop().time() + 10
    while user_processes(uid) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert not user_processes(uid)
    mgr2, sent2 = make()
    sent2.connected = False  # before hello: nothing can be sent yet
    await mgr2.recover()
    # Told in hello as ended, so the server waits for the reason instead of "agent lost".
    assert [(r.session_id, r.state) for r in mgr2.live()] == [(9, "ended")]
    assert not (workspace_root / "9").exists()
    failed, receipt = mgr2.pending
    assert failed.phase == "running" and "did not survive the agent restart" in failed.error
    assert receipt.session_id == 9 and receipt.verified
    assert "agent restarted" in receipt.details[0]
    state = json.loads((Path(mgr2.config.state_dir) / "sessions.json").read_text())
    assert state["sessions"] == {} and len(state["receipts"]) == 1
    sent2.connected = True
    mgr2.flush()
    assert sent2.of("session.failed") == [failed]
    assert sent2.of("session.receipt") == [receipt]
    assert mgr2.pending == [] and mgr2.live() == []


# --- tunnels -------------------------------------------------------------------------------------


async def test_quick_tunnel_url_comes_from_the_metrics_server(
    make: Any, tmp_path: Path, session_user: str
) -> None:
    cf = wrapper(tmp_path, CLOUDFLARED_STANDIN_HOSTNAME="calm-river-test.trycloudflare.com")
    mgr, sent = make(tunnel={"kind": "cloudflared-quick", "cloudflared": cf})
    mgr.start(start_msg())
    ready = await sent.wait("session.ready")
    assert ready.url == f"https://calm-river-test.trycloudflare.com/lab?token={TOKEN}"
    steps = [m.step for m in sent.of("session.progress")]
    assert steps == ["allocated", "workspace_ready", "jupyter_starting", "tunnel_opening", "ready"]
    tunnel = mgr.sessions[5].tunnel
    assert tunnel is not None and tunnel.process is not None
    tpid = tunnel.process.pid
    argv = psutil.Process(tpid).cmdline()
    assert "--no-autoupdate" in argv and "--url" in argv
    seen = json.loads((Path(mgr.sessions[5].record.workspace) / "fake-env.json").read_text())
    assert "--ServerApp.allow_remote_access=True" in seen["argv"]
    mgr.stop(stop_msg())
    receipt = await sent.wait("session.receipt")
    assert receipt.verified, receipt.details
    assert not psutil.pid_exists(tpid) or psutil.Process(tpid).status() == "zombie"


@pytest.mark.parametrize("tunnel_died", [False, True])
async def test_after_a_crash_the_tunnel_is_taken_back_or_opened_again(
    make: Any, tmp_path: Path, session_user: str, tunnel_died: bool
) -> None:
    cf = wrapper(tmp_path, CLOUDFLARED_STANDIN_HOSTNAME="calm-river-test.trycloudflare.com")
    tunnel_cfg = {"kind": "cloudflared-quick", "cloudflared": cf}
    mgr, sent = make(jupyter_command=[str(FAKE), "lab", "--fake-spawn"], tunnel=tunnel_cfg)
    mgr.start(start_msg(9))
    ready = await sent.wait("session.ready")
    tunnel = mgr.sessions[9].tunnel
    assert tunnel is not None and tunnel.process is not None
    tpid = tunnel.process.pid
    await crash(mgr)
    if tunnel_died:
        # It died with the agent (or on its own); a new quick tunnel gets a new name.
        psutil.Process(tpid).kill()
        wrapper(tmp_path, CLOUDFLARED_STANDIN_HOSTNAME="new-name-test.trycloudflare.com")
    mgr2, sent2 = make(jupyter_command=[str(FAKE), "lab", "--fake-spawn"], tunnel=tunnel_cfg)
    sent2.connected = False
    await mgr2.recover()
    assert [(r.session_id, r.state) for r in mgr2.live()] == [(9, "running")]
    again = mgr2.sessions[9].tunnel
    assert again is not None and again.process is not None
    if tunnel_died:
        assert again.process.pid != tpid
        [new_ready] = mgr2.pending
        assert new_ready.url == f"https://new-name-test.trycloudflare.com/lab?token={TOKEN}"
    else:
        assert again.process.pid == tpid and again.process.adopted
        assert mgr2.pending == [] and mgr2.sessions[9].url == ready.url
    sent2.connected = True
    mgr2.flush()
    mgr2.stop(stop_msg(9))
    receipt = await sent2.wait("session.receipt")
    assert receipt.verified, receipt.checks
    pid = again.process.pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


async def test_a_program_squatting_cloudflareds_metrics_port_cannot_choose_the_url(
    make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: something else on the host binds the metrics port the agent picked before
    cloudflared does and answers /ready and /quicktunnel itself, so that the owner would be
    sent (with a one-time code) to the attacker's hostname. Only cloudflared's own socket is
    believed."""
    import http.server
    import threading

    from nexcompute_agent.sessions import tunnel as tunnel_mod

    asked: list[str] = []

    class Squatter(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = b'{"hostname": "evil-test.example"}' if self.path == "/quicktunnel" else b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    squatter = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Squatter)
    threading.Thread(target=squatter.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(tunnel_mod, "free_port", lambda: squatter.server_address[1])
        cf = wrapper(tmp_path, CLOUDFLARED_STANDIN_HOSTNAME="calm-river-test.trycloudflare.com")
        mgr, sent = make(tunnel={"kind": "cloudflared-quick", "cloudflared": cf})
        mgr.start(start_msg())
        failed = await sent.wait("session.failed")
        assert "/ready" in asked, "the squatter was asked: the attack really happened"
        assert "another program answers on cloudflared's metrics port" in failed.error
        assert sent.of("session.ready") == [], "no URL of the squatter's choosing went out"
        assert (await sent.wait("session.receipt")).verified
    finally:
        squatter.shutdown()
        squatter.server_close()


async def test_quick_tunnel_without_network_fails_with_its_message(
    make: Any, tmp_path: Path
) -> None:
    cf = wrapper(tmp_path, CLOUDFLARED_STANDIN_FAULT="no-network")
    mgr, sent = make(tunnel={"kind": "cloudflared-quick", "cloudflared": cf})
    mgr.start(start_msg())
    failed = await sent.wait("session.failed")
    assert "cloudflared exited with code 1" in failed.error
    assert "failed to request quick Tunnel" in failed.error
    assert (await sent.wait("session.receipt")).verified


async def test_a_tunnel_that_never_registers_times_out(make: Any, tmp_path: Path) -> None:
    cf = wrapper(tmp_path, CLOUDFLARED_STANDIN_FAULT="wrong-secret")
    mgr, sent = make(
        tunnel={"kind": "cloudflared-quick", "cloudflared": cf}, tunnel_start_timeout=1
    )
    mgr.start(start_msg())
    failed = await sent.wait("session.failed")
    assert "not ready within 1s (/ready answered 503)" in failed.error
    receipt = await sent.wait("session.receipt")
    assert receipt.verified and receipt.processes_killed >= 2  # Jupyter and cloudflared


async def test_a_tunnel_that_exits_mid_session_ends_it(make: Any, tmp_path: Path) -> None:
    cf = wrapper(tmp_path, CLOUDFLARED_STANDIN_EXIT_AFTER="0.5")
    mgr, sent = make(tunnel={"kind": "cloudflared-quick", "cloudflared": cf})
    mgr.start(start_msg())
    await sent.wait("session.ready")
    failed = await sent.wait("session.failed")
    assert "the tunnel ended unexpectedly: cloudflared exited with code 1" in failed.error
    assert (await sent.wait("session.receipt")).verified


def named_token() -> str:
    body = {"a": "acct", "s": base64.b64encode(b"secret" * 6).decode(), "t": "uuid-1"}
    return base64.b64encode(json.dumps(body).encode()).decode()


async def test_named_tunnel_uses_the_configured_hostname_and_keeps_the_token_off_argv(
    make: Any, tmp_path: Path, free_tcp_port: int
) -> None:
    token = named_token()
    mgr, sent = make(
        tunnel={
            "kind": "cloudflared-named",
            "cloudflared": str(STANDIN),
            "token": token,
            "hostname": "lab-7.example.org",
            "origin_port": free_tcp_port,
        }
    )
    mgr.start(start_msg())
    ready = await sent.wait("session.ready")
    assert ready.url == f"https://lab-7.example.org/lab?token={TOKEN}"
    tunnel = mgr.sessions[5].tunnel
    assert tunnel is not None and tunnel.process is not None
    proc = psutil.Process(tunnel.process.pid)
    assert "run" in proc.cmdline() and token not in " ".join(proc.cmdline())
    assert proc.environ()["TUNNEL_TOKEN"] == token
    seen = json.loads((Path(mgr.sessions[5].record.workspace) / "fake-env.json").read_text())
    assert f"--port={free_tcp_port}" in seen["argv"]
    mgr.stop(stop_msg())
    assert (await sent.wait("session.receipt")).verified


async def test_named_tunnel_with_a_bad_token_fails(make: Any) -> None:
    mgr, sent = make(
        tunnel={
            "kind": "cloudflared-named",
            "cloudflared": str(STANDIN),
            "token": "not-a-token",
            "hostname": "lab-7.example.org",
        }
    )
    mgr.start(start_msg())
    failed = await sent.wait("session.failed")
    assert "exited with code 255" in failed.error
    assert "Provided Tunnel token is not valid." in failed.error
    receipt = await sent.wait("session.receipt")  # Jupyter had started: it is ended and wiped
    assert receipt.verified and receipt.processes_killed >= 1


@pytest.fixture
def free_tcp_port() -> int:
    from nexcompute_agent.sessions.http import free_port

    return free_port()


async def test_without_a_session_user_the_wipe_finds_processes_by_their_marker(
    make: Any, workspace_root: Path
) -> None:
    """The unprivileged agent's scope: recorded processes and the environment marker, which a
    double-forked child inherits, plus the workspace."""
    from nexcompute_agent.sessions.state import SessionRecord

    ws = workspace_root / "31"
    ws.mkdir()
    (ws / "f").write_text("x")
    env = {**os.environ, "NEXCOMPUTE_SESSION_ID": "31"}
    subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 &"], env=env, check=True)
    mgr, _ = make()
    record = SessionRecord(session_id=31, workspace=str(ws), user=None, uid=None, started_at=0)
    receipt = await mgr._wipe(record)
    assert receipt.verified and receipt.processes_killed == 1 and receipt.files_removed == 2
    assert "the session's own processes and its workspace" in receipt.details[-2]


async def test_a_stop_during_start_cancels_it_and_wipes(make: Any, session_user: str) -> None:
    mgr, sent = make(jupyter_command=[str(FAKE), "lab", "--fake-mode=never"])
    mgr.start(start_msg())
    deadline = time.monotonic() + 60
    while "jupyter_starting" not in [m.step for m in sent.of("session.progress")]:
        assert not sent.of("session.failed"), sent.of("session.failed")
        assert time.monotonic() < deadline, "Jupyter never began to start"
        await asyncio.sleep(0.02)
    mgr.stop(stop_msg())
    receipt = await sent.wait("session.receipt")
    assert receipt.verified and receipt.processes_killed >= 1
    assert not sent.of("session.ready") and not sent.of("session.failed")
    assert not user_processes(user_uid(session_user))
    assert mgr.live() == []


def test_jupyter_subcommands_are_started_without_the_dispatcher(tmp_path: Path) -> None:
    """`…/jupyter lab` runs `…/jupyter-lab` (what the dispatcher would exec) when it is there."""
    from nexcompute_agent.sessions.manager import direct_subcommand

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("jupyter", "jupyter-lab", "jupyter-notes"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755 if name != "jupyter-notes" else 0o644)
    jupyter = str(bin_dir / "jupyter")
    assert direct_subcommand([jupyter, "lab", "--x=1"]) == [str(bin_dir / "jupyter-lab"), "--x=1"]
    assert direct_subcommand([jupyter, "notes"]) == [jupyter, "notes"]  # not executable
    assert direct_subcommand([jupyter, "server"]) == [jupyter, "server"]  # not there
    assert direct_subcommand([jupyter, "--paths"]) == [jupyter, "--paths"]
    assert direct_subcommand([str(FAKE), "lab"]) == [str(FAKE), "lab"]
