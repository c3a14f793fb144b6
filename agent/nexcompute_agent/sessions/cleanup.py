"""Ending a session for good: kill every process of it, remove every file of it, verify.

Which processes belong to a session:
- as root (``uid`` known): every process whose real, effective or saved uid is the session
  user's. That catches double-forked daemons and processes that left the process group.
- unprivileged agent: the processes we started (pid + create_time from the state file) with
  their descendants, plus any process of ours whose environment carries the session marker
  (``NEXCOMPUTE_SESSION_ID``), which double-forked children inherit.
Zombies count as gone: they hold no resources and PID 1 reaps them in its own time.

Which files: the workspace, and (as root) everything the session user owns under the temp
directories. Trees are walked with directory file descriptors and ``O_NOFOLLOW``, so a symlink
planted by the session is removed, never followed. This runs only after the session's processes
are dead, so nothing races the walk.

These functions block (psutil, file system); the manager runs them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

    from nexcompute_agent.sessions.state import ProcRecord

TEMP_DIRS: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm")  # noqa: S108
SESSION_MARKER = "NEXCOMPUTE_SESSION_ID"
MAX_WALK = 500_000  # entries visited per temp sweep, so a pathological /tmp cannot hang a wipe


@dataclass
class WipeReport:
    processes_killed: int = 0
    files_removed: int = 0
    bytes_removed: int = 0
    verified: bool = False
    details: list[str] = field(default_factory=list)


ProcKey = tuple[int, float]


def _key(p: psutil.Process) -> ProcKey | None:
    try:
        return (p.pid, p.create_time())
    except psutil.Error:
        return None


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def user_processes(uid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes with ``uid`` as real, effective or saved uid."""
    out = []
    me = os.getpid()
    for p in psutil.process_iter(["uids", "status"]):
        uids = p.info.get("uids")
        if p.pid == me or uids is None or p.info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        if uid in (uids.real, uids.effective, uids.saved):
            out.append(p)
    return out


def recorded_processes(records: Iterable[ProcRecord]) -> list[psutil.Process]:
    """The recorded processes still alive with the same create_time, and their descendants."""
    out: list[psutil.Process] = []
    for rec in records:
        try:
            p = psutil.Process(rec.pid)
            # A pid recycled by an unrelated process has another start time: leave it alone.
            if abs(p.create_time() - rec.create_time) > 0.05:
                continue
            out.append(p)
            out.extend(p.children(recursive=True))
        except psutil.Error:
            continue
    return [p for p in out if _alive(p)]


def marked_processes(session_id: int) -> list[psutil.Process]:
    """Our own processes whose environment names this session (unprivileged agent)."""
    out = []
    me, uid = os.getpid(), os.geteuid()
    want = str(session_id)
    for p in psutil.process_iter(["uids", "status"]):
        uids = p.info.get("uids")
        if p.pid == me or uids is None or uids.real != uid:
            continue
        if p.info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.environ().get(SESSION_MARKER) == want:
                out.append(p)
        except psutil.Error:
            continue
    return out


def kill_all(
    find: Callable[[], list[psutil.Process]], seen: set[ProcKey], *, timeout: float = 10.0
) -> list[psutil.Process]:
    """Kill what ``find`` returns until it returns nothing (or ``timeout``). Each round stops
    the processes first (SIGSTOP) so a fork bomb cannot replace its dead, then SIGKILLs them.
    Adds what it killed to ``seen``; returns the survivors (empty on success)."""
    deadline = time.monotonic() + timeout
    while True:
        procs = find()
        if not procs or time.monotonic() > deadline:
            return procs
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGSTOP)
        for p in procs:
            key = _key(p)
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
                if key is not None:
                    seen.add(key)
        psutil.wait_procs(procs, timeout=0.2)


def become_subreaper() -> bool:
    """Make orphaned descendants (double-forked daemons of a session) our children instead of
    PID 1's, so we can reap them at once: zombies count against the session user's
    RLIMIT_NPROC, and PID 1 on these machines reaps slowly. Linux only; False elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_zombie_children(
    uid: int | None, *, exclude: Iterable[int] = (), timeout: float = 0.0
) -> int:
    """Reap zombie children of ours that ran as ``uid``, except ``exclude`` (children a Popen
    waits for: reaping them would hide their exit status). With ``timeout``, keep at it until
    none is left or time runs out. Returns how many were reaped."""
    if uid is None:
        return 0
    reaped = 0
    skip = set(exclude)
    deadline = time.monotonic() + timeout
    while True:
        zombies = []
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children():
                with contextlib.suppress(psutil.Error):
                    if child.pid in skip:
                        continue
                    if child.status() == psutil.STATUS_ZOMBIE and child.uids().real == uid:
                        zombies.append(child.pid)
        for pid in zombies:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped += 1
        if not zombies or time.monotonic() >= deadline:
            return reaped
        time.sleep(0.02)


# --- files -------------------------------------------------------------------------------------


def _open_dir(name: str, dir_fd: int | None) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        # A chmod-000 directory (only matters when we are not root): make it ours to enter.
        # lstat said it is a directory and the session's processes are dead, so it is still one.
        os.chmod(name, 0o700, dir_fd=dir_fd)
        return os.open(name, flags, dir_fd=dir_fd)


def remove_entry(dir_fd: int | None, name: str, report: WipeReport, shown: str) -> None:
    """Remove ``name`` (relative to ``dir_fd``) and everything below it, counting files and
    bytes into ``report``. Errors go to ``report.details``; the walk goes on."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        report.details.append(f"cannot stat {shown}: {exc.strerror}")
        return
    if stat.S_ISDIR(st.st_mode):
        try:
            fd = _open_dir(name, dir_fd)
        except OSError as exc:
            report.details.append(f"cannot open {shown}: {exc.strerror}")
            return
        try:
            if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
                os.fchmod(fd, 0o700)  # read-only dirs: allow unlinking their entries
            with os.scandir(fd) as it:
                names = [e.name for e in it]
            for child in names:
                remove_entry(fd, child, report, f"{shown}/{child}")
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=dir_fd)
        except OSError as exc:
            report.details.append(f"cannot remove {shown}: {exc.strerror}")
        return
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        report.details.append(f"cannot remove {shown}: {exc.strerror}")
        return
    report.files_removed += 1
    if stat.S_ISREG(st.st_mode):
        report.bytes_removed += st.st_size


def remove_path(path: Path, report: WipeReport) -> None:
    remove_entry(None, str(path), report, str(path))


def sweep_owned(uid: int, report: WipeReport | None, dirs: Iterable[str] = TEMP_DIRS) -> list[str]:
    """Find (and with a ``report``, remove) every entry owned by ``uid`` under ``dirs``.
    Returns the paths found."""
    found: list[str] = []
    budget = [MAX_WALK]

    def walk(dir_fd: int, shown: str) -> None:
        try:
            with os.scandir(dir_fd) as it:
                entries = list(it)
        except OSError:
            return
        for entry in entries:
            budget[0] -= 1
            if budget[0] < 0:
                return
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            path = f"{shown}/{entry.name}"
            if st.st_uid == uid:
                found.append(path)
                if report is not None:
                    remove_entry(dir_fd, entry.name, report, path)
            elif stat.S_ISDIR(st.st_mode):
                try:
                    fd = os.open(
                        entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd
                    )
                except OSError:
                    continue
                try:
                    walk(fd, path)
                finally:
                    os.close(fd)

    for base in dirs:
        try:
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            walk(fd, base.rstrip("/"))
        finally:
            os.close(fd)
    if budget[0] < 0 and report is not None:
        report.details.append(f"temp sweep stopped after {MAX_WALK} entries")
    return found
