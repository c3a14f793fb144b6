"""A student's code tries to leave something behind, or to take the machine, from inside a real
session (real `jupyter lab` from the session environment, a real kernel, real session accounts,
the real sandbox and cgroups of this host). Every test first proves that the attack really
happened (or really was attempted, where the sandbox stops it), then that after the receipt
nothing of it exists, and that the next session on the machine finds none of it.

Runs as root, as CI does. Debian's cron and at are installed by scripts/ensure-test-tools.sh."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from conftest import Sent, needs_root, session_config
from tests.kernel import http, run_code, start_kernel

from nexcompute_agent.protocol import SessionLimits, SessionStart, SessionStop
from nexcompute_agent.sessions import SessionManager
from nexcompute_agent.sessions.cleanup import user_processes
from nexcompute_agent.sessions.wiper import Account, find_owned, uid_has_processes

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = [needs_root, pytest.mark.timeout(300)]

KEY = 0x4E580000 + os.getpid() % 0xFFFF  # SysV IPC key of the attack
MQ = f"/nxattack-{os.getpid()}"
TAG = f"nxattack-{os.getpid()}"
MB = 1 << 20
CHECKS = {"sandbox", "cgroup", "workspace_image", "processes", "files", "workspace", "sysv_ipc",
          "posix_mqueue", "keyring", "cron", "at", "linger"}  # fmt: skip


class Listener:
    """A loopback TCP server that counts the connections the fast forker makes."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.port = 0

    async def __aenter__(self) -> Listener:
        async def on_conn(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.times.append(time.monotonic())
            w.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


def world_writable_dirs() -> list[str]:
    """Every world-writable folder of the host's root file system (and the usual tmpfs ones)."""
    out = subprocess.run(
        ["find", "/", "-xdev", "-type", "d", "-perm", "-0002", "-not", "-path", "/proc/*"],
        capture_output=True, text=True, timeout=120, check=False,
    ).stdout.split()  # fmt: skip
    found = {d for d in out if not d.startswith(("/var/tmp/nexcompute-", "/work"))}
    found.update(["/tmp", "/var/tmp", "/dev/shm", "/run/lock"])
    return sorted(found)


FORKER = r"""
import os, socket, sys, time
port, last = int(sys.argv[1]), 0.0
while True:
    if os.fork():
        os._exit(0)           # the parent leaves: no pid lives longer than a millisecond or two
    now = time.monotonic()
    if now - last >= 0.1:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            pass
        last = now
    time.sleep(0.001)
"""

ATTACK = r"""
import ctypes, ctypes.util, errno, json, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_add_key, SYS_keyctl = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
proof = {"uid": os.getuid(), "home": os.path.expanduser("~")}

# 1. A process no /proc scan can catch, that proves it lives by calling home every 100 ms.
open("/tmp/forker.py", "w").write(FORKER)
subprocess.Popen([sys.executable, "/tmp/forker.py", str(PORT)], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

# 2. cron and at jobs that would run after the session.
cron = subprocess.run(["crontab", "-"], input="* * * * * touch /tmp/TAG-cron\n",
                      capture_output=True, text=True)
at = subprocess.run(["at", "now + 5 minutes"], input="touch /tmp/TAG-at\n",
                    capture_output=True, text=True)
proof["cron"] = [cron.returncode, cron.stderr.strip()[-200:]]
proof["at"] = [at.returncode, at.stderr.strip()[-200:]]

# 3. A file in every world-writable folder of the host, and in the session's own home.
written = []
for d in DIRS:
    try:
        with open(os.path.join(d, "TAG"), "w") as fh:
            fh.write("left behind")
        written.append(d)
    except OSError as exc:
        pass
proof["written"] = written
os.makedirs(os.path.expanduser("~/.config/autostart"), exist_ok=True)
open(os.path.expanduser("~/.config/autostart/TAG.desktop"), "w").write("[Desktop Entry]\n")
open(os.path.expanduser("~/.bashrc"), "a").write("echo TAG\n")
try:
    open("/nonexistent/.bashrc", "w")
    proof["real_home"] = "written"
except OSError as exc:
    proof["real_home"] = errno.errorcode[exc.errno]

# 4. SysV shared memory, semaphore, message queue; a POSIX message queue.
proof["shm"] = libc.shmget(KEY, 4096, 0o1666)
proof["sem"] = libc.semget(KEY, 1, 0o1666)
proof["msg"] = libc.msgget(KEY, 0o1666)
rt = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=True)
proof["mq"] = rt.mq_open(MQ.encode(), os.O_CREAT | os.O_RDWR, 0o666, None)
proof["sysvipc_seen"] = sum(1 for f in ("shm", "sem", "msg")
                            for line in open(f"/proc/sysvipc/{f}") if str(KEY) in line.split())

# 5. A secret in the user keyring (the kernel keeps it after the uid's last process exits).
key = libc.syscall(SYS_add_key, b"user", b"TAG", b"s3cret", 6, -4)
proof["key"] = key
# ... and one in the session keyring the session was started with (-3: @s).
proof["session_key"] = libc.syscall(SYS_add_key, b"user", b"TAG-s", b"s3cret", 6, -3)
buf = ctypes.create_string_buffer(256)
n = libc.syscall(SYS_keyctl, 6, key, buf, 256)  # KEYCTL_DESCRIBE: "user;uid;gid;perm;desc"
proof["key_seen"] = buf.raw[:max(n - 1, 0)].decode()
proof["user_keyring_bytes"] = libc.syscall(SYS_keyctl, 11, -4, buf, 256)  # KEYCTL_READ of @u

# 6. A tree thousands of levels deep, in the workspace and in /tmp.
for top in (os.path.expanduser("~/deep"), "/tmp/deep"):
    os.mkdir(top)
    fd = os.open(top, os.O_DIRECTORY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    open("leaf", "w", opener=lambda p, f: os.open(p, f, 0o600, dir_fd=fd)).write("deep")
    os.close(fd)
proof["deep"] = True

# 7. Fill the workspace: it is its own size-capped file system.
chunk, total = b"x" * (1 << 20), 0
try:
    with open(os.path.expanduser("~/filler"), "wb") as fh:
        while total < 4 << 30:
            fh.write(chunk)
            total += len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    proof["filler"] = ["no error", total]
except OSError as exc:
    proof["filler"] = [errno.errorcode[exc.errno], total]
print(json.dumps(proof))
"""

LOOK = r"""
import ctypes, ctypes.util, json, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_keyctl = {"x86_64": 250, "aarch64": 219}[os.uname().machine]
found = {"uid": os.getuid()}
found["files"] = [os.path.join(d, "TAG") for d in DIRS if os.path.lexists(os.path.join(d, "TAG"))]
found["home"] = sorted(os.listdir(os.path.expanduser("~")))
found["shm"] = libc.shmget(KEY, 0, 0)
found["sem"] = libc.semget(KEY, 0, 0)
found["msg"] = libc.msgget(KEY, 0)
rt = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=True)
found["mq"] = rt.mq_open(MQ.encode(), os.O_RDWR)
buf = ctypes.create_string_buffer(256)
found["key"] = libc.syscall(SYS_keyctl, 6, OLDKEY, buf, 256)  # KEYCTL_DESCRIBE the old key
found["user_keyring_bytes"] = libc.syscall(SYS_keyctl, 11, -4, buf, 256)  # keys linked in @u
found["session_keyring_bytes"] = libc.syscall(SYS_keyctl, 11, -3, buf, 256)  # keys in @s
crontab = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
found["crontab"] = crontab.stdout
found["ps"] = [p for p in os.listdir("/proc") if p.isdigit()]
# What a student does keeps working: `pip install --user` lands in the workspace (HOME).
import site, sys, zipfile
wheel = os.path.expanduser("~/nxmine-1.0-py3-none-any.whl")
with zipfile.ZipFile(wheel, "w") as whl:
    whl.writestr("nxmine.py", "VALUE = 42\n")
    info = "nxmine-1.0.dist-info"
    whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: nxmine\nVersion: 1.0\n")
    whl.writestr(f"{info}/WHEEL",
                 "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    whl.writestr(f"{info}/RECORD", "")
pip = subprocess.run([sys.executable, "-m", "pip", "install", "--user", "--no-index", "--no-deps",
                      "--disable-pip-version-check", wheel], capture_output=True, text=True)
user_site = site.getusersitepackages()
probe = subprocess.run([sys.executable, "-c", "import nxmine as m; print(m.VALUE, m.__file__)"],
                       capture_output=True, text=True)
found["pip"] = [pip.returncode, pip.stderr[-300:]]
found["user_site"] = [user_site, probe.stdout.strip()]
print(json.dumps(found))
"""


def code(template: str, **values: Any) -> str:
    text = template.replace("TAG", TAG)
    for name, value in values.items():
        text = f"{name} = {value!r}\n" + text
    return text


@pytest.fixture
async def machine(tmp_path: Path, workspace_root: Path, session_env: Path) -> AsyncIterator[Any]:
    """Sessions on one machine: ``await machine.session(sid, **limits)`` → (base URL, Sent)."""

    class Machine:
        def __init__(self) -> None:
            self.mgr: SessionManager | None = None
            self.sent = Sent()

        def build(self, **overrides: Any) -> SessionManager:
            config = session_config(
                tmp_path, workspace_root, "unused",
                jupyter_command=[str(session_env / "bin" / "jupyter"), "lab"],
                jupyter_start_timeout=90, session_stop_grace=2, session_cgroup="auto",
                **overrides,
            )  # fmt: skip
            self.mgr = SessionManager(config, self.sent)
            return self.mgr

        async def session(self, sid: int, **limits: Any) -> str:
            assert self.mgr is not None
            token = uuid.uuid4().hex
            lim = SessionLimits(**limits) if limits else None
            self.mgr.start(
                SessionStart(msgid=f"m{sid}", session_id=sid, token=token,
                             duration_seconds=600, limits=lim)
            )  # fmt: skip
            ready = await self.first(sid, ("session.ready", "session.failed"))
            assert ready.type == "session.ready", ready
            self.token = token
            return str(ready.url.split("/lab?")[0])

        async def first(self, sid: int, types: tuple[str, ...], timeout: float = 120) -> Any:
            async def go() -> Any:
                while True:
                    for m in self.sent.messages:
                        if m.type in types and m.session_id == sid:
                            return m
                    await asyncio.sleep(0.05)

            return await asyncio.wait_for(go(), timeout)

        async def stop(self, sid: int) -> Any:
            assert self.mgr is not None
            self.mgr.stop(SessionStop(msgid=f"s{sid}", session_id=sid, reason="test"))
            return await self.first(sid, ("session.receipt",), timeout=120)

    m = Machine()
    yield m
    if m.mgr is not None:
        for sid in list(m.mgr.sessions):
            await m.stop(sid)
        await m.mgr.wait_idle()


def _nspids(pid: int) -> list[str]:
    """The process's pid in each PID namespace it is in (two: in a sandbox)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return line.split()[1:]
    return []


def account(name: str) -> Account:
    pw = pwd.getpwnam(name)
    return Account(name=name, uid=pw.pw_uid, gid=pw.pw_gid)


def assert_proved(receipt: Any) -> None:
    assert receipt.verified, [c for c in receipt.checks if not c.ok]
    assert {c.name for c in receipt.checks} >= CHECKS
    assert all(c.ok for c in receipt.checks)


async def test_every_attack_happens_inside_and_nothing_reaches_the_next_session_same_uid(
    machine: Any, session_user: str, workspace_root: Path
) -> None:
    """A pool of one account: the next session runs under the very same uid and still finds
    nothing."""
    acct = account(session_user)
    machine.build(session_user=session_user, session_workspace_gb=0.125)
    dirs = world_writable_dirs()
    host_free = shutil.disk_usage(str(workspace_root)).free
    async with Listener() as calls:
        base = await machine.session(11)
        kernel = await start_kernel(base, machine.token)
        attack = code(ATTACK, DIRS=dirs, PORT=calls.port, KEY=KEY, MQ=MQ, FORKER=FORKER)
        proof = json.loads(await run_code(base, machine.token, kernel, attack, timeout=120))

        # The attacks really happened (inside the session).
        assert proof["uid"] == acct.uid
        deadline = time.monotonic() + 10
        while len(calls.times) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(calls.times) >= 5, "the fast forker is alive and calling"
        assert set(proof["written"]) >= {"/tmp", "/var/tmp", "/dev/shm", "/run/lock"}
        assert proof["shm"] >= 0 and proof["sem"] >= 0 and proof["msg"] >= 0 and proof["mq"] >= 0
        assert proof["sysvipc_seen"] == 3
        assert proof["key"] > 0 and proof["key_seen"].endswith(f";{TAG}")
        assert proof["user_keyring_bytes"] >= 4  # at least one key id linked in @u
        assert proof["session_key"] > 0
        assert proof["deep"] is True
        assert proof["filler"][0] == "ENOSPC" and 64 * MB < proof["filler"][1] <= 128 * MB
        # ... and were attempted in vain where the sandbox stops them.
        assert proof["cron"][0] != 0 and proof["at"][0] != 0, proof
        assert proof["real_home"] in ("ENOENT", "EROFS", "EACCES")
        # The host saw none of it while the session ran.
        assert set(proof["written"]) <= {"/tmp", "/var/tmp", "/dev/shm", "/run/lock"}, (
            "a host folder outside the sandbox's own temp folders was writable"
        )
        assert not any(os.path.lexists(Path(d) / TAG) for d in dirs)
        assert str(KEY) not in Path("/proc/sysvipc/shm").read_text().split()
        assert host_free - shutil.disk_usage(str(workspace_root)).free < 200 * MB
        notice = await machine.first(11, ("session.notice",))
        assert notice.kind == "disk_full"

        receipt = await machine.stop(11)
        assert_proved(receipt)
        assert receipt.account == session_user
        # Nothing of it is left on the host.
        n = len(calls.times)
        await asyncio.sleep(1.0)  # ten of the forker's 100 ms intervals
        assert len(calls.times) == n, "the fast forker outlived the session"
        assert not uid_has_processes(acct) and not user_processes(acct.uid)
        assert find_owned(acct) == ([], None)
        assert not (workspace_root / "11").exists()
        assert not list((workspace_root / ".images").glob("*"))
        assert not any(os.path.lexists(Path(d) / TAG) for d in dirs)
        for spool in map(Path, ("/var/spool/cron/crontabs", "/var/spool/cron/atjobs")):
            if spool.is_dir():
                assert not [p for p in spool.iterdir() if p.stat().st_uid == acct.uid]

        # The next session, same machine, same uid, finds nothing.
        base = await machine.session(12)
        kernel = await start_kernel(base, machine.token)
        look = code(LOOK, DIRS=dirs, KEY=KEY, MQ=MQ, OLDKEY=proof["key"])
        found = json.loads(await run_code(base, machine.token, kernel, look))
        assert found["uid"] == acct.uid
        assert found["files"] == []
        assert not {"deep", "filler", ".bashrc", "forker.py"} & set(found["home"])
        assert found["shm"] == found["sem"] == found["msg"] == found["mq"] == -1
        assert found["key"] == -1 and found["user_keyring_bytes"] == 0
        assert found["session_keyring_bytes"] == 0  # a new session keyring, not the agent's
        assert found["crontab"] == ""
        assert len(calls.times) == n
        assert found["pip"][0] == 0, found["pip"]
        assert found["user_site"][0].startswith(f"{workspace_root / '12'}/")
        value, where = found["user_site"][1].split()
        assert value == "42" and where.startswith(found["user_site"][0])
        # A terminal (Jupyter's) runs inside the same sandbox, as the same account.
        status, term = await asyncio.to_thread(
            http, "POST", f"{base}/api/terminals", machine.token, {}
        )
        assert status == 200, term
        shells = [p for p in user_processes(acct.uid) if p.name() in ("bash", "sh")]
        assert shells and all(len(_nspids(p.pid)) == 2 for p in shells)
        assert_proved(await machine.stop(12))


async def test_fork_bomb_and_memory_hog_stop_at_the_limits_and_the_student_is_told(
    machine: Any, session_pool: tuple[str, int]
) -> None:
    prefix, size = session_pool
    machine.build(session_pool_prefix=prefix, session_pool_size=size)
    base = await machine.session(21, memory_bytes=600 * MB, max_tasks=160)
    # Once ready, the session runs at its low CPU weight (20 of 100; v1: 204 of 1024 shares).
    cg = machine.mgr.sessions[21].cgroups
    if cg.version == "v2":
        assert (cg.paths[""] / "cpu.weight").read_text().strip() == "20"
    else:
        assert (cg.paths["cpu"] / "cpu.shares").read_text().strip() == "204"
        assert (cg.paths["memory"] / "memory.limit_in_bytes").read_text().strip() == str(600 * MB)
        assert (cg.paths["pids"] / "pids.max").read_text().strip() == "160"
    kernel = await start_kernel(base, machine.token)
    hog = (
        "import subprocess, sys\n"
        "hog = 'b = [bytearray(64 << 20) for _ in range(64)]'\n"
        "p = subprocess.run([sys.executable, '-c', hog])\n"
        "print(p.returncode)\n"
    )
    assert (await run_code(base, machine.token, kernel, hog)).strip() == "-9"  # OOM-killed
    notice = await machine.first(21, ("session.notice",))
    assert notice.kind == "memory_limit" and "memory limit" in notice.message
    bomb = (
        "import os, time\n"
        "made = 0\n"
        "for _ in range(1000):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(600); os._exit(0)\n"
        "    made += 1\n"
        "print(made)\n"
    )
    made = int(await run_code(base, machine.token, kernel, bomb))
    assert 50 < made < 160, made  # the fork bomb happened, and stopped at pids.max
    await asyncio.sleep(0.5)  # the watch loop polls every 0.25 s
    kinds = {m.kind for m in machine.sent.of("session.notice") if m.session_id == 21}
    assert "tasks_limit" in kinds
    assert psutil.cpu_count() and os.getloadavg()  # the host still answers
    receipt = await machine.stop(21)
    assert_proved(receipt)
    assert receipt.processes_killed > made


async def test_two_sessions_back_to_back_get_different_uids(
    machine: Any, session_pool: tuple[str, int], session_env: Path
) -> None:
    prefix, size = session_pool
    machine.build(session_pool_prefix=prefix, session_pool_size=size)
    uids = []
    for sid in (31, 32, 33):
        base = await machine.session(sid)
        # Configured as `…/jupyter lab`; started as `…/jupyter-lab` (manager.direct_subcommand).
        assert machine.mgr.sessions[sid].argv[0] == str(session_env / "bin" / "jupyter-lab")
        kernel = await start_kernel(base, machine.token)
        uids.append(
            int(await run_code(base, machine.token, kernel, "import os; print(os.getuid())"))
        )
        receipt = await machine.stop(sid)
        assert_proved(receipt)
        assert pwd.getpwnam(receipt.account).pw_uid == uids[-1]
    assert uids[0] != uids[1] and uids[1] != uids[2]
    assert machine.mgr.pool.slots[f"{prefix}1"].state == "free"


async def test_an_account_that_still_owns_something_is_refused_and_retired(
    machine: Any, session_pool: tuple[str, int], workspace_root: Path
) -> None:
    prefix, size = session_pool
    mgr = machine.build(session_pool_prefix=prefix, session_pool_size=size)
    first = min(mgr.pool.slots.values(), key=lambda s: s.last_used).name
    victim = account(first)
    spool = Path("/var/spool/cron/crontabs")
    spool.mkdir(parents=True, exist_ok=True)
    planted = spool / first
    planted.write_text("* * * * * touch /tmp/planted\n")
    os.chown(planted, victim.uid, victim.gid)
    try:
        mgr.start(SessionStart(msgid="m41", session_id=41, token="t" * 20, duration_seconds=60))
        failed = await machine.first(41, ("session.failed",))
        assert f"session account {first} still holds something" in failed.error
        receipt = await machine.first(41, ("session.receipt",))
        assert not receipt.verified  # the server quarantines the machine
        assert [c.name for c in receipt.checks if not c.ok][0] == "account_clean_before_start"
        # The workspace was made beside the account's checks (manager._check_and_make_workspace):
        # the refused start's wipe took it, image and all.
        assert not (workspace_root / "41").exists()
        assert not list((workspace_root / ".images").glob("41*"))
        assert mgr.pool.slots[first].state == "retired"
        # The other account is handed out meanwhile.
        await machine.session(42)
        assert mgr.sessions[42].account.name != first
        assert_proved(await machine.stop(42))
    finally:
        planted.unlink(missing_ok=True)


async def test_a_retired_account_is_wiped_in_full_then_serves_the_next_session(
    machine: Any, session_pool: tuple[str, int], workspace_root: Path
) -> None:
    """A pool of one: the account a refused start retired is the only one left, so the next
    start wipes and proves it in full first (before its workspace is made), then runs on it."""
    prefix, _ = session_pool
    mgr = machine.build(session_pool_prefix=prefix, session_pool_size=1)
    (only,) = mgr.pool.slots
    victim = account(only)
    spool = Path("/var/spool/cron/crontabs")
    spool.mkdir(parents=True, exist_ok=True)
    planted = spool / only
    planted.write_text("* * * * * touch /tmp/planted\n")
    os.chown(planted, victim.uid, victim.gid)
    try:
        mgr.start(SessionStart(msgid="m51", session_id=51, token="t" * 20, duration_seconds=60))
        failed = await machine.first(51, ("session.failed",))
        assert f"session account {only} still holds something" in failed.error  # it was seen
        await machine.first(51, ("session.receipt",))
        assert mgr.pool.slots[only].state == "retired"
        await machine.session(52)  # on the retired account, after its full wipe
        assert mgr.sessions[52].account.name == only
        assert not planted.exists()
        assert (workspace_root / "52").is_dir() and not (workspace_root / "51").exists()
        assert_proved(await machine.stop(52))
        assert mgr.pool.slots[only].state == "free"
    finally:
        planted.unlink(missing_ok=True)
