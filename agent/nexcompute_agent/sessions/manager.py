"""The session runtime: ``session.start`` → workspace, JupyterLab, tunnel, URL;
``session.stop`` → stop, kill, wipe, verify, receipt. Crash safety through the state file.

Message flow (agent side of the protocol):
- ``session.start`` is answered ``reply`` ok at once (accepted; a duplicate start of a live session
  is ok too) or ok=False when the machine already runs another session. Then, from a background
  task: ``session.progress`` for allocated, workspace_ready, jupyter_starting, tunnel_opening,
  ready; then ``session.ready`` {url} or ``session.failed`` {error}.
- A failed start is wiped at once and followed by ``session.receipt``.
- Jupyter or the tunnel dying after ``ready`` also gives ``session.failed`` (error says which),
  then a wipe and a receipt: the session is over.
- ``session.stop`` is answered ok at once; the receipt follows. A stop for a session this agent
  does not know still wipes its workspace (and, as root with no other session live, every process
  and temp file of the session user) and sends a receipt: the server uses that to demand a wipe
  of a session it ended while the agent was away.
- ``session.failed``, ``session.ready`` and ``session.receipt`` that cannot be sent (not
  connected) are kept, receipts also in the state file, and sent after the next ``welcome``.
- ``session.activity`` right after ``session.ready`` and then every ``activity_seconds`` while
  the session runs: Jupyter's own ``last_activity`` and ``connections`` (``/api/status``) and the
  number of busy kernels (``/api/kernels``). A poll that fails is logged and skipped; an activity
  report that cannot be sent is dropped (the next one replaces it).

One session at a time: the kill-by-user sweep would otherwise hit the other session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from pydantic import AwareDatetime, TypeAdapter, ValidationError

from nexcompute_agent.aio import to_thread_settled
from nexcompute_agent.protocol import (
    MAX_INT32,
    ProgressStep,
    SessionActivity,
    SessionFailed,
    SessionReady,
    SessionReceipt,
    SessionRef,
    SessionStart,
    SessionStop,
)
from nexcompute_agent.sessions.cleanup import (
    SESSION_MARKER,
    WipeReport,
    become_subreaper,
    kill_all,
    marked_processes,
    reap_zombie_children,
    recorded_processes,
    remove_path,
    sweep_owned,
    user_processes,
)
from nexcompute_agent.sessions.http import free_port, http_get
from nexcompute_agent.sessions.process import (
    CGROUP_ROOT,
    Limits,
    ManagedProcess,
    RunAs,
    SessionError,
    resolve_run_as,
)
from nexcompute_agent.sessions.state import ProcRecord, SessionRecord, StateFile
from nexcompute_agent.sessions.tunnel import Tunnel, make_tunnel

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from pydantic import BaseModel

    from nexcompute_agent.config import AgentConfig

log = logging.getLogger(__name__)

VERSION_CHECK_TIMEOUT = 10.0
WATCH_INTERVAL = 0.25
MAX_DETAILS = 200
SESSION_PATH = "/usr/local/bin:/usr/bin:/bin"
ACTIVITY_TIMEOUT = 5.0  # per request to Jupyter's REST API
# A cancelled start/watch task unwinds at its next await; a step in a thread (workspace setup,
# starting Jupyter) is waited for first (to_thread_settled). Past this the wipe goes ahead.
UNWIND_TIMEOUT = 30.0
_AWARE_DATETIME: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)


class SessionRefused(Exception):
    """``session.start`` cannot be accepted (answered ``reply`` ok=False)."""


@dataclass
class Session:
    record: SessionRecord
    msg: SessionStart
    run_as: RunAs = field(default_factory=RunAs)
    jupyter: ManagedProcess | None = None
    tunnel: Tunnel | None = None
    limits: Limits | None = None
    argv: list[str] = field(default_factory=list)  # resolved jupyter_command
    url: str | None = None
    port: int | None = None  # Jupyter's, on 127.0.0.1
    task: asyncio.Task[None] | None = None
    activity: asyncio.Task[None] | None = None
    ending: asyncio.Task[None] | None = None
    details: list[str] = field(default_factory=list)


class SessionManager:
    def __init__(self, config: AgentConfig, send: Callable[[BaseModel], bool]) -> None:
        self.config = config
        self._send = send
        self.state = StateFile(config.state_dir)
        self.sessions: dict[int, Session] = {}
        self.pending: list[BaseModel] = []
        self._checked: set[tuple[str, int, int | None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recovered = False
        if os.name == "posix" and os.geteuid() == 0:
            become_subreaper()

    # --- reporting --------------------------------------------------------------------------

    def live(self) -> list[SessionRef]:
        """The sessions this agent runs, for ``hello`` (mirrors the state file)."""
        return [
            SessionRef(session_id=sid, state=s.record.state)
            for sid, s in sorted(self.sessions.items())
        ]

    def flush(self) -> None:
        """Send what could not be sent while disconnected. Call after ``welcome``."""
        pending, self.pending = self.pending, []
        for msg in pending:
            self._emit(msg, keep=True)
        self._save()

    def _emit(self, msg: BaseModel, *, keep: bool = False) -> None:
        if not self._send(msg) and keep:
            self.pending.append(msg)

    def _progress(self, session: Session, step: ProgressStep, message: str) -> None:
        from nexcompute_agent.protocol import SessionProgress

        log.info("session %d: %s", session.record.session_id, message)
        self._emit(
            SessionProgress(session_id=session.record.session_id, step=step, message=message)
        )

    def _save(self) -> None:
        records = {sid: s.record for sid, s in self.sessions.items()}
        receipts = [m for m in self.pending if isinstance(m, SessionReceipt)]
        try:
            self.state.save(records, receipts)
        except OSError as exc:
            log.error("cannot write the state file %s: %s", self.state.path, exc)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- commands -----------------------------------------------------------------------------

    def start(self, msg: SessionStart) -> dict[str, Any]:
        sid = msg.session_id
        if sid in self.sessions:
            # The server re-sends a start it is unsure about (e.g. after a reconnect): repeat
            # the URL if we have one, so it does not depend on a message it may have missed.
            url = self.sessions[sid].url
            if url is not None and self.sessions[sid].ending is None:
                self._emit(SessionReady(session_id=sid, url=url), keep=True)
            return {"duplicate": True}
        if self.sessions:
            other = ", ".join(str(s) for s in self.sessions)
            raise SessionRefused(f"this machine already runs session {other}")
        record = SessionRecord(
            session_id=sid,
            workspace=str(Path(self.config.workspace_root) / str(sid)),
            user=None,
            uid=None,
            started_at=time.time(),
        )
        session = Session(record=record, msg=msg)
        self.sessions[sid] = session
        self._save()  # before anything exists, so a crash mid-start is found and wiped
        session.task = self._spawn(self._start(session), f"session-{sid}-start")
        return {}

    def stop(self, msg: SessionStop) -> dict[str, Any]:
        session = self.sessions.get(msg.session_id)
        if session is None:
            self._spawn(self._wipe_unknown(msg.session_id, msg.reason), "session-wipe-unknown")
            return {"known": False}
        self._end(session, f"stopped by the server: {msg.reason}")
        return {"known": True}

    async def wait_idle(self) -> None:
        """Wait for running start/stop tasks (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- start --------------------------------------------------------------------------------

    async def _start(self, session: Session) -> None:
        sid = session.record.session_id
        try:
            self._progress(session, "allocated", f"session allocated on {socket.gethostname()}")
            await self._prepare(session)
            url = await self._launch(session)
        except asyncio.CancelledError:
            raise
        except SessionError as exc:
            await self._fail(session, str(exc))
            return
        except Exception as exc:
            log.exception("session %d: start failed", sid)
            await self._fail(session, f"internal error: {exc!r}")
            return
        session.record.state = "running"
        session.url = url
        self._save()
        self._progress(session, "ready", "Jupyter Lab is ready")
        self._emit(SessionReady(session_id=sid, url=url), keep=True)
        session.task = self._spawn(self._watch(session), f"session-{sid}-watch")
        session.activity = self._spawn(self._report_activity(session), f"session-{sid}-activity")

    async def _fail(self, session: Session, error: str) -> None:
        sid = session.record.session_id
        log.warning("session %d failed: %s", sid, error)
        self._emit(SessionFailed(session_id=sid, error=error[:4000]), keep=True)
        self._end(session, f"failed: {error}"[:500], from_task=True)

    async def _prepare(self, session: Session) -> None:
        cfg = self.config
        run_as = resolve_run_as(cfg.session_user)
        session.run_as = run_as
        if not run_as.privileged:
            session.details.append(
                "agent not root: Jupyter ran as the agent's user; wipe scope is the session's "
                "processes and workspace only (temp dirs not searched)"
            )
        session.record.user, session.record.uid = run_as.user, run_as.uid
        self._save()
        argv0 = await to_thread_settled(self._check_jupyter, run_as)
        ws = await to_thread_settled(self._make_workspace, session, run_as)
        self._progress(session, "workspace_ready", f"workspace ready at {ws}")
        limits = Limits(
            max_processes=cfg.session_max_processes,
            memory_bytes=session.msg.memory_limit_bytes,
            cpus=cfg.session_cpus,
        )
        session.limits = limits  # before setup: a cancel during it still removes the cgroup
        await to_thread_settled(limits.setup, session.record.session_id, cfg.session_cgroup,
                                run_as.privileged)  # fmt: skip
        session.details.extend(limits.details)
        session.argv = argv0

    def _resolve_jupyter(self) -> list[str]:
        cmd = list(self.config.jupyter_command)
        exe = shutil.which(cmd[0])
        if exe is None:
            raise SessionError(
                f"jupyter_command {cmd[0]!r} was not found on the agent's PATH; set "
                "jupyter_command to the full path of the session environment's jupyter, e.g. "
                '["/opt/nexcompute/session-env/bin/jupyter", "lab"] '
                "(build it with scripts/make-session-env.sh)"
            )
        return [os.path.abspath(exe), *cmd[1:]]

    def _check_jupyter(self, run_as: RunAs) -> list[str]:
        """The resolved Jupyter command, after checking the session user can run it."""
        argv = self._resolve_jupyter()
        try:
            st = os.stat(argv[0])
        except OSError as exc:
            raise SessionError(f"cannot stat {argv[0]}: {exc.strerror}") from None
        key = (argv[0], st.st_mtime_ns, run_as.uid)
        if key in self._checked:
            return argv
        who = run_as.user or "the agent's user"
        env = {"PATH": f"{os.path.dirname(argv[0])}:{SESSION_PATH}", "LANG": "C.UTF-8",
               "HOME": "/nonexistent"}  # fmt: skip
        try:
            proc = subprocess.run(  # noqa: S603
                [*argv, "--version"],
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=VERSION_CHECK_TIMEOUT,
                user=run_as.uid,
                group=run_as.gid,
                extra_groups=run_as.extra_groups,
            )
            ok, why = (
                proc.returncode == 0,
                (
                    f"exit {proc.returncode}: "
                    + (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()[-300:]
                ),
            )
        except subprocess.TimeoutExpired:
            ok, why = False, f"no answer within {VERSION_CHECK_TIMEOUT:g}s"
        except OSError as exc:
            ok, why = False, exc.strerror or str(exc)
        if not ok:
            raise SessionError(
                f"{who} cannot run `{shlex.join([*argv, '--version'])}` ({why}). The Python "
                f"environment that holds Jupyter must be readable and executable by {who}; a "
                "virtualenv made from a pyenv Python under /root (mode 0700) is not. Build a "
                "session environment with `scripts/make-session-env.sh "
                "/opt/nexcompute/session-env` and set jupyter_command = "
                '["/opt/nexcompute/session-env/bin/jupyter", "lab"].'
            )
        self._checked.add(key)
        return argv

    def _make_workspace(self, session: Session, run_as: RunAs) -> Path:
        root = Path(self.config.workspace_root)
        if not root.exists():
            root.mkdir(mode=0o711, parents=True)
        ws = Path(session.record.workspace)
        if ws.exists() or ws.is_symlink():
            report = WipeReport()
            remove_path(ws, report)
            session.details.append(f"removed a stale workspace ({report.files_removed} files)")
        ws.mkdir(mode=0o700)
        subdirs = [".jupyter", ".ipython", ".cache", ".config", ".local/share/jupyter/runtime",
                   ".local/state", ".run"]  # fmt: skip
        created = [ws]
        for sub in subdirs:
            path = ws
            for part in Path(sub).parts:
                path = path / part
                if not path.exists():
                    path.mkdir(mode=0o700)
                    created.append(path)
        if run_as.privileged:
            assert run_as.uid is not None and run_as.gid is not None
            for path in created:
                os.chown(path, run_as.uid, run_as.gid, follow_symlinks=False)
        os.chmod(ws, 0o700)
        return ws

    def _session_env(self, session: Session, argv0: str) -> dict[str, str]:
        ws = session.record.workspace
        user = session.run_as.user or pwd.getpwuid(os.geteuid()).pw_name
        shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        with contextlib.suppress(KeyError):
            pw_shell = pwd.getpwnam(user).pw_shell
            if pw_shell and not pw_shell.endswith(("nologin", "false")):
                shell = pw_shell
        # Only these: never the agent's credential, server URL or anything else of ours.
        return {
            "PATH": f"{os.path.dirname(argv0)}:{SESSION_PATH}",
            "HOME": ws,
            "USER": user,
            "LOGNAME": user,
            "SHELL": shell,
            "LANG": "C.UTF-8",
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
            # jupyter_server reads the token from here; argv would show it in `ps`.
            "JUPYTER_TOKEN": session.msg.token,
            # Inherited by every child, so an unprivileged agent can still find them all.
            SESSION_MARKER: str(session.record.session_id),
        }

    async def _launch(self, session: Session) -> str:
        cfg = self.config
        sid = session.record.session_id
        argv0 = session.argv
        log_dir = Path(cfg.state_dir)
        log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tunnel = make_tunnel(cfg, log_dir / f"session-{sid}-tunnel.log", cfg.session_stop_grace)
        tunnel.on_started = lambda proc: self._add_proc(session, proc)
        session.tunnel = tunnel
        port = tunnel.fixed_port or free_port()
        session.port = port
        remote = tunnel.kind != "direct" or tunnel.bind_host != "127.0.0.1"
        argv = [
            *argv0,
            "--no-browser",
            f"--ip={tunnel.bind_host}",
            f"--port={port}",
            "--port-retries=0",
            f"--ServerApp.root_dir={session.record.workspace}",
            f"--ServerApp.terminals_enabled={session.msg.terminals}",
            f"--ServerApp.allow_remote_access={remote}",
            f"--ServerApp.trust_xheaders={tunnel.kind != 'direct'}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        assert session.limits is not None
        jupyter = ManagedProcess(
            "jupyter",
            argv,
            env=self._session_env(session, argv0[0]),
            cwd=session.record.workspace,
            run_as=session.run_as,
            preexec=session.limits.preexec(session.run_as.privileged),
            log_path=log_dir / f"session-{sid}-jupyter.log",
        )
        self._progress(session, "jupyter_starting", f"starting Jupyter Lab on port {port}")
        try:
            await to_thread_settled(jupyter.start)
        except asyncio.CancelledError:
            if jupyter.popen is not None:  # started as the stop came: the wipe must end it
                session.jupyter = jupyter
                self._add_proc(session, jupyter)
            raise
        except OSError as exc:
            hint = ""
            if isinstance(exc, PermissionError) and session.run_as.privileged:
                hint = (
                    f" (can {session.run_as.user} reach {session.record.workspace}? every "
                    "parent directory of workspace_root needs o+x)"
                )
            raise SessionError(f"cannot start Jupyter: {exc.strerror or exc}{hint}") from None
        session.jupyter = jupyter
        self._add_proc(session, jupyter)
        try:
            session.limits.attach(jupyter.pid)
        except OSError as exc:
            session.details.append(f"could not move Jupyter into its cgroup: {exc.strerror}")
        await self._wait_jupyter(jupyter, port, session.msg.token)
        self._progress(session, "tunnel_opening", f"opening the {tunnel.kind} tunnel")
        base = await tunnel.open(port)
        return f"{base}/lab?token={session.msg.token}"

    def _add_proc(self, session: Session, proc: ManagedProcess) -> None:
        session.record.procs.append(proc.record())
        self._save()

    async def _wait_jupyter(self, jupyter: ManagedProcess, port: int, token: str) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.config.jupyter_start_timeout
        deadline = loop.time() + timeout
        headers = {"Authorization": f"token {token}"}
        while True:
            rc = jupyter.poll()
            if rc is not None:
                tail = jupyter.tail(3)
                raise SessionError(
                    f"Jupyter exited with code {rc} while starting" + (f": {tail}" if tail else "")
                )
            with contextlib.suppress(OSError, asyncio.TimeoutError, TimeoutError):
                status, _ = await http_get("127.0.0.1", port, "/api/status", headers=headers)
                if status == 200:
                    return
            if loop.time() >= deadline:
                raise SessionError(f"Jupyter did not answer /api/status within {timeout:g}s")
            await asyncio.sleep(0.05)

    async def _watch(self, session: Session) -> None:
        """After ready: a Jupyter or tunnel that dies ends the session. Also reaps the session's
        orphans that ended (we are their subreaper)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            reap_zombie_children(session.record.uid, exclude=[p.pid for p in session.record.procs])
            error = None
            if session.jupyter is not None and session.jupyter.poll() is not None:
                tail = session.jupyter.tail(3)
                error = f"Jupyter exited unexpectedly with code {session.jupyter.poll()}" + (
                    f": {tail}" if tail else ""
                )
            elif session.tunnel is not None and (why := session.tunnel.exited()):
                error = f"the tunnel ended unexpectedly: {why}"
            if error is not None:
                await self._fail(session, error)
                return

    # --- activity ----------------------------------------------------------------------------

    async def _report_activity(self, session: Session) -> None:
        """Send ``session.activity`` now and then every ``activity_seconds`` until the session
        ends (``_end`` cancels this task). Never ends the session itself."""
        sid = session.record.session_id
        while session.ending is None:
            try:
                msg = await self._poll_activity(session)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed poll is skipped, whatever the reason
                log.warning("session %d: cannot read Jupyter's activity: %s", sid, exc)
            else:
                if session.ending is None:
                    self._emit(msg)
            await asyncio.sleep(self.config.activity_seconds)

    async def _poll_activity(self, session: Session) -> SessionActivity:
        assert session.port is not None
        headers = {"Authorization": f"token {session.msg.token}"}

        async def get(path: str) -> Any:
            assert session.port is not None
            status, body = await http_get(
                "127.0.0.1", session.port, path, headers=headers, timeout=ACTIVITY_TIMEOUT
            )
            where = path.split("?")[0]
            if status != 200:
                raise OSError(f"GET {where} answered {status}")
            try:
                return json.loads(body)
            except (ValueError, RecursionError):
                raise OSError(f"GET {where} did not answer JSON") from None

        # /api/status does not count as activity in jupyter_server; /api/kernels would, without
        # no_track_activity, and then our own polling would keep every session "active".
        info = await get("/api/status")
        kernels = await get("/api/kernels?no_track_activity=1")
        if not isinstance(info, dict) or not isinstance(kernels, list):
            raise OSError("unexpected answer from the Jupyter REST API")
        last: datetime | None = None
        raw_last = info.get("last_activity")
        if isinstance(raw_last, str):
            # jupyter_server: ISO 8601 in UTC with "Z"; a value we cannot read is reported as
            # unknown (null), which the server never takes for idle.
            with contextlib.suppress(ValidationError):
                last = _AWARE_DATETIME.validate_python(raw_last)
        connections = info.get("connections")
        if isinstance(connections, bool) or not isinstance(connections, int):
            connections = 0
        busy = sum(1 for k in kernels if isinstance(k, dict) and k.get("execution_state") == "busy")
        return SessionActivity(
            session_id=session.record.session_id,
            last_activity=last,
            kernels_busy=min(busy, MAX_INT32),
            connections=min(max(connections, 0), MAX_INT32),
        )

    # --- stop and wipe ------------------------------------------------------------------------

    def _end(self, session: Session, reason: str, *, from_task: bool = False) -> None:
        """Start ending ``session`` (once). ``from_task``: called from its own start/watch task,
        which must not be cancelled by it."""
        if session.ending is not None:
            return
        session.record.state = "stopping"
        self._save()
        task = session.task
        if task is not None and not from_task:
            task.cancel()
        if session.activity is not None:
            session.activity.cancel()
        session.ending = self._spawn(self._finish(session, reason), "session-end")

    async def _finish(self, session: Session, reason: str) -> None:
        sid = session.record.session_id
        task = session.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            done, _ = await asyncio.wait({task}, timeout=UNWIND_TIMEOUT)
            if not done:
                log.error("session %d: its task did not stop within %gs", sid, UNWIND_TIMEOUT)
                session.details.append(
                    f"the session's start did not stop within {UNWIND_TIMEOUT:g}s; wiped regardless"
                )
            elif not task.cancelled():
                task.exception()  # logged by the task itself; retrieved here
        session.details.insert(0, reason)
        receipt = await self._wipe(session.record, session=session)
        self.sessions.pop(session.record.session_id, None)
        self._emit(receipt, keep=True)
        self._save()

    async def _wipe(
        self, record: SessionRecord, *, session: Session | None = None, sweep_user: bool = True
    ) -> SessionReceipt:
        t0 = time.monotonic()
        report = WipeReport(details=list(session.details) if session else [])
        seen: set[tuple[int, float]] = set()
        uid = record.uid if sweep_user else None
        procs = list(record.procs)

        def find() -> list[psutil.Process]:
            found = recorded_processes(procs)
            if uid is not None:
                found += user_processes(uid)
            else:
                found += marked_processes(record.session_id)
            unique = {p.pid: p for p in found}
            return list(unique.values())

        def snapshot() -> None:
            for p in find():
                with contextlib.suppress(psutil.Error):
                    seen.add((p.pid, p.create_time()))

        await asyncio.to_thread(snapshot)
        grace = self.config.session_stop_grace
        if session is not None:
            stops = []
            if session.jupyter is not None:
                stops.append(session.jupyter.stop(grace))
            if session.tunnel is not None:
                stops.append(session.tunnel.close(grace))
            results = await asyncio.gather(*stops, return_exceptions=True)
            if session.jupyter is not None and results and results[0] == "killed":
                report.details.append(f"Jupyter ignored SIGTERM for {grace:g}s; killed")
        survivors = await asyncio.to_thread(kill_all, find, seen)
        await asyncio.to_thread(
            lambda: reap_zombie_children(uid, exclude=[p.pid for p in procs], timeout=1.0)
        )
        if session is not None and session.limits is not None:
            await asyncio.to_thread(session.limits.remove)
        else:
            await asyncio.to_thread(_remove_cgroup, record.session_id)
        ws = Path(record.workspace)
        await asyncio.to_thread(remove_path, ws, report)
        if uid is not None:
            await asyncio.to_thread(sweep_owned, uid, report)
        for name in ("jupyter", "tunnel"):
            with contextlib.suppress(OSError):
                (Path(self.config.state_dir) / f"session-{record.session_id}-{name}.log").unlink()
        # Verify by looking again, from scratch.
        left_procs = survivors if survivors else await asyncio.to_thread(find)
        left_files = await asyncio.to_thread(sweep_owned, uid, None) if uid is not None else []
        ws_left = ws.exists() or ws.is_symlink()
        report.processes_killed = len(seen)
        report.verified = not left_procs and not left_files and not ws_left
        if left_procs:
            report.details.append(
                "processes left: " + ", ".join(str(p.pid) for p in left_procs[:20])
            )
        if left_files:
            report.details.append("files left: " + ", ".join(left_files[:20]))
        if ws_left:
            report.details.append(f"workspace {ws} still exists")
        if uid is not None:
            report.details.append(
                f"scope: every process and temp file of user {record.user} (uid {uid})"
            )
        elif record.uid is None:
            report.details.append("scope: the session's own processes and its workspace")
        report.details.append(f"wipe took {time.monotonic() - t0:.2f}s")
        duration = max(0.0, time.time() - record.started_at) if record.started_at else 0.0
        log.info(
            "session %d wiped: verified=%s files=%d bytes=%d processes=%d",
            record.session_id, report.verified, report.files_removed, report.bytes_removed,
            report.processes_killed,
        )  # fmt: skip
        return SessionReceipt(
            session_id=record.session_id,
            verified=report.verified,
            files_removed=report.files_removed,
            bytes_removed=report.bytes_removed,
            processes_killed=report.processes_killed,
            duration_seconds=duration,
            details=[d[:4000] for d in report.details[:MAX_DETAILS]],
        )

    async def _wipe_unknown(self, session_id: int, reason: str) -> None:
        record, details = self._orphan_record(session_id)
        details.insert(0, f"session unknown to this agent ({reason}); wiped anyway")
        receipt = await self._wipe(record, sweep_user=not self.sessions)
        receipt.details[:0] = details
        if self.sessions:
            receipt.details.append("another session is live: the session user was not swept")
        self._emit(receipt, keep=True)
        self._save()

    def _orphan_record(self, session_id: int) -> tuple[SessionRecord, list[str]]:
        details: list[str] = []
        uid = user = None
        try:
            run_as = resolve_run_as(self.config.session_user)
            uid, user = run_as.uid, run_as.user
        except SessionError as exc:
            details.append(str(exc))
        record = SessionRecord(
            session_id=session_id,
            workspace=str(Path(self.config.workspace_root) / str(session_id)),
            user=user,
            uid=uid,
            started_at=0.0,
        )
        return record, details

    # --- crash safety -------------------------------------------------------------------------

    async def recover(self) -> None:
        """Wipe what sessions left behind when the agent crashed or the machine rebooted. Runs
        before the first ``hello``; the receipts are sent after ``welcome``."""
        if self._recovered:
            return
        self._recovered = True
        records, receipts = self.state.load_all()
        self.pending.extend(receipts)
        for record in records.values():
            log.warning("session %d was live when the agent stopped; wiping it", record.session_id)
            receipt = await self._wipe(record)
            receipt.details.insert(0, "agent restarted: leftovers of this session wiped")
            self.pending.append(receipt)
        root = Path(self.config.workspace_root)
        with contextlib.suppress(OSError):
            for entry in sorted(root.iterdir()):
                if entry.name.isdigit() and int(entry.name) not in records:
                    record, details = self._orphan_record(int(entry.name))
                    receipt = await self._wipe(record)
                    receipt.details[:0] = ["workspace found at agent start; wiped", *details]
                    self.pending.append(receipt)
        if os.geteuid() == 0:
            with contextlib.suppress(SessionError):
                run_as = resolve_run_as(self.config.session_user)
                assert run_as.uid is not None
                leftovers = await asyncio.to_thread(user_processes, run_as.uid)
                if leftovers:
                    log.warning("killing %d leftover processes of %s", len(leftovers), run_as.user)
                    seen: set[tuple[int, float]] = set()
                    uid = run_as.uid
                    await asyncio.to_thread(kill_all, lambda: user_processes(uid), seen)
                    await asyncio.to_thread(sweep_owned, uid, WipeReport())
        self._save()

    async def shutdown(self) -> None:
        """Agent stopping: stop the sessions' programs but keep their records, so the next
        start wipes them and sends the receipts."""
        for session in list(self.sessions.values()):
            if session.task is not None:
                session.task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=UNWIND_TIMEOUT)
            for task in done:
                if not task.cancelled() and (exc := task.exception()) is not None:
                    log.error("session task %s failed: %r", task.get_name(), exc)
            if pending:
                log.error("%d session tasks did not stop within %gs", len(pending), UNWIND_TIMEOUT)
        grace = self.config.session_stop_grace
        stops = []
        for session in self.sessions.values():
            if session.jupyter is not None:
                stops.append(session.jupyter.stop(grace))
            if session.tunnel is not None:
                stops.append(session.tunnel.close(grace))
        await asyncio.gather(*stops, return_exceptions=True)
        self._save()


def _remove_cgroup(session_id: int) -> None:
    cg = CGROUP_ROOT / "nexcompute" / f"session-{session_id}"
    if not cg.is_dir():
        return
    with contextlib.suppress(OSError):
        (cg / "cgroup.kill").write_text("1")
    for _ in range(20):
        try:
            cg.rmdir()
            return
        except OSError:
            time.sleep(0.05)


__all__ = ["ProcRecord", "SessionManager", "SessionRefused"]
