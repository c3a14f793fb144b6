"""Who a session runs as, and one supervisor class per managed program (the sandbox with
JupyterLab, cloudflared): start in its own session/process group, watch for exit, stop with
SIGTERM → grace → SIGKILL on the whole group (after simpervisor and JupyterHub's spawner)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from nexcompute_agent.sessions.state import ProcRecord

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

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


def drain(fd: int, path: Path, limit: int) -> None:
    """Copy what arrives on ``fd`` into ``path`` until every writer closed it, keeping the file
    under ``limit`` bytes (older output is dropped): a session's program cannot fill the host
    disk through its log."""
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    size = 0
    try:
        while chunk := os.read(fd, 65536):
            if size + len(chunk) > limit:
                os.ftruncate(out, 0)
                os.lseek(out, 0, os.SEEK_SET)
                size = os.write(out, b"[earlier output dropped]\n")
            size += os.write(out, chunk[-limit // 2 :])
    except OSError as exc:
        log.warning("output of %s lost: %s", path, exc)
    finally:
        os.close(out)
        os.close(fd)


class ManagedProcess:
    """One program in its own session (``start_new_session``), output to a log file (through
    a pipe the agent drains, capped at ``LOG_LIMIT``)."""

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
        self.create_time = 0.0
        self._drain: threading.Thread | None = None

    def start(self) -> None:
        out: int = subprocess.DEVNULL
        fh = None
        reader = None
        if self.log_path is not None:
            reader, fh = os.pipe()
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
        except BaseException:
            if reader is not None:
                os.close(reader)
            raise
        finally:
            if fh is not None:
                os.close(fh)
        if reader is not None and self.log_path is not None:
            self._drain = threading.Thread(
                target=drain,
                args=(reader, self.log_path, LOG_LIMIT),
                name=f"{self.role}-log",
                daemon=True,
            )
            self._drain.start()
        with contextlib.suppress(psutil.Error):
            self.create_time = psutil.Process(self.popen.pid).create_time()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def record(self) -> ProcRecord:
        return ProcRecord(pid=self.pid, create_time=self.create_time, role=self.role)

    def poll(self) -> int | None:
        """The exit status once it ended (and reaped), else None."""
        return None if self.popen is None else self.popen.poll()

    def tail(self, lines: int = 5) -> str:
        """The last lines of its output, for error messages."""
        if self.log_path is None:
            return ""
        if self._drain is not None and self.poll() is not None:
            self._drain.join(0.5)  # its last words may still be in the pipe
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _signal_group(self, sig: int) -> None:
        # The group id is the pid (start_new_session). Signal the group even after the leader
        # died: its children may still be in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def stop(self, grace: float) -> str:
        """SIGTERM to the process group, wait ``grace`` seconds, then SIGKILL. Returns what it
        took: "exited" (already gone), "terminated" or "killed"."""
        if self.popen is None:
            return "exited"
        if self.popen.poll() is not None:
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
            if self.popen is not None and self.popen.poll() is not None:
                return True
            await asyncio.sleep(0.05)
        return self.popen is not None and self.popen.poll() is not None
