"""Who a session runs as, its resource limits, and one supervisor class per managed program
(JupyterLab, cloudflared): start in its own session/process group, watch for exit, stop with
SIGTERM → grace → SIGKILL on the whole group (after simpervisor and JupyterHub's spawner)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import resource
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from nexcompute_agent.sessions.state import ProcRecord

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


class SessionError(Exception):
    """A session step failed; the text is sent to the server as ``session.failed.error``."""


@dataclass(frozen=True)
class RunAs:
    """The identity session programs run under. ``uid`` None: the agent's own (unprivileged)."""

    user: str | None = None
    uid: int | None = None
    gid: int | None = None
    home_groups: tuple[int, ...] = ()

    @property
    def privileged(self) -> bool:
        return self.uid is not None

    @property
    def extra_groups(self) -> list[int] | None:
        """For Popen: the user's supplementary groups (as initgroups would set), or None to
        leave ours alone when not switching users."""
        return list(self.home_groups) if self.uid is not None else None


def resolve_run_as(session_user: str) -> RunAs:
    """As root: the configured session user (which must exist and must not be root). Otherwise
    the agent's own identity, with a warning, since it cannot switch users."""
    if os.geteuid() != 0:
        log.warning(
            "the agent is not running as root: sessions run as %s itself, and the wipe covers "
            "only the session's own processes and workspace",
            pwd.getpwuid(os.geteuid()).pw_name,
        )
        return RunAs()
    try:
        pw = pwd.getpwnam(session_user)
    except KeyError:
        raise SessionError(
            f"session user {session_user!r} does not exist on this machine; create it with "
            f"`useradd --system --create-home {session_user}` or set session_user"
        ) from None
    if pw.pw_uid == 0:
        raise SessionError(f"session user {session_user!r} is root; sessions never run as root")
    groups = tuple(g for g in os.getgrouplist(session_user, pw.pw_gid) if g != pw.pw_gid)
    return RunAs(user=session_user, uid=pw.pw_uid, gid=pw.pw_gid, home_groups=groups)


@dataclass
class Limits:
    """Resource limits for one session: a cgroup v2 when one can be made, else rlimits."""

    max_processes: int
    memory_bytes: int | None
    cpus: float
    cgroup: Path | None = None
    details: list[str] = field(default_factory=list)

    def setup(self, session_id: int, mode: str, privileged: bool) -> None:
        if mode == "auto" and privileged:
            try:
                self.cgroup = _make_cgroup(session_id, self)
            except OSError as exc:
                self.details.append(f"cgroup v2 not usable ({exc.strerror or exc}); using rlimits")
        if self.cgroup is not None:
            mem = self.memory_bytes or "max"
            self.details.append(
                f"limits: cgroup v2 {self.cgroup} (memory.max={mem}, "
                f"pids.max={self.max_processes}, cpus={self.cpus or 'unlimited'})"
            )
        else:
            parts = [f"RLIMIT_NPROC={self.max_processes}" if privileged else "no RLIMIT_NPROC"]
            if self.memory_bytes:
                parts.append(f"RLIMIT_AS={self.memory_bytes} per process")
            self.details.append("limits: rlimits (" + ", ".join(parts) + ")")

    def preexec(self, privileged: bool) -> Callable[[], None]:
        """Runs in the child after the user switch, before exec. Only async-signal-safe-ish
        syscalls: setrlimit."""
        nproc = self.max_processes if (privileged and self.cgroup is None) else None
        mem = self.memory_bytes if self.cgroup is None else None

        def apply() -> None:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if nproc is not None:
                # Counts every process of the real uid: a fork bomb stops at this many.
                resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            if mem is not None:
                resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

        return apply

    def attach(self, pid: int) -> None:
        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        if self.cgroup is None:
            return
        with contextlib.suppress(OSError):
            (self.cgroup / "cgroup.kill").write_text("1")
        for _ in range(20):
            try:
                self.cgroup.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


def _make_cgroup(session_id: int, limits: Limits) -> Path:
    if not (CGROUP_ROOT / "cgroup.controllers").is_file():
        raise OSError(0, "/sys/fs/cgroup is not a cgroup v2 mount")
    parent = CGROUP_ROOT / "nexcompute"
    parent.mkdir(exist_ok=True)
    wanted = {"memory", "pids", "cpu"}
    available = set((CGROUP_ROOT / "cgroup.controllers").read_text().split())
    if not wanted <= available:
        raise OSError(0, f"controllers missing: {' '.join(sorted(wanted - available))}")
    (CGROUP_ROOT / "cgroup.subtree_control").write_text("+memory +pids +cpu")
    (parent / "cgroup.subtree_control").write_text("+memory +pids +cpu")
    cg = parent / f"session-{session_id}"
    cg.mkdir(exist_ok=True)
    (cg / "pids.max").write_text(str(limits.max_processes))
    if limits.memory_bytes:
        (cg / "memory.max").write_text(str(limits.memory_bytes))
    if limits.cpus > 0:
        (cg / "cpu.max").write_text(f"{int(limits.cpus * 100000)} 100000")
    return cg


class ManagedProcess:
    """One program in its own session (``start_new_session``), output to a log file."""

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

    def start(self) -> None:
        out: int = subprocess.DEVNULL
        fh = None
        if self.log_path is not None:
            fh = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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
                os.close(fh)
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
