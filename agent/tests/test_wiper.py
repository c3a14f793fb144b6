"""The wiper against real attacks, as root, with real throw-away accounts.

Each test first proves its attack really happened (the process runs, the key is readable, the
file exists), then that the wiper ends or removes it and that ``prove_clean`` names exactly the
check that fails while the leftover is there.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nexcompute_agent.sessions import wiper
from nexcompute_agent.sessions.wiper import Account, Check, WipeReport

if TYPE_CHECKING:
    from collections.abc import Iterator

IS_ROOT = os.geteuid() == 0
# The system Python: the venv's may live under root's 0700 home (see PITFALLS.md).
PY = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
_names = itertools.count(1)


def _as(account: Account) -> dict[str, object]:
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


def run_as(account: Account, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        argv,
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
        cwd="/",
        **_as(account),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    if not IS_ROOT:
        pytest.fail(
            "the wiper tests create accounts and switch to them: run them as root (CI does)"
        )


@pytest.fixture
def account() -> Iterator[Account]:
    """A fresh unprivileged account, like a pooled session account; removed after the test
    with anything it left (the next test may be given the same uid)."""
    name = f"nxw-t{os.getpid() % 100000}-{next(_names)}"
    subprocess.run(
        [
            "useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", name,
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    pw = pwd.getpwnam(name)
    acct = Account(name, pw.pw_uid, pw.pw_gid)
    try:
        yield acct
    finally:
        _cleanup(acct)
        subprocess.run(["userdel", name], check=False, capture_output=True)


def _cleanup(acct: Account) -> None:
    """Remove what a (failing) test may have left, cheaper than a whole wipe: the tests plant
    files only in these folders."""
    rep = WipeReport()
    steps = [
        lambda: wiper.kill_uid(acct),
        lambda: wiper.remove_cron_at(acct, rep),
        lambda: [wiper.remove_tree(p, rep) for p in wiper.linger_of(acct)],
        lambda: wiper.remove_sysv_ipc(acct, rep),
        lambda: wiper._mq(acct, remove=True),
        lambda: wiper.clear_keyrings(acct),
    ]
    for step in steps:
        with contextlib.suppress(Exception):
            step()
    roots = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/spool"]  # noqa: S108
    with contextlib.suppress(Exception):
        for p in wiper.find_owned(acct, roots=roots, limit=10_000)[0]:
            wiper.remove_tree(p, rep)
    _reap_ours(acct.uid)


def _reap_ours(uid: int) -> None:
    """Reap zombies of ``uid`` that are our children (when this process is a subreaper)."""
    for pid in os.listdir("/proc"):  # noqa: PTH208
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            fields = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
            if int(fields["PPid"]) == os.getpid() and int(fields["Uid"].split()[0]) == uid:
                os.waitpid(int(pid), os.WNOHANG)


def failing(checks: list[Check]) -> set[str]:
    return {c.name for c in checks if not c.ok}


# --- processes ----------------------------------------------------------------------------------


def test_uid_has_processes_follows_a_plain_process(account: Account) -> None:
    assert wiper.uid_has_processes(account) is False
    assert wiper.uid_process_count(account) == 0
    p = subprocess.Popen(["sleep", "60"], **_as(account))  # type: ignore[call-overload]  # noqa: S607
    try:
        assert wiper.uid_process_count(account) == 1
        assert wiper.uid_has_processes(account, wait=0) is True
        assert failing(wiper.prove_clean(account, process_wait=0)) == {"processes"}
    finally:
        p.kill()
    # Not yet reaped: a zombie counts as gone.
    assert p.poll() is None or p.returncode is not None
    assert wiper.uid_has_processes(account, wait=0) is False
    p.wait()
    assert wiper.uid_has_processes(account, wait=0) is False
    assert wiper.uid_process_count(account) == 0


FORKER = r"""
import os, socket, sys, time
port = int(sys.argv[1])
last = 0.0
while True:
    if os.fork():
        os._exit(0)          # the parent leaves: the process changes pid every ~1 ms
    now = time.monotonic()
    if now - last >= 0.1:    # inherited through each fork
        last = now
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
            s.sendall(str(os.getpid()).encode())
            s.close()
        except OSError:
            pass
    time.sleep(0.001)
"""


@pytest.mark.timeout(60)
def test_kill_uid_ends_a_fast_forker(account: Account) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    seen: list[tuple[float, int]] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            with c:
                c.settimeout(1)
                with contextlib.suppress(OSError, ValueError):
                    seen.append((time.monotonic(), int(c.recv(32) or b"0")))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        starter = subprocess.Popen(  # noqa: S603
            [PY, "-c", FORKER, str(port)], start_new_session=True, **_as(account)
        )
        starter.wait(10)
        end = time.monotonic() + 10
        while len(seen) < 5 and time.monotonic() < end:
            time.sleep(0.05)
        # The attack is real: it calls home, and from a different pid each time.
        assert len(seen) >= 5, seen
        assert len({pid for _, pid in seen}) >= 5, seen
        assert wiper.uid_has_processes(account, wait=0) is True

        rounds = wiper.kill_uid(account)
        assert rounds >= 1
        killed_at = time.monotonic()
        assert wiper.uid_has_processes(account) is False
        time.sleep(1.0)  # ten of its 100 ms intervals
        late = [ts for ts, _ in seen if ts > killed_at + 0.05]
        assert late == [], f"the forker still called home {len(late)} times after kill_uid"
        print(f"\nfast forker: {len(seen)} calls from {len({p for _, p in seen})} pids; "
              f"{rounds} kill round(s)")  # fmt: skip
    finally:
        stop.set()
        t.join(5)
        srv.close()
        _reap_ours(account.uid)


def test_process_in_foreign_user_namespace_is_seen_and_killed(account: Account) -> None:
    """A process of the uid inside a user namespace created by root is charged to root in the
    kernel's per-uid count (ucounts): the count misses it. The /proc fallback sees it and
    kill(-1) as the uid still reaches it."""
    libc = ctypes.CDLL(None, use_errno=True)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            if libc.unshare(0x10000000) == 0:  # CLONE_NEWUSER
                os.write(w1, b"x")
                os.read(r2, 1)
                os.setresgid(account.gid, account.gid, account.gid)
                os.setresuid(account.uid, account.uid, account.uid)
                os.execvp("sleep", ["sleep", "60"])
        finally:
            os._exit(1)
    try:
        assert os.read(r1, 1) == b"x"
        Path(f"/proc/{pid}/uid_map").write_text(f"0 0 1\n{account.uid} {account.uid} 1\n")
        Path(f"/proc/{pid}/setgroups").write_text("deny")
        Path(f"/proc/{pid}/gid_map").write_text(f"0 0 1\n{account.gid} {account.gid} 1\n")
        os.write(w2, b"y")
        end = time.monotonic() + 5
        while Path(f"/proc/{pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < end
            time.sleep(0.01)
        assert Path(f"/proc/{pid}").stat().st_uid == account.uid
        assert wiper.uid_process_count(account) == 0  # the kernel count misses it ...
        assert wiper.uid_has_processes(account, wait=0) is True  # ... the fallback does not
        wiper.kill_uid(account)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status)
        assert wiper.uid_has_processes(account, wait=0) is False
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)


# --- removing trees -----------------------------------------------------------------------------


def _chflags(fd: int, flags: int) -> None:
    got = fcntl.ioctl(fd, wiper.FS_IOC_GETFLAGS, struct.pack("i", 0))
    cur = struct.unpack("i", got)[0]
    fcntl.ioctl(fd, wiper.FS_IOC_SETFLAGS, struct.pack("i", cur | flags))


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))  # noqa: PTH208


@pytest.fixture
def scratch() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nxw-test-", dir="/var/tmp"))  # noqa: S108
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-R", "-i", "-a", str(d)], check=False, capture_output=True)
        if d.exists():
            wiper.remove_tree(d, WipeReport())


DEPTH = 5000


def test_remove_tree_deep_locked_immutable(scratch: Path) -> None:
    top = scratch / "deep"
    top.mkdir()
    outside = scratch / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not yours")
    # Shallow traps, set up by path.
    (top / "locked").mkdir()
    (top / "locked" / "inner").mkdir()
    (top / "locked" / "inner" / "f").write_text("x")
    (top / "locked").chmod(0)
    (top / "imm").write_text("immutable")
    (top / "appdir").mkdir()
    (top / "appdir" / "f").write_text("append-only dir")
    (top / "immdir").mkdir()
    (top / "immdir" / "f").write_text("in an immutable directory")
    (top / "link").symlink_to(outside)
    (top / "link2").symlink_to(outside / "keep")
    subprocess.run(["chattr", "+i", str(top / "imm")], check=True)
    subprocess.run(["chattr", "+a", str(top / "appdir")], check=True)
    subprocess.run(["chattr", "+i", str(top / "immdir")], check=True)
    with pytest.raises(PermissionError):
        (top / "imm").unlink()
    with pytest.raises(PermissionError):
        (top / "immdir" / "f").unlink()
    with pytest.raises(PermissionError):
        (top / "appdir" / "f").unlink()
    # A chain DEPTH levels deep (far past PATH_MAX), built with directory fds.
    files = 0
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for level in range(DEPTH):
        os.mkdir("d", dir_fd=fd)
        if level % 100 == 0:
            f = os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
            os.write(f, b"abc")
            if level == DEPTH // 2:
                _chflags(f, wiper.FS_IMMUTABLE_FL)  # an immutable file deep down
            os.close(f)
            files += 1
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    # Prove the depth: /usr/bin/find sees it (its own fd-based walk).
    depth = subprocess.run(
        ["find", str(top), "-name", "d", "-type", "d", "-printf", "x"],
        capture_output=True,
        check=True,
    ).stdout
    assert len(depth) == DEPTH
    os.close(fd)

    base_fds = _fd_count()
    peak = [base_fds]
    report = WipeReport()
    result: list[bool] = []
    th = threading.Thread(target=lambda: result.append(wiper.remove_tree(top, report)))
    th.start()
    while th.is_alive():
        peak[0] = max(peak[0], _fd_count())
        time.sleep(0.0005)
    th.join()
    assert result == [True], report.details
    assert not top.exists()
    assert (outside / "keep").read_text() == "not yours"  # symlinks removed, not followed
    # files: DEPTH/100 + f, imm, appdir/f, immdir/f, link, link2;
    # dirs: DEPTH + locked, inner, appdir, immdir + top
    assert report.files_removed == files + 6 + DEPTH + 4 + 1
    assert peak[0] - base_fds <= 4, f"open fds grew from {base_fds} to {peak[0]}"


def test_remove_tree_stays_on_its_file_system(scratch: Path) -> None:
    top = scratch / "t"
    (top / "mnt").mkdir(parents=True)
    (top / "file").write_text("x")
    # A bind mount from the same file system: same st_dev, still not ours to descend into.
    (top / "bind").mkdir()
    (scratch / "elsewhere").mkdir()
    (scratch / "elsewhere" / "same-fs").write_text("keep")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "nxw", str(top / "mnt")], check=True)
    subprocess.run(["mount", "--bind", str(scratch / "elsewhere"), str(top / "bind")], check=True)
    try:
        (top / "mnt" / "other-fs").write_text("keep")
        report = WipeReport()
        assert wiper.remove_tree(top, report) is False
        assert sum("mount point" in d for d in report.details) == 2, report.details
        assert (top / "mnt" / "other-fs").read_text() == "keep"
        assert (scratch / "elsewhere" / "same-fs").read_text() == "keep"
        assert not (top / "file").exists()
    finally:
        subprocess.run(["umount", str(top / "mnt")], check=False)
        subprocess.run(["umount", str(top / "bind")], check=False)
    assert wiper.remove_tree(top, WipeReport()) is True
    assert not top.exists()


def test_remove_tree_while_entries_appear(scratch: Path) -> None:
    top = scratch / "busy"
    for i in range(50):
        (top / f"d{i}").mkdir(parents=True)
        for j in range(50):
            (top / f"d{i}" / f"f{j}").write_text("x")
    stop = threading.Event()
    made = [0]

    def racer() -> None:
        # Keeps adding files (and a directory) until its directory is gone.
        while not stop.is_set():
            try:
                (top / "d49" / f"new{made[0]}").write_text("y")
                (top / f"late{made[0] % 3}").mkdir(exist_ok=True)
                made[0] += 1
            except OSError:
                return

    th = threading.Thread(target=racer, daemon=True)
    th.start()
    report = WipeReport()
    ok = wiper.remove_tree(top, report)
    stop.set()
    th.join(5)
    if not ok:  # the racer won a round: a second pass with it stopped finishes
        ok = wiper.remove_tree(top, report)
    assert ok, report.details
    assert not top.exists()
    assert made[0] > 0


@pytest.mark.timeout(120)
def test_remove_100k_small_files_fast(scratch: Path) -> None:
    top = scratch / "many"
    top.mkdir()
    n = 0
    for i in range(100):
        d = top / f"d{i:03}"
        d.mkdir()
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        for j in range(1000):
            f = os.open(f"f{j}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)
            os.write(f, b"0123456789")
            os.close(f)
            n += 1
        os.close(dfd)
    assert n == 100_000
    assert sum(1 for _ in (top / "d042").iterdir()) == 1000
    report = WipeReport()
    cpu0 = _thread_cpu()
    t0 = time.monotonic()
    assert wiper.remove_tree(top, report) is True, report.details
    took = time.monotonic() - t0
    cpu = _thread_cpu() - cpu0
    print(f"\nremove_tree: 100,000 small files in {took:.2f} s ({cpu:.2f} s CPU)")
    assert not top.exists()
    assert report.files_removed == 100_000 + 100 + 1
    assert report.bytes_removed == 1_000_000
    # The promise is < 10 s; measured 2-4 s on an idle 2-core machine. The wall-clock bound is
    # looser because CI and this host share their cores with other suites; the CPU bound is not.
    assert cpu < 10
    assert took < 30


def _thread_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_utime + ru.ru_stime


# --- files everywhere ---------------------------------------------------------------------------


def test_files_in_world_writable_dirs_found_and_wiped(account: Account) -> None:
    run_lock = Path("/run/lock")
    if not run_lock.exists():
        run_lock.mkdir(parents=True)
        run_lock.chmod(0o1777)
    tag = account.name
    planted = []
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):  # noqa: S108
        planted += [f"{d}/{tag}-f", f"{d}/{tag}-d", f"{d}/{tag}-d/sub", f"{d}/{tag}-d/sub/x"]
    script = "; ".join(
        f"echo x > {d}/{tag}-f && mkdir -p {d}/{tag}-d/sub && echo y > {d}/{tag}-d/sub/x "
        f"&& chmod 000 {d}/{tag}-d"
        for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # noqa: S108
    )
    r = run_as(account, ["/bin/sh", "-c", script])
    assert r.returncode == 0, r.stderr
    for p in planted:
        assert Path(p).stat().st_uid == account.uid
    t0 = time.monotonic()
    found, err = wiper.find_owned(account)
    took = time.monotonic() - t0
    print(f"\nfind_owned over {wiper.local_mounts()}: {took:.2f} s")
    assert err is None
    assert set(found) == set(planted)
    checks = wiper.prove_clean(account)
    assert failing(checks) == {"files"}
    assert tag in next(c.detail for c in checks if c.name == "files")

    report = WipeReport()
    wiper.wipe_account(account, report)
    assert report.verified, (report.checks, report.details)
    for p in planted:
        assert not os.path.lexists(p)
    assert wiper.find_owned(account) == ([], None)


def test_workspace_removed_and_checked(account: Account, scratch: Path) -> None:
    ws = scratch / "ws"
    (ws / "a" / "b").mkdir(parents=True)
    (ws / "a" / "b" / "notebook.ipynb").write_text("{}")
    os.chown(ws, account.uid, account.gid)
    assert failing(wiper.prove_clean(account, workspace=ws)) == {"workspace", "files"}
    report = WipeReport()
    wiper.wipe_account(account, report, workspace=ws)
    assert report.verified, (report.checks, report.details)
    assert not ws.exists()
    assert report.files_removed >= 4


# --- IPC and keyrings ---------------------------------------------------------------------------

MQ_CREATE = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.mq_open.restype = ctypes.c_int
fd = libc.mq_open(b"/nxw-queue", os.O_CREAT | os.O_RDWR, 0o600, None)
assert fd >= 0, os.strerror(ctypes.get_errno())
"""

KEYS = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
ADD_KEY, KEYCTL = 248, 250  # x86_64
# As in a login session: a session keyring that links @u, so that @u's keys are possessed
# (KEYCTL_JOIN_SESSION_KEYRING 1, KEYCTL_LINK 8).
assert libc.syscall(KEYCTL, 1, None) > 0, ctypes.get_errno()
assert libc.syscall(KEYCTL, 8, ctypes.c_long(-4), ctypes.c_long(-3)) == 0, ctypes.get_errno()
if sys.argv[1] == "add":
    r = libc.syscall(ADD_KEY, b"user", b"nxw-secret", b"hunter2", 7, ctypes.c_long(-4))
    assert r > 0, ctypes.get_errno()
else:
    # KEYCTL_SEARCH (10) in @u, then KEYCTL_READ (11)
    k = libc.syscall(KEYCTL, 10, ctypes.c_long(-4), b"user", b"nxw-secret", 0)
    if k < 0:
        print("ENOKEY")
        sys.exit(1)
    buf = ctypes.create_string_buffer(64)
    n = libc.syscall(KEYCTL, 11, k, buf, 64)
    print(buf.raw[:n].decode() if n >= 0 else "EACCES")
"""


def test_sysv_posix_ipc_and_keyring_wiped(account: Account) -> None:
    if os.uname().machine != "x86_64":
        pytest.fail("the keyring attack script uses x86_64 syscall numbers")
    for argv in (["ipcmk", "-M", "4096"], ["ipcmk", "-S", "1"], ["ipcmk", "-Q"]):
        r = run_as(account, argv)
        assert r.returncode == 0, r.stderr
    r = run_as(account, [PY, "-c", MQ_CREATE])
    assert r.returncode == 0, r.stderr
    r = run_as(account, [PY, "-c", KEYS, "add"])
    assert r.returncode == 0, r.stderr
    # The attacks are real: another process of the uid (the next session) reads the key.
    r = run_as(account, [PY, "-c", KEYS, "read"])
    assert r.stdout.strip() == "hunter2"
    rows = wiper.sysv_ipc_of(account)
    assert sorted(row.split(":")[0] for row in rows) == ["msg", "sem", "shm"], rows
    assert wiper.posix_mqueues_of(account) == ["/nxw-queue"]
    assert any("nxw-secret" in k for k in wiper.keyrings_of(account))
    assert failing(wiper.prove_clean(account)) == {"sysv_ipc", "posix_mqueue", "keyring"}

    report = WipeReport()
    wiper.wipe_account(account, report)
    assert report.verified, (report.checks, report.details)
    assert wiper.sysv_ipc_of(account) == []
    assert wiper.posix_mqueues_of(account) == []
    assert wiper.keyrings_of(account) == []
    r = run_as(account, [PY, "-c", KEYS, "read"])
    assert r.stdout.strip() == "ENOKEY"
    assert wiper.uid_has_processes(account) is False


# --- cron, at, linger ---------------------------------------------------------------------------


def _ensure_cron_at() -> None:
    if shutil.which("crontab") and shutil.which("at"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "cron", "at"],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )


@pytest.mark.timeout(300)
def test_cron_at_and_linger_found_and_wiped(account: Account) -> None:
    _ensure_cron_at()
    crontab = Path("/var/spool/cron/crontabs") / account.name
    crontab.parent.mkdir(parents=True, exist_ok=True)
    crontab.write_text("* * * * * touch /tmp/pwned\n")
    os.chown(crontab, account.uid, account.gid)
    crontab.chmod(0o600)
    # A real at job, queued by at(1) as the account; planted by hand if at refuses.
    r = run_as(account, ["at", "now + 1 hour"], input="touch /tmp/pwned\n")
    jobs = [p for p in Path("/var/spool/cron/atjobs").iterdir() if p.stat().st_uid == account.uid]
    if not jobs:
        print(f"\nat refused ({r.stderr.strip()!r}): planting the job file")
        job = Path("/var/spool/cron/atjobs/a00099019a2b3c")
        job.write_text("#!/bin/sh\ntouch /tmp/pwned\n")
        os.chown(job, account.uid, account.gid)
        job.chmod(0o700)
        jobs = [job]
    linger = Path(wiper.LINGER_DIR) / account.name
    linger.parent.mkdir(parents=True, exist_ok=True)
    linger.touch()

    found = wiper.cron_at_jobs_of(account)
    assert str(crontab) in found
    assert {str(j) for j in jobs} <= set(found)
    assert wiper.linger_of(account) == [str(linger)]
    # The crontab and job files are the account's: "files" sees them too; linger is root's.
    assert failing(wiper.prove_clean(account)) == {"cron", "at", "linger", "files"}

    report = WipeReport()
    wiper.wipe_account(account, report)
    assert report.verified, (report.checks, report.details)
    assert not crontab.exists()
    assert not linger.exists()
    assert not any(j.exists() for j in jobs)
    assert wiper.cron_at_jobs_of(account) == []


# --- the proof itself ---------------------------------------------------------------------------


def test_prove_clean_on_a_clean_account(account: Account) -> None:
    checks = wiper.prove_clean(account, workspace="/nonexistent/nxw-workspace")
    assert [c.name for c in checks] == list(wiper.CHECK_NAMES)
    assert failing(checks) == set(), checks
    assert all(c.detail for c in checks)
    report = WipeReport(checks=checks)
    assert report.verified
    assert not WipeReport().verified
    assert not WipeReport(checks=[*checks, Check("x", False)]).verified


def test_wipe_refuses_root_and_never_raises() -> None:
    report = WipeReport()
    wiper.wipe_account(Account("root", 0, 0), report)
    assert not report.verified
    assert report.checks and all(not c.ok for c in report.checks)
    report = WipeReport()
    assert wiper.remove_tree("/nonexistent/deeper/nothing", report) is True
    assert wiper.remove_tree("/", report) is False


HOLDER = r"""
import ctypes, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
KEYCTL = 250  # x86_64
# A root process with its own session keyring, like an agent under systemd (KeyringMode=private).
assert libc.syscall(KEYCTL, 1, None) > 0
uid, gid = int(sys.argv[1]), int(sys.argv[2])
add = (
    "import ctypes; libc = ctypes.CDLL(None, use_errno=True);"
    "assert libc.syscall(248, b'user', b'nxw-leak', b'hunter2', 7, ctypes.c_long(-3)) > 0"
)
# The session process inherits that keyring and links a key into it (KEY_SPEC_SESSION_KEYRING).
subprocess.run([sys.executable, "-c", add], user=uid, group=gid, extra_groups=[], check=True)
print("ready", flush=True)
sys.stdin.read()
"""


def test_key_kept_alive_by_a_foreign_keyring_fails_the_check(account: Account) -> None:
    """A key of the uid linked into a keyring that another user's process holds (an inherited
    session keyring) survives the uid's processes and cannot be unlinked by the uid: the
    "keyring" check must find it and fail (the account is quarantined), then pass once the
    holder is gone."""
    if os.uname().machine != "x86_64":
        pytest.fail("the keyring attack script uses x86_64 syscall numbers")
    holder = subprocess.Popen(  # noqa: S603
        [PY, "-c", HOLDER, str(account.uid), str(account.gid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        assert wiper.uid_has_processes(account) is False  # only the key is left
        found = wiper.keyrings_of(account, gc_wait=0)
        assert any("nxw-leak" in k for k in found), found
        wiper.clear_keyrings(account)
        checks = wiper.prove_clean(account)
        assert failing(checks) == {"keyring"}, checks
        assert "nxw-leak" in next(c.detail for c in checks if c.name == "keyring")
    finally:
        holder.kill()
        holder.wait()
    assert wiper.keyrings_of(account) == []  # garbage-collected with its holder
