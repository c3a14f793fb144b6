"""Sessions end to end with real processes: daphne, a Celery worker, Redis, PostgreSQL, the real
agent as root with a real session user, and real `jupyter lab` from the session environment."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import grp
import io
import os
import pwd
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from accounts.models import User
from accounts.services import api_token_create
from machines.models import Machine, MachineStatus
from sessions.models import ComputeSession
from tests.kernel import run_code, start_kernel
from tests.procs import ROOT, ProcessSet, free_port, wait_for
from tests.test_agent_link import enroll

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# One account per test run: concurrent runs on one host (helpers, CI) would otherwise share it,
# and one run's teardown (pkill -KILL -u, userdel) would kill another run's Jupyter.
SESSION_USER = f"nexsess-e2e{os.getpid() % 100000}"
STANDIN = ROOT / "tests" / "standins" / "cloudflared"

KERNEL_CODE = """
import os, subprocess
open(os.path.expanduser('~/from-kernel.txt'), 'w').write('hello' * 100)
open('/tmp/nexsess-e2e-kernel.txt', 'w').write('temp')
print('tmp ok' if os.path.exists('/tmp/nexsess-e2e-kernel.txt') else 'tmp missing')
subprocess.Popen(['sleep', '300'], start_new_session=True)  # leaves the process group
os.system('(setsid sleep 301 &)')                            # double-forked daemon
print('uid', os.getuid())
"""


def _id_taken(n: int) -> bool:
    try:
        pwd.getpwuid(n)
    except KeyError:
        try:
            grp.getgrgid(n)
        except KeyError:
            return False
    return True


_UIDS_USED: set[int] = set()


@pytest.fixture(scope="module")
def session_user() -> Iterator[int]:
    assert os.geteuid() == 0, "end-to-end session tests run as root (they create a user)"
    try:
        pwd.getpwnam(SESSION_USER)
    except KeyError:
        # A uid of its own, outside the system range that other runs' accounts come and go in:
        # agents wipe by uid (kill(-1) as the uid), and a freed uid handed to this account
        # would let another run's wipe kill this run's Jupyter.
        # A fresh uid for each module too: files an earlier module's session left on disk
        # (owned by the uid it had) must not count as this account's (the agent's wipe check
        # would retire it, and every later test of this run would fail).
        uid = 40000 + os.getpid() % 15000
        while uid in _UIDS_USED or _id_taken(uid):
            uid += 1
        _UIDS_USED.add(uid)
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", "--uid", str(uid), "--user-group", SESSION_USER],
            check=True,
        )  # fmt: skip
    yield pwd.getpwnam(SESSION_USER).pw_uid
    subprocess.run(["pkill", "-KILL", "-u", SESSION_USER], check=False)
    subprocess.run(["userdel", SESSION_USER], check=False)


@pytest.fixture
def workspace_root() -> Iterator[Path]:
    # Every parent must be traversable by the session user: not under pytest's 0700 tmp dir.
    root = Path("/var/tmp") / f"nexcompute-e2e-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o711)
    root.chmod(0o711)
    yield root
    # A test that ends while its agent still wipes (the stack is torn down under it) leaves
    # the workspace image mounted; unmount it, or the folder (and the disk space) stays.
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(root, ignore_errors=True)
    for parent in Path("/sys/fs/cgroup").glob(f"*/{root.name}"):  # configure()'s, now empty
        with contextlib.suppress(OSError):
            parent.rmdir()


def configure(config: Path, env_dir: Path, workspace: Path, tunnel: str = "direct") -> None:
    text = config.read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("jupyter_command"):
            line = f'jupyter_command = ["{env_dir}/bin/jupyter", "lab"]'
        elif line.startswith("session_user"):
            line = f'session_user = "{SESSION_USER}"'
        elif line.startswith("session_pool_size"):
            line = "session_pool_size = 0"  # the one test account: a pool of one
        elif line.startswith("workspace_root"):
            line = f'workspace_root = "{workspace}"'
        elif line.startswith("kind"):
            line = f'kind = "{tunnel}"'
        elif line.startswith("cloudflared ="):
            line = f'cloudflared = "{STANDIN}"'
        elif line.startswith("token =") and tunnel == "cloudflared-named":
            line = 'token = "eyJhIjoiYWNjdCIsInMiOiJjMlZqY21WMCIsInQiOiJ0dW5uZWwifQ=="'
        elif line.startswith("hostname =") and tunnel == "cloudflared-named":
            line = 'hostname = "pc1.lab.example.edu"'
        lines.append(line)
    # The owner's workspace ceiling keeps each test session's reserved image small (the default
    # policy asks 20 GB, and the test host's disk is shared).
    extra = (
        "session_stop_grace = 3.0\njupyter_start_timeout = 90.0\ntunnel_start_timeout = 30.0\n"
        "session_workspace_max_gb = 2.0\n"
        # Session ids start at 1 in every test database: agents of runs side by side would
        # share (and kill) each other's nexcompute/session-1 cgroup.
        f'session_cgroup_parent = "{workspace.name}"\n'
    )
    # Tables come last in TOML: put top-level keys before the first table.
    head, sep, tail = "\n".join(lines).partition("\n[")
    config.write_text(f"{head}\n{extra}{sep}{tail}\n")


def api(port: int, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}
    )


def jupyter(method: str, url: str, token: str, body: Any = None) -> httpx.Response:
    return httpx.request(
        method, url, headers={"Authorization": f"token {token}"}, json=body, timeout=30
    )


def no_user_processes(uid: int) -> bool:
    """No process of ``uid`` is left. A wait-for condition: right after a receipt the agent
    still runs its own short probes as the account (the kernel's process count)."""
    return user_processes(uid) == []


def user_processes(uid: int) -> list[psutil.Process]:
    alive = []
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            if proc.info["uids"].real == uid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (psutil.Error, AttributeError):
            continue
    return alive


def user_files(uid: int) -> list[str]:
    """Files of ``uid`` in the host's temp folders (the workspaces, also under /var/tmp here,
    are not temp files)."""
    found = []
    for top in ("/tmp", "/var/tmp", "/dev/shm"):
        for dirpath, dirnames, filenames in os.walk(top):
            if Path(dirpath).name.startswith("nexcompute-e2e-"):
                dirnames[:] = []
                continue
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                try:
                    if os.lstat(path).st_uid == uid:
                        found.append(path)
                except OSError:
                    continue
    return found


def session_row(session_id: int) -> ComputeSession:
    return ComputeSession.objects.get(pk=session_id)


def start_stack(
    procs: ProcessSet, tmp_path: Path, env_dir: Path, workspace: Path, tunnel: str = "direct"
) -> tuple[int, Path]:
    # The Nexus's public URL is this daphne, as in a deployment: the session's Lab extension
    # reaches the Nexus there (the start frame's nexus_url).
    port = free_port()
    procs.env["NEXCOMPUTE_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
    procs.daphne(port)
    procs.celery_worker()
    config = enroll(port, tmp_path)
    configure(config, env_dir, workspace, tunnel)
    procs.agent(config)
    wait_for(
        lambda: Machine.objects.filter(status=MachineStatus.AVAILABLE).exists(),
        timeout=30,
        what="machine available",
    )
    return port, config


def request_session(port: int, token: str) -> dict[str, Any]:
    with api(port, token) as client:
        created = client.post("/api/sessions", json={"duration_minutes": 30})
        assert created.status_code == 201, created.text
        session_id = created.json()["id"]
        return dict(
            wait_for(
                lambda: (
                    (r := client.get(f"/api/sessions/{session_id}").json())["state"]
                    in ("running", "failed", "ended")
                    and r
                ),
                timeout=120,
                what="session running",
            )
        )


def end_session(port: int, token: str, session_id: int) -> dict[str, Any]:
    """DELETE the session through the API and wait until the agent's receipt ended it."""
    with api(port, token) as client:
        assert client.delete(f"/api/sessions/{session_id}").status_code == 202
        return dict(
            wait_for(
                lambda: (
                    (r := client.get(f"/api/sessions/{session_id}").json())["state"] == "ended"
                    and r
                ),
                timeout=60,
                what="session ended",
            )
        )


def test_a_session_runs_real_jupyter_and_leaves_nothing_behind(
    procs: ProcessSet,
    tmp_path: Path,
    owner: User,
    other: User,
    session_env: Path,
    session_user: int,
    workspace_root: Path,
) -> None:
    port, _ = start_stack(procs, tmp_path, session_env, workspace_root)
    _, token = api_token_create(user=owner)
    session = request_session(port, token)
    assert session["state"] == "running", session
    url = session["url"]
    base, _, query = url.partition("/lab?")
    jtoken = query.removeprefix("token=")

    # The URL is the owner's alone.
    _, other_token = api_token_create(user=other)
    with api(port, other_token) as client:
        assert client.get(f"/api/sessions/{session['id']}").status_code == 404

    # Use it: a notebook through the contents API, code in a kernel.
    assert jupyter("GET", f"{base}/api/status", jtoken).status_code == 200
    assert jupyter("GET", f"{base}/api/contents", "wrong").status_code == 403
    notebook = {
        "type": "notebook",
        "content": {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5},
    }
    put = jupyter("PUT", f"{base}/api/contents/analysis.ipynb", jtoken, notebook)
    assert put.status_code in (200, 201), put.text
    # The student's way to keep their work: the whole workspace as a zip (jupyter-archive).
    archive = httpx.get(
        f"{base}/directories/",
        params={"archiveToken": "1", "archiveFormat": "zip", "token": jtoken},
        timeout=30,
    )
    assert archive.status_code == 200, archive.text[:300]
    with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
        assert any(name.endswith("analysis.ipynb") for name in zipped.namelist())
    kernel = jupyter("POST", f"{base}/api/kernels", jtoken, {"name": "python3"}).json()
    output = asyncio.run(run_code(base, jtoken, kernel["id"], KERNEL_CODE))
    assert f"uid {session_user}" in output
    wait_for(lambda: len(user_processes(session_user)) >= 4, what="kernel's processes")
    assert "tmp ok" in output, "the kernel wrote to its /tmp"
    assert user_files(session_user) == [], "the session's /tmp is its own, not the host's"

    # Progress events reached the timeline.
    with api(port, token) as client:
        events = client.get(f"/api/sessions/{session['id']}/events").json()
    steps = [e["message"] for e in events if e["kind"] == "progress"]
    # A direct tunnel has nothing to open: no "Connecting Jupyter Lab to the web." step.
    assert steps == [
        "The lab computer took your session.",
        "Your workspace is ready.",
        "Starting Jupyter Lab.",
    ], events

    # End it: the receipt is verified and the OS agrees.
    ended = end_session(port, token, session["id"])
    assert ended["cleanup"]["verified"] is True, ended
    assert ended["cleanup"]["files_removed"] > 0
    assert ended["cleanup"]["processes_killed"] >= 4
    assert ended["url"] is None
    row = session_row(session["id"])
    assert row.jupyter_token == "" and row.jupyter_url == ""
    wait_for(lambda: no_user_processes(session_user), what="no process of the account")
    assert user_files(session_user) == []
    assert not (workspace_root / str(session["id"])).exists()
    wait_for(lambda: Machine.objects.get().status == MachineStatus.AVAILABLE, what="offered again")


@pytest.mark.parametrize("tunnel", ["cloudflared-quick", "cloudflared-named"])
def test_a_session_through_a_cloudflare_tunnel(
    procs: ProcessSet,
    tmp_path: Path,
    owner: User,
    session_env: Path,
    session_user: int,
    workspace_root: Path,
    tunnel: str,
    live_env: dict[str, str],
) -> None:
    live_env["CLOUDFLARED_STANDIN_REGISTER_DELAY"] = "0.3"
    port, _ = start_stack(procs, tmp_path, session_env, workspace_root, tunnel)
    _, token = api_token_create(user=owner)
    session = request_session(port, token)
    assert session["state"] == "running", session
    if tunnel == "cloudflared-quick":
        assert (
            session["url"].startswith("https://")
            and ".trycloudflare.com/lab?token=" in (session["url"])
        )
    else:
        assert session["url"].startswith("https://pc1.lab.example.edu/lab?token=")
    tunnels = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(STANDIN) in " ".join(p.info["cmdline"] or [])
    ]
    assert tunnels, "the tunnel process runs"
    ended = end_session(port, token, session["id"])
    assert ended["cleanup"]["verified"] is True
    wait_for(lambda: no_user_processes(session_user), what="no process of the account")
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tunnels)


def test_a_session_survives_kill_9_of_its_agent_with_the_same_url_and_kernel(
    procs: ProcessSet,
    tmp_path: Path,
    owner: User,
    session_env: Path,
    session_user: int,
    workspace_root: Path,
) -> None:
    """The agent is killed with -9 mid-session and started again: the new agent takes the
    session back (sandbox by pid and start time, Jupyter by its token), the server keeps it
    running, and the student's kernel still holds its variables at the same URL."""
    port, config = start_stack(procs, tmp_path, session_env, workspace_root)
    _, token = api_token_create(user=owner)
    session = request_session(port, token)
    assert session["state"] == "running", session
    base, _, query = session["url"].partition("/lab?")
    jtoken = query.removeprefix("token=")
    kernel = asyncio.run(start_kernel(base, jtoken))
    assert "set" in asyncio.run(run_code(base, jtoken, kernel, "x = 6 * 7\nprint('set')"))
    jupyter_pids = {p.pid for p in user_processes(session_user)}

    agent = procs.procs[-1]
    agent.kill9()
    # The attack happened: the agent is gone and the server saw it go.
    assert not agent.alive()
    wait_for(lambda: Machine.objects.get().status == MachineStatus.OFFLINE, what="offline")
    # With no agent, Jupyter's stdout still has a reader (the log keeper): a write into it
    # neither kills Jupyter (SIGPIPE) nor is lost; the line reaches the session's log.
    server = next(
        p for p in user_processes(session_user)
        if "ipykernel" not in " ".join(p.cmdline()) and "jupyter" in " ".join(p.cmdline())
    )  # fmt: skip
    with open(f"/proc/{server.pid}/fd/1", "wb", buffering=0) as out:
        out.write(b"while the agent was away\n")
    assert asyncio.run(run_code(base, jtoken, kernel, "print(x)")).strip() == "42"

    restarted = procs.agent(config, "agent-restarted")
    wait_for(
        lambda: Machine.objects.get().status == MachineStatus.BUSY, timeout=60, what="busy again"
    )
    wait_for(lambda: "taken back" in restarted.log(), what="the agent took the session back")
    row = session_row(session["id"])
    assert row.state == "running" and row.end_reason == "", (row.state, row.end_reason)
    with api(port, token) as client:
        again = client.get(f"/api/sessions/{session['id']}").json()
    assert again["state"] == "running" and again["url"] == session["url"]
    # Same Jupyter (no process was replaced), same kernel, same state.
    assert jupyter_pids <= {p.pid for p in user_processes(session_user)}
    assert asyncio.run(run_code(base, jtoken, kernel, "print(x)")).strip() == "42"
    state_dir = Path(f"{str(config)[: -len('.toml')]}-state")
    log = (state_dir / f"session-{session['id']}-jupyter.log").read_text(errors="replace")
    assert "while the agent was away" in log
    # The taken-back session is watched again: activity reaches the server.
    ComputeSession.objects.filter(pk=session["id"]).update(last_activity=None)
    wait_for(lambda: session_row(session["id"]).last_activity is not None, what="activity reported")

    ended = end_session(port, token, session["id"])
    assert ended["cleanup"]["verified"] is True, ended
    assert ended["end_reason"] == "user"
    wait_for(lambda: no_user_processes(session_user), what="no process of the account")
    assert not (workspace_root / str(session["id"])).exists()
    wait_for(lambda: Machine.objects.get().status == MachineStatus.AVAILABLE, what="offered again")


def test_a_session_whose_jupyter_died_while_the_agent_was_away_ends_as_crashed(
    procs: ProcessSet,
    tmp_path: Path,
    owner: User,
    session_env: Path,
    session_user: int,
    workspace_root: Path,
) -> None:
    port, config = start_stack(procs, tmp_path, session_env, workspace_root)
    _, token = api_token_create(user=owner)
    session = request_session(port, token)
    assert session["state"] == "running", session
    agent = procs.procs[-1]
    agent.kill9()
    wait_for(lambda: Machine.objects.get().status == MachineStatus.OFFLINE, what="offline")
    # Jupyter survived the agent (its own session) ... until it dies too, with the agent away.
    survivors = user_processes(session_user)
    assert survivors
    for proc in survivors:
        proc.kill()
    wait_for(lambda: no_user_processes(session_user), what="Jupyter gone")

    restarted = procs.agent(config, "agent-restarted")
    row = wait_for(
        lambda: (r := session_row(session["id"])).cleanup_finished_at is not None and r,
        timeout=60,
        what="receipt after restart",
    )
    assert (row.state, row.end_reason) == ("ended", "crashed")
    assert row.cleanup_verified is True
    assert "did not survive the agent restart" in restarted.log() or any(
        "did not survive the agent restart" in e.message for e in row.events.all()
    )
    wait_for(lambda: no_user_processes(session_user), what="no process of the account")
    wait_for(lambda: Machine.objects.get().status == MachineStatus.AVAILABLE, what="offered again")


@pytest.mark.parametrize("tunnel", ["direct", "cloudflared-quick"])
def test_a_warm_sandbox_is_handed_over_through_the_whole_stack(
    procs: ProcessSet,
    tmp_path: Path,
    owner: User,
    session_env: Path,
    session_user: int,
    workspace_root: Path,
    tunnel: str,
    live_env: dict[str, str],
) -> None:
    """Warm pools on: the free machine reports a warm sandbox (Jupyter answering, the quick
    tunnel already registered), the request gets it in well under a second, and its URL works
    with the session's token only."""
    live_env["NEXCOMPUTE_WARM_POOLS"] = "1"
    live_env["CLOUDFLARED_STANDIN_REGISTER_DELAY"] = "1.0"  # paid before the request, not in it
    port, _ = start_stack(procs, tmp_path, session_env, workspace_root, tunnel)
    wait_for(lambda: Machine.objects.get().warm_ready, timeout=120, what="a warm sandbox")
    _, token = api_token_create(user=owner)
    asked_at = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    session = request_session(port, token)
    took = time.monotonic() - t0
    assert session["state"] == "running", session
    assert took < 1.0, took  # a cold start takes Jupyter's start plus the tunnel's 1 s
    base, _, query = session["url"].partition("/lab?")
    jtoken = query.removeprefix("token=")
    if tunnel == "cloudflared-quick":
        assert base.startswith("https://") and base.endswith(".trycloudflare.com")
    with api(port, token) as client:
        events = client.get(f"/api/sessions/{session['id']}/events").json()
    assert any(e["message"] == "Jupyter Lab is ready." for e in events), events
    if tunnel == "direct":
        status = jupyter("GET", f"{base}/api/status", jtoken)
        assert status.status_code == 200
        # The session's Jupyter was already running before the request: a warm sandbox was
        # handed over, not a cold one started.
        started = dt.datetime.fromisoformat(status.json()["started"])
        assert started < asked_at, (started, asked_at)
        assert jupyter("GET", f"{base}/api/status", "wrong").status_code == 403
        # The Lab extension took the session's capability at the hand-over: the time left
        # comes from the Nexus for this session.
        lease = jupyter("GET", f"{base}/nexcompute/api/lease", jtoken).json()
        assert lease["session_id"] == session["id"] and lease["error"] is None, lease
        assert lease["lease"]["state"] == "running", lease
    ended = end_session(port, token, session["id"])
    assert ended["cleanup"]["verified"] is True, ended
    wait_for(lambda: Machine.objects.get().status == MachineStatus.AVAILABLE, what="offered again")
