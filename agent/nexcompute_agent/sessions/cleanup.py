"""Finding and ending processes outside a sandbox: the unprivileged agent's sessions (no
sandbox, no session account), programs the agent started (bwrap's outer process, cloudflared),
and reaping. A sandboxed session is ended by its PID namespace and its account by
:mod:`.wiper`; this module never decides whether a session is clean.

- recorded processes: pid + create_time from the state file, with their descendants;
- marked processes: ours whose environment carries ``NEXCOMPUTE_SESSION_ID`` (the unprivileged
  agent's sessions), which double-forked children inherit.
Zombies count as gone: they hold no resources and PID 1 reaps them in its own time.

These functions block (psutil); the manager runs them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from nexcompute_agent.sessions.state import ProcRecord

SESSION_MARKER = "NEXCOMPUTE_SESSION_ID"


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
    """Make orphaned descendants our children instead of PID 1's: a sandbox's init whose bwrap
    died first comes to us, and we reap it at once (a zombie init keeps the session's
    credentials and keyring; PID 1 on these machines reaps slowly). Linux only."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False
