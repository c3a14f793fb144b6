"""Who a session runs as, and one supervisor class per managed program (the sandbox with
JupyterLab, cloudflared): start in its own session/process group, watch for exit, stop with
SIGTERM → grace → SIGKILL on the whole group (after simpervisor and JupyterHub's spawner).

A program's output goes through a pipe to a log keeper (:mod:`.logkeeper`), a process of its
own that outlives the agent: an agent restart (upgrade, crash, ``kill -9``) leaves the program
running with a reader on its pipe, and the next agent takes it back (:meth:`ManagedProcess.adopt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from nexcompute_agent.sessions.state import ProcRecord

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)


class SessionError(Exception):
    """A session step failed; the text is sent to the server as ``session.failed.error``."""


@dataclass(frozen=True)
class RunAs:
    """The identity session programs run under. ``uid`` None: the agent's own (unprivileged)."""

    user: str | None = None
    uid: int | None = None
    gid: int | None = None

    @property
    def privileged(self) -> bool:
        return self.uid is not None

    @property
    def extra_groups(self) -> list[int] | None:
        """For Popen: no supplementary groups when switching users (session accounts have
        none), or None to leave ours alone."""
        return [] if self.uid is not None else None


LOG_LIMIT = 1 << 20  # bytes of a program's output kept on the host disk
KEEPER = Path(__file__).with_name("logkeeper.py")
ADOPTED_EXIT = -1
"""What :meth:`ManagedProcess.poll` says of an adopted process that ended: it was not our
child, so its exit status is unknown."""


class ManagedProcess:
    """One program in its own session (``start_new_session``), output to a log file through a
    pipe drained by the log keeper (capped at ``LOG_LIMIT``).

    A process an earlier agent started is taken back with :meth:`adopt`: then there is no
    ``popen``; it is watched through psutil by pid *and* start time."""

    def __init__(
        self,
        role: str,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: str | None = None,
        run_as: RunAs | None = None,
        preexec: Callable[[], None] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.role = role
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.run_as = run_as or RunAs()
        self.preexec = preexec
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.keeper: subprocess.Popen[bytes] | None = None
        self.create_time = 0.0
        self._adopted: psutil.Process | None = None

    @classmethod
    def adopt(
        cls, role: str, pid: int, create_time: float, *, log_path: Path | None = None
    ) -> ManagedProcess | None:
        """The process an earlier agent started, if ``pid`` still runs with ``create_time``
        (never by pid alone: pids are recycled); else None."""
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - create_time) > 0.05 or gone(proc):
                return None
        except psutil.Error:
            return None
        mp = cls(role, [], env={}, log_path=log_path)
        mp._adopted, mp.create_time = proc, create_time
        return mp

    @property
    def started(self) -> bool:
        return self.popen is not None or self._adopted is not None

    @property
    def adopted(self) -> bool:
        return self._adopted is not None

    def _start_keeper(self, log_path: Path) -> int:
        """The log keeper on a new pipe; returns the pipe's write end for the program."""
        reader, writer = os.pipe()
        try:
            self.keeper = subprocess.Popen(  # noqa: S603
                [sys.executable, "-I", "-S", str(KEEPER), str(log_path), str(LOG_LIMIT)],
                stdin=reader,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
        except BaseException:
            os.close(writer)
            raise
        finally:
            os.close(reader)
        return writer

    def start(self) -> None:
        out: int = subprocess.DEVNULL
        fh = None
        if self.log_path is not None:
            fh = self._start_keeper(self.log_path)
            out = fh
        try:
            self.popen = subprocess.Popen(  # noqa: S603
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                close_fds=True,
                preexec_fn=self.preexec,
                user=self.run_as.uid,
                group=self.run_as.gid,
                extra_groups=self.run_as.extra_groups,
            )
        finally:
            if fh is not None:
                os.close(fh)  # the keeper sees end of file once the program's side closes
        with contextlib.suppress(psutil.Error):
            self.create_time = psutil.Process(self.popen.pid).create_time()

    @property
    def pid(self) -> int:
        if self._adopted is not None:
            return self._adopted.pid
        assert self.popen is not None
        return self.popen.pid

    def record(self) -> ProcRecord:
        return ProcRecord(pid=self.pid, create_time=self.create_time, role=self.role)

    def keeper_record(self) -> ProcRecord | None:
        """The log keeper, recorded so that a wipe ends it should a straggler hold its pipe."""
        if self.keeper is None:
            return None
        with contextlib.suppress(psutil.Error):
            ct = psutil.Process(self.keeper.pid).create_time()
            return ProcRecord(pid=self.keeper.pid, create_time=ct, role="log")
        return None

    def poll(self) -> int | None:
        """The exit status once it ended (and reaped), else None. An adopted process is not
        our child: ended (or a zombie left for its new parent) gives ``ADOPTED_EXIT``."""
        if self._adopted is not None:
            return ADOPTED_EXIT if gone(self._adopted) else None
        if self.popen is None:
            return None
        rc = self.popen.poll()
        if rc is not None and self.keeper is not None:
            self.keeper.poll()  # reap the keeper once it saw end of file
        return rc

    def tail(self, lines: int = 5) -> str:
        """The last lines of its output, for error messages."""
        if self.log_path is None:
            return ""
        if self.keeper is not None and self.poll() is not None:
            # Its last words may still be in the pipe.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.keeper.wait(0.5)
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _signal_group(self, sig: int) -> None:
        # The group id is the pid (start_new_session). Signal the group even after the leader
        # died: its children may still be in it. Linux never hands out a pid still used as a
        # group id, so a live process with this pid and another start time means our group is
        # empty and the pid was reused: that process (and its group) is not ours to signal.
        with contextlib.suppress(psutil.Error):
            if (
                self.create_time
                and abs(psutil.Process(self.pid).create_time() - self.create_time) > 0.05
            ):
                return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def stop(self, grace: float) -> str:
        """SIGTERM to the process group, wait ``grace`` seconds, then SIGKILL. Returns what it
        took: "exited" (already gone), "terminated" or "killed"."""
        if not self.started:
            return "exited"
        if self.poll() is not None:
            self._signal_group(signal.SIGKILL)  # stragglers left in the group
            return "exited"
        self._signal_group(signal.SIGTERM)
        if await self._wait(grace):
            self._signal_group(signal.SIGKILL)
            return "terminated"
        self._signal_group(signal.SIGKILL)
        await self._wait(5.0)
        return "killed"

    async def _wait(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.started and self.poll() is not None:
                return True
            await asyncio.sleep(0.05)
        return self.started and self.poll() is not None


def gone(proc: psutil.Process) -> bool:
    """Ended, or a zombie (PITFALLS: the host's PID 1 reaps slowly)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
