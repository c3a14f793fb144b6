"""The sandbox's guards on the host side: accounts it refuses to wipe, a workspace that cannot
outgrow the disk, a log that cannot fill it, and a bubblewrap too old to trust."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_root

from nexcompute_agent.sessions import sandbox
from nexcompute_agent.sessions.accounts import PoolError, lookup
from nexcompute_agent.sessions.process import ADOPTED_EXIT, LOG_LIMIT, ManagedProcess

pytestmark = [needs_root]


def test_an_account_with_a_home_and_a_shell_is_never_taken_for_a_session_account(
    tmp_path: Path,
) -> None:
    """The wipe kills every process and deletes every file of its account: a person's account
    (a shared lab login, say) must be refused, not wiped."""
    name = f"nxreal-{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        home = Path(f"~{name}").expanduser()
        (home / "thesis.tex").write_text("years of work")
        with pytest.raises(PoolError, match="looks like a real account"):
            lookup(name)
        assert (home / "thesis.tex").read_text() == "years of work"
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def test_a_workspace_larger_than_the_free_disk_is_refused(workspace_root: Path) -> None:
    support = sandbox.detect()
    assert support.loop_workspace, "this host has loop devices and mkfs.ext4"
    too_big = shutil.disk_usage(workspace_root).free + (1 << 40)
    with pytest.raises(sandbox.SandboxError, match="no room for a"):
        sandbox.Workspace.create(
            workspace_root / "1", uid=65534, gid=65534, size_bytes=too_big, support=support
        )
    assert not (workspace_root / ".images" / "1.img").exists()
    assert not os.path.ismount(workspace_root / "1")


def test_the_workspace_image_is_reserved_on_the_disk_not_sparse(workspace_root: Path) -> None:
    support = sandbox.detect()
    ws = sandbox.Workspace.create(
        workspace_root / "2", uid=65534, gid=65534, size_bytes=64 << 20, support=support
    )
    try:
        assert ws.image is not None and os.path.ismount(ws.path)
        st = ws.image.stat()
        assert st.st_blocks * 512 >= 64 << 20  # allocated: filling it cannot fill the host
    finally:
        assert ws.destroy()[2] == []
    assert not ws.image.exists() and not ws.path.exists()


def test_a_programs_output_is_capped_on_the_host_disk(tmp_path: Path) -> None:
    """What Jupyter (and whatever the student runs that inherits its stdout) writes goes
    through a pipe the log keeper drains into a file that never exceeds LOG_LIMIT."""
    log = tmp_path / "session.log"
    # The attack: five times what the log may hold, then last words.
    writer = (
        "import os\nchunk = b'y' * 65536\nn = 0\n"
        f"while n < 5 * {LOG_LIMIT}:\n    n += os.write(1, chunk)\n"
        "os.write(1, b'\\nlast words\\n')\n"
    )
    proc = ManagedProcess("jupyter", [sys.executable, "-c", writer], env={}, log_path=log)
    proc.start()
    assert proc.popen is not None and proc.keeper is not None
    assert proc.popen.wait(30) == 0
    assert proc.keeper.wait(10) == 0, "the keeper ends by itself at end of file"
    data = log.read_bytes()
    assert len(data) <= LOG_LIMIT
    assert data.startswith(b"[earlier output dropped]") and data.endswith(b"last words\n")


def test_a_programs_output_outlives_the_agent(tmp_path: Path) -> None:
    """The keeper is a process of its own: a program started by an agent that is then killed
    keeps writing its log (no SIGPIPE, no lost output) and is found again by pid and start
    time, never by pid alone."""
    log = tmp_path / "session.log"
    script = (
        "import os, sys, time\n"
        "while not os.path.exists(sys.argv[1]): time.sleep(0.02)\n"
        "print('after the agent died', flush=True)\n"
    )
    flag = tmp_path / "go"
    # The "agent": a short-lived process that starts the program and is killed with -9.
    agent = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from nexcompute_agent.sessions.process import ManagedProcess\n"
         f"p = ManagedProcess('jupyter', [sys.executable, '-c', {script!r}, {str(flag)!r}],"
         f" env={{}}, log_path=__import__('pathlib').Path({str(log)!r}))\n"
         "p.start()\nprint(p.pid, p.create_time, flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert agent.stdout is not None
    pid_text, ct_text = agent.stdout.readline().split()
    agent.kill()
    agent.wait(10)
    program = ManagedProcess.adopt("jupyter", int(pid_text), float(ct_text), log_path=log)
    assert program is not None and program.poll() is None
    assert ManagedProcess.adopt("jupyter", int(pid_text), float(ct_text) - 5) is None
    flag.touch()
    deadline = time.monotonic() + 20
    while program.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert program.poll() == ADOPTED_EXIT
    deadline = time.monotonic() + 10
    while b"after the agent died" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_bytes() == b"after the agent died\n"


def test_a_bubblewrap_without_size_capped_tmpfs_is_refused() -> None:
    support = sandbox.detect()
    assert support.problem is None, support.problem  # this host: bubblewrap 0.8
    old = dataclasses.replace(support, bwrap_version=(0, 6, 1))  # Ubuntu 22.04's
    assert old.problem is not None and "0.6.1 is too old" in old.problem
    spec = sandbox.SandboxSpec(workspace=Path("/nonexistent"), uid=65534, gid=65534,
                               tmpfs_bytes=1 << 20)  # fmt: skip
    with pytest.raises(sandbox.SandboxError, match="too old"):
        sandbox.bwrap_argv(old, spec, ["true"])


def test_the_pool_is_restored_from_the_state_file() -> None:
    from nexcompute_agent.sessions.accounts import AccountPool

    saved = {
        "a1": {"state": "busy", "session_id": 7, "last_used": 5.0, "why": ""},
        "a2": {"state": "retired", "session_id": None, "last_used": 1.0, "why": "keyring left"},
        "a3": {"state": "held", "session_id": None, "last_used": 3.0, "why": ""},
        "a4": {"state": "free", "session_id": None, "last_used": "garbage", "why": ""},
        "gone": {"state": "free"},  # no longer in the pool
        "a5": "not a dict",
    }
    pool = AccountPool(["a1", "a2", "a3", "a4", "a5"], saved)
    assert {n: s.state for n, s in pool.slots.items()} == {
        "a1": "busy",
        "a2": "retired",
        "a3": "free",
        "a4": "free",
        "a5": "free",
    }
    assert pool.slots["a1"].session_id == 7 and pool.owner_of(7) == "a1"
    assert pool.slots["a2"].why == "keyring left" and pool.slots["a4"].last_used == 0.0
    assert pool.busy() == {"a1": 7}
    assert pool.hold_free() == ["a3", "a4", "a5"]
    assert {n for n, s in pool.slots.items() if s.state == "held"} == {"a3", "a4", "a5"}
    pool.release("a3", verified=True)
    pool.release("a4", verified=False, why="files left")
    assert (pool.slots["a3"].state, pool.slots["a4"].state) == ("free", "retired")
    # An agent that stopped while a5 was held finds it free (and checks it at start-up).
    restored = AccountPool(["a1", "a2", "a3", "a4", "a5"], pool.as_dict())
    assert {n: s.state for n, s in restored.slots.items()} == {
        "a1": "busy",
        "a2": "retired",
        "a3": "free",
        "a4": "retired",
        "a5": "free",
    }
