"""The session's Jupyter server: its command line and environment, start (inside the sandbox
when there is one), readiness, watch, activity and the stop ladder SIGINT → SIGTERM → SIGKILL
(as JupyterHub's local spawner stops a single-user server)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from nexcompute_agent.protocol import MAX_CPU_PERCENT, MAX_INT32, SessionAccess, SessionActivity
from nexcompute_agent.sessions.activity import (
    ActivityTracker,
    ProcessReadings,
    Readings,
    kernel_readings,
    lab_interaction,
    read_processes,
)
from nexcompute_agent.sessions.http import http_get, http_request
from nexcompute_agent.sessions.process import ManagedProcess, SessionError
from nexcompute_agent.sessions.sandbox import sandbox_init

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

SESSION_PATH = "/usr/local/bin:/usr/bin:/bin"
ACTIVITY_TIMEOUT = 5.0  # per request to Jupyter's REST API
# How often a starting Jupyter is asked whether it answers: until it listens each try is a
# refused connect on loopback (microseconds), and the session's wait after it is ready is half
# of this on average (time to Jupyter, bench/time_to_jupyter.py).
READY_POLL_SECONDS = 0.01
# Served by the session's Lab extension (its server part): the student's last interaction.
LAB_ACTIVITY_PATH = "/nexcompute/api/activity"
# The door (docs/security.md): the identity provider from the nexcompute-jupyter package in
# the session environment; a session environment without it fails the start loudly.
IDENTITY_PROVIDER = "nexcompute_jupyter.identity.NexusIdentityProvider"
# The server extension (lease, Extend, activity, save before the stop, workspace download).
SERVER_EXTENSION = "nexcompute_jupyter"
STOPPING_PATH = "/nexcompute/api/stopping"
SERVER_CONFIG = "jupyter_server_config.json"  # in JUPYTER_CONFIG_DIR, read by Jupyter at start


@dataclass(frozen=True)
class JupyterSpec:
    command: list[str]  # resolved jupyter_command (absolute executable first)
    workspace: str
    port: int
    bind_host: str
    token: str
    terminals: bool
    remote: bool  # served through a tunnel or on a non-loopback address
    trust_xheaders: bool
    user: str  # the name the session sees (USER, LOGNAME)
    shell: str
    session_id: int = 0
    nexus_url: str = ""
    access: SessionAccess | None = None
    # The session-scoped capability for the extension's calls to the Nexus (optional: an older
    # server sends none).
    capability: str | None = None
    # TLS served by Jupyter itself (direct tunnel off loopback): paths as Jupyter sees them.
    certfile: str | None = None
    keyfile: str | None = None
    # A warm sandbox's hand-over file (as Jupyter sees it): the session's token and door
    # settings arrive there (nexcompute_jupyter.identity, docs/sandbox.md).
    handover_file: str = ""

    @property
    def scheme(self) -> str:
        return "https" if self.certfile else "http"


def session_env(spec: JupyterSpec, *, marker: tuple[str, str] | None = None) -> dict[str, str]:
    """The whole environment of the session: only these, never the agent's credential, server
    URL or anything else of ours."""
    ws = spec.workspace
    env = {
        "PATH": f"{os.path.dirname(spec.command[0])}:{SESSION_PATH}",
        "HOME": ws,
        "USER": spec.user,
        "LOGNAME": spec.user,
        "SHELL": spec.shell,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",  # noqa: S108 - the sandbox's own tmpfs
        "XDG_CONFIG_HOME": f"{ws}/.config",
        "XDG_CACHE_HOME": f"{ws}/.cache",
        "XDG_DATA_HOME": f"{ws}/.local/share",
        "XDG_STATE_HOME": f"{ws}/.local/state",
        "XDG_RUNTIME_DIR": f"{ws}/.run",
        "JUPYTER_CONFIG_DIR": f"{ws}/.jupyter",
        "JUPYTER_DATA_DIR": f"{ws}/.local/share/jupyter",
        "JUPYTER_RUNTIME_DIR": f"{ws}/.local/share/jupyter/runtime",
        "JUPYTER_PLATFORM_DIRS": "1",
        "IPYTHONDIR": f"{ws}/.ipython",
        # `pip install --user` goes into the workspace (HOME), which is writable.
        "PYTHONUSERBASE": f"{ws}/.local",
        # No token here: it is in the 0600 config file (server_config), not inherited by
        # every kernel and shell of the session, and not in argv (`ps`).
    }
    if marker is not None:
        env[marker[0]] = marker[1]
    return env


def server_config(spec: JupyterSpec) -> dict[str, Any]:
    """What the door needs, for ``<JUPYTER_CONFIG_DIR>/jupyter_server_config.json`` (written
    0600 for the session account by :func:`write_server_config`). Nothing of the agent's or the
    Nexus's own credentials: only this session's Jupyter token, which signs its one-time codes."""
    door: dict[str, Any] = {"session_id": spec.session_id, "nexus_url": spec.nexus_url}
    if spec.handover_file:
        door["handover_file"] = spec.handover_file
    if spec.access is not None:
        door.update(
            access_team_domain=spec.access.team_domain,
            access_audience=spec.access.audience,
            access_email=spec.access.email,
        )
    ext: dict[str, Any] = {"session_id": spec.session_id, "nexus_url": spec.nexus_url}
    if spec.capability:
        ext["capability"] = spec.capability
    if spec.handover_file:
        ext["handover_file"] = spec.handover_file  # the capability comes at hand-over
    return {
        "ServerApp": {"jpserver_extensions": {SERVER_EXTENSION: True}},
        "IdentityProvider": {"token": spec.token},
        "NexusIdentityProvider": door,
        "NexComputeExtension": ext,
    }


def write_server_config(spec: JupyterSpec, uid: int | None, gid: int | None) -> Path:
    """Write :func:`server_config` into the workspace's Jupyter config folder: created 0600
    (never readable by anyone else for a moment), owned by the session account."""
    path = Path(spec.workspace) / ".jupyter" / SERVER_CONFIG
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if uid is not None and gid is not None:
            os.fchown(fd, uid, gid)
        os.write(fd, json.dumps(server_config(spec)).encode())
    finally:
        os.close(fd)
    return path


def jupyter_argv(spec: JupyterSpec) -> list[str]:
    tls = [f"--ServerApp.certfile={spec.certfile}", f"--ServerApp.keyfile={spec.keyfile}"]
    return [
        *spec.command,
        "--no-browser",
        f"--ip={spec.bind_host}",
        f"--port={spec.port}",
        "--port-retries=0",
        f"--ServerApp.root_dir={spec.workspace}",
        f"--ServerApp.terminals_enabled={spec.terminals}",
        f"--ServerApp.allow_remote_access={spec.remote}",
        f"--ServerApp.trust_xheaders={spec.trust_xheaders}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        f"--ServerApp.identity_provider_class={IDENTITY_PROVIDER}",
        *(tls if spec.certfile else []),
    ]


def rlimits(*, max_tasks: int | None, memory_bytes: int | None) -> Callable[[], None]:
    """A preexec step: no core dumps; the fallbacks where cgroups cannot limit (inherited
    through bwrap and setpriv, enforced once the session account runs)."""

    import resource  # POSIX only: imported where used, so the package imports everywhere

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if max_tasks is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (max_tasks, max_tasks))
        if memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return apply


class JupyterServer:
    """One Jupyter Lab of one session. ``process`` is what we started: bwrap (the sandbox) or,
    for an unprivileged agent, Jupyter itself."""

    def __init__(self, spec: JupyterSpec, process: ManagedProcess, *, sandboxed: bool) -> None:
        self.spec = spec
        self.process = process
        self.sandboxed = sandboxed
        self.init_pid: int | None = None
        self.init_create_time: float | None = None

    def start(self) -> None:
        self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def tail(self, lines: int = 3) -> str:
        return self.process.tail(lines)

    def find_init(self) -> None:
        """Remember the sandbox's init (bwrap inside the PID namespace) by pid and start
        time, for the stop and for recovery."""
        if not self.sandboxed or self.init_pid is not None:
            return
        init = sandbox_init(self.pid)
        if init is not None:
            with contextlib.suppress(psutil.Error):
                self.init_create_time = init.create_time()
                self.init_pid = init.pid

    def _jupyter(self) -> psutil.Process | None:
        """Jupyter itself: the init's child in the sandbox, else the process we started."""
        try:
            if not self.sandboxed:
                return psutil.Process(self.pid)
            self.find_init()
            if self.init_pid is None:
                return None
            children = psutil.Process(self.init_pid).children()
            return children[0] if children else None
        except psutil.Error:
            return None

    async def wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        headers = {"Authorization": f"token {self.spec.token}"}
        while True:
            rc = self.poll()
            if rc is not None:
                tail = self.tail(3)
                raise SessionError(
                    f"Jupyter exited with code {rc} while starting" + (f": {tail}" if tail else "")
                )
            with contextlib.suppress(OSError, asyncio.TimeoutError, TimeoutError):
                status, _ = await http_get(
                    "127.0.0.1", self.spec.port, "/api/status", headers=headers,
                    tls=self.spec.certfile is not None,
                )  # fmt: skip
                if status == 200:
                    self.find_init()
                    return
            if loop.time() >= deadline:
                raise SessionError(f"Jupyter did not answer /api/status within {timeout:g}s")
            await asyncio.sleep(READY_POLL_SECONDS)

    def exit_text(self) -> str | None:
        """Why Jupyter is gone, or None while it runs."""
        rc = self.poll()
        if rc is None:
            return None
        tail = self.tail(3)
        return f"Jupyter exited unexpectedly with code {rc}" + (f": {tail}" if tail else "")

    async def announce_stop(self, wait: float) -> str | None:
        """Tell the extension the session is stopping, and give the open Lab up to ``wait``
        seconds to save every open document (the extension answers at once when no Lab tab
        polled lately). None when saved or nobody was there to save; else why not, for the
        receipt. Never raises: the stop goes on regardless."""
        if not self.process.started or self.poll() is not None:
            return None
        headers = {
            "Authorization": f"token {self.spec.token}",
            "Content-Type": "application/json",
        }
        body = json.dumps({"wait": wait}).encode()
        try:
            status, answer = await http_request(
                "127.0.0.1", self.spec.port, STOPPING_PATH, method="POST", body=body,
                headers=headers, timeout=wait + 3.0, tls=self.spec.certfile is not None,
            )  # fmt: skip
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            log.warning(
                "session %d: the stop notice to Jupyter failed: %s", self.spec.session_id, exc
            )
            return None
        if status != 200:
            return None  # no extension (an older session environment): nothing to wait for
        with contextlib.suppress(ValueError, RecursionError):
            data = json.loads(answer)
            if isinstance(data, dict) and data.get("frontend") and not data.get("saved"):
                return (
                    f"The open Jupyter Lab did not confirm saving within {wait:g}s; "
                    "what was on disk was kept until the wipe."
                )
        return None

    async def stop(self, grace: float) -> str:
        """SIGINT, then SIGTERM, then SIGKILL to Jupyter, ``grace`` seconds apart; then the
        sandbox's init (the kernel ends its PID namespace). Returns "exited", "interrupted",
        "terminated" or "killed"."""
        if not self.process.started:
            return "exited"
        if self.poll() is not None:
            await self._end_rest()
            return "exited"
        outcome = "killed"
        for sig, name in ((signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")):
            target = self._jupyter()
            if target is None:
                break
            with contextlib.suppress(psutil.Error):
                target.send_signal(sig)
            if await self._wait(grace):
                outcome = name
                break
        target = self._jupyter() if self.poll() is None else None
        if target is not None:
            with contextlib.suppress(psutil.Error):
                target.send_signal(signal.SIGKILL)
        await self._end_rest()
        return outcome

    async def _end_rest(self) -> None:
        """Whatever Jupyter left. Sandboxed: bwrap's init exits with Jupyter (the kernel then
        ends the PID namespace) and bwrap reaps it; the teardown checks that, and ends the
        namespace itself after a crash. Unsandboxed: Jupyter's process group."""
        if not self.sandboxed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        await self._wait(5.0)

    async def _wait(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.poll() is not None:
                return True
            await asyncio.sleep(0.05)
        return self.poll() is not None

    def session_processes(self, session_id: int) -> tuple[list[psutil.Process], set[int]]:
        """Every process of the session, and the pids whose own CPU is not the student's work
        (Jupyter, and the sandbox's init). Sandboxed: the init and all its descendants (a
        double-forked daemon is reparented to the init). Unprivileged: our processes marked
        with the session's id. Blocks (reads /proc)."""
        from nexcompute_agent.sessions.cleanup import marked_processes

        if not self.sandboxed:
            return marked_processes(session_id), {self.pid}
        self.find_init()
        if self.init_pid is None:
            return [], set()
        try:
            init = psutil.Process(self.init_pid)
            if (
                self.init_create_time is not None
                and abs(init.create_time() - self.init_create_time) > 0.05
            ):
                return [], set()  # a recycled pid: not ours
            procs = [init, *init.children(recursive=True)]
        except psutil.Error:
            return [], set()
        jupyter = self._jupyter()
        return procs, {init.pid} | ({jupyter.pid} if jupyter is not None else set())

    async def activity(
        self,
        session_id: int,
        tracker: ActivityTracker,
        gpu_busy_pids: Callable[[], set[int] | None] | None = None,
    ) -> SessionActivity:
        """The session's activity by our rule (:mod:`.activity`), for ``session.activity``.
        ``gpu_busy_pids``: the host's pids on a busy GPU (None: no GPU tool). Raises OSError
        when Jupyter's REST API does not answer (the report is skipped)."""
        headers = {"Authorization": f"token {self.spec.token}"}
        tls = self.spec.certfile is not None

        async def get(path: str) -> Any:
            status, body = await http_get(
                "127.0.0.1", self.spec.port, path, headers=headers, timeout=ACTIVITY_TIMEOUT,
                tls=tls,
            )  # fmt: skip
            where = path.split("?")[0]
            if status != 200:
                raise OSError(f"GET {where} answered {status}")
            try:
                return json.loads(body)
            except (ValueError, RecursionError):
                raise OSError(f"GET {where} did not answer JSON") from None

        # Neither poll moves Jupyter's own activity clocks: /api/status is not tracked, and
        # /api/kernels is asked with no_track_activity. Jupyter's /api/status last_activity is
        # not used (the open tab's polling keeps it fresh); its connections are informational.
        info = await get("/api/status")
        kernels = await get("/api/kernels?no_track_activity=1")
        if not isinstance(info, dict) or not isinstance(kernels, list):
            raise OSError("unexpected answer from the Jupyter REST API")
        busy, kernel_last = kernel_readings(kernels)
        connections = info.get("connections")
        if isinstance(connections, bool) or not isinstance(connections, int):
            connections = 0
        lab = await self._lab_interaction(headers, tls)

        def look() -> tuple[ProcessReadings, bool | None]:
            procs, exclude = self.session_processes(session_id)
            on_gpu = gpu_busy_pids() if gpu_busy_pids is not None else None
            gpu = None if on_gpu is None else bool(on_gpu & {p.pid for p in procs})
            return read_processes(procs, exclude=exclude), gpu

        procs, gpu = await asyncio.to_thread(look)
        verdict = tracker.update(
            Readings(
                now=time.time(),
                kernels_busy=busy,
                kernel_last=kernel_last,
                terminal_input=procs.terminal_input,
                lab_interaction=lab,
                cpu_seconds=procs.cpu_seconds if procs.count else None,
                gpu_busy=gpu,
            )
        )
        return SessionActivity(
            session_id=session_id,
            last_activity=dt.datetime.fromtimestamp(verdict.last_activity, dt.UTC),
            kernels_busy=min(busy, MAX_INT32),
            connections=min(max(connections, 0), MAX_INT32),
            source=verdict.source,
            cpu_percent=(
                None if verdict.cpu_percent is None else min(verdict.cpu_percent, MAX_CPU_PERCENT)
            ),
        )

    async def _lab_interaction(self, headers: dict[str, str], tls: bool) -> float | None:
        """The student's last interaction as the session's Lab extension reports it; None
        without the extension (404) or when it does not answer: never fails the report."""
        try:
            status, body = await http_get(
                "127.0.0.1", self.spec.port, LAB_ACTIVITY_PATH, headers=headers,
                timeout=ACTIVITY_TIMEOUT, tls=tls,
            )  # fmt: skip
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            log.debug("no interaction from the Lab extension: %s", exc)
            return None
        return lab_interaction(status, body)


def reap(pid: int | None) -> None:
    """Reap ``pid`` if it became our zombie child (we are the subreaper of the sandbox)."""
    if pid is None:
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def workspace_dirs() -> list[str]:
    return [".jupyter", ".ipython", ".cache", ".config", ".local/share/jupyter/runtime",
            ".local/state", ".run"]  # fmt: skip


def make_workspace_dirs(root: Path, uid: int | None, gid: int | None) -> None:
    """The folders Jupyter and the XDG variables point at, owned by the session account."""
    for sub in workspace_dirs():
        path = root
        for part in sub.split("/"):
            path = path / part
            if not path.exists():
                path.mkdir(mode=0o700)
                if uid is not None and gid is not None:
                    os.chown(path, uid, gid, follow_symlinks=False)
