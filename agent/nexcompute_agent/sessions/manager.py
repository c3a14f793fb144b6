"""The session runtime's orchestration: ``session.start`` → account, workspace, sandbox,
Jupyter, tunnel, URL; ``session.stop`` → Jupyter's stop ladder, the sandbox ended, the wipe and
its proof, the receipt. Crash safety through the state file.

The parts, each in its own module:
- :mod:`.accounts`: the pool of session accounts (a fresh uid per session).
- :mod:`.sandbox`: bubblewrap namespaces, cgroup limits, the size-capped workspace.
- :mod:`.jupyter`: Jupyter's command line, environment, readiness, activity, stop ladder.
- :mod:`.wiper`: ending everything of an account and proving it (the receipt's checks).
- :mod:`.teardown`: the end of a session in order (sandbox, cgroup, workspace, account) and
  the receipt.
- :mod:`.tunnel`: how the browser reaches Jupyter.

Message flow (agent side of the protocol):
- ``session.start`` is answered ``reply`` ok at once (accepted; a duplicate start of a live session
  is ok too) or ok=False when the machine already runs another session. Then, from a background
  task: ``session.progress`` for allocated, workspace_ready, jupyter_starting, tunnel_opening
  (cloudflared only); then ``session.ready`` {url} and the ``ready`` step, or
  ``session.failed`` {error, phase "start"}.
- A failed start is wiped at once and followed by ``session.receipt``.
- Jupyter or the tunnel dying after ``ready`` gives ``session.failed`` with phase "running" (the
  session crashed), then a wipe and a receipt: the session is over.
- While it runs: ``session.notice`` when the kernel killed a process of the session for its memory
  limit, or the session hit its tasks limit, or its workspace is full.
- ``session.stop`` is answered ok at once; the receipt follows. A stop for a session this agent
  does not know still removes its workspace and proves the free accounts clean, then sends a
  receipt: the server uses that to demand a wipe of a session it ended while the agent was away.
- ``session.failed``, ``session.ready`` and ``session.receipt`` that cannot be sent (not
  connected) are kept, receipts also in the state file, and sent after the next ``welcome``.
- ``session.activity`` right after ``session.ready`` and then every ``activity_seconds``.
- After an agent restart (upgrade, crash, ``kill -9``): running sessions whose sandbox and
  Jupyter still run are taken back (:meth:`SessionManager.recover`) and listed in ``hello``;
  a new tunnel URL goes out as another ``session.ready``. The others get ``session.failed``
  (phase running, or start if they were starting), are wiped, and are listed in ``hello`` as
  ``ended`` so the server waits for that reason.

One session at a time per machine (the server leases whole machines).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import psutil

from nexcompute_agent.aio import to_thread_settled
from nexcompute_agent.config import keeps_sessions_on_stop
from nexcompute_agent.hostos import sessions_unsupported
from nexcompute_agent.probe import GpuProbe
from nexcompute_agent.protocol import (
    NoticeKind,
    ProgressStep,
    SessionFailed,
    SessionLimits,
    SessionNotice,
    SessionProgress,
    SessionReady,
    SessionReceipt,
    SessionRef,
    SessionStart,
    SessionStop,
)
from nexcompute_agent.sessions import cleanup, sandbox, teardown, wiper
from nexcompute_agent.sessions.accounts import AccountPool, PoolError, pool_names
from nexcompute_agent.sessions.activity import ActivityTracker
from nexcompute_agent.sessions.http import free_port, http_get
from nexcompute_agent.sessions.jupyter import (
    JupyterServer,
    JupyterSpec,
    jupyter_argv,
    make_workspace_dirs,
    rlimits,
    session_env,
    write_server_config,
)
from nexcompute_agent.sessions.process import ManagedProcess, RunAs, SessionError
from nexcompute_agent.sessions.state import ProcRecord, SessionRecord, StateFile
from nexcompute_agent.sessions.tunnel import Tunnel, make_tunnel
from nexcompute_agent.sessions.warm import WarmPool, handover_path
from nexcompute_agent.sessions.wiper import Account, Check, WipeReport

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from pydantic import BaseModel

    from nexcompute_agent.config import AgentConfig

log = logging.getLogger(__name__)

VERSION_CHECK_TIMEOUT = 10.0
WATCH_INTERVAL = 0.25
# A cancelled start/watch task unwinds at its next await; a step in a thread (workspace setup,
# starting Jupyter) is waited for first (to_thread_settled). Past this the wipe goes ahead.
UNWIND_TIMEOUT = 30.0
DISK_FULL_FRACTION = 0.01
SESSION_MARKER = cleanup.SESSION_MARKER


class SessionRefused(Exception):
    """``session.start`` cannot be accepted (answered ``reply`` ok=False)."""


@dataclass
class Session:
    record: SessionRecord
    msg: SessionStart
    account: Account | None = None
    limits: SessionLimits = field(default_factory=SessionLimits)
    cgroups: sandbox.Cgroups | None = None
    workspace: sandbox.Workspace | None = None
    jupyter: JupyterServer | None = None
    tunnel: Tunnel | None = None
    argv: list[str] = field(default_factory=list)  # resolved jupyter_command
    url: str | None = None
    port: int | None = None
    task: asyncio.Task[None] | None = None
    activity: asyncio.Task[None] | None = None
    tracker: ActivityTracker | None = None  # the idle rule's memory (CPU samples)
    ending: asyncio.Task[None] | None = None
    details: list[str] = field(default_factory=list)
    oom_seen: int = 0
    tasks_seen: int = 0
    disk_full_told: bool = False
    processes: set[int] = field(default_factory=set)  # counted before the stop, for the receipt
    warm: bool = False  # a warm sandbox not handed over yet (:mod:`.warm`): nothing is reported


class SessionManager:
    def __init__(self, config: AgentConfig, send: Callable[[BaseModel], bool]) -> None:
        self.config = config
        self._send = send
        self._gpus: GpuProbe | None = None
        self.state = StateFile(config.state_dir)
        self.sessions: dict[int, Session] = {}
        self.pending: list[BaseModel] = []
        self._checked: set[tuple[str, int, int | None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recovered = False
        # Sessions a restarted agent could not take back, wiped before the first hello: told
        # in hello as "ended" (their session.failed and receipt follow after welcome), so the
        # server does not end them as lost before it hears why.
        self.ended_away: dict[int, str] = {}
        self.root = os.name == "posix" and os.geteuid() == 0
        sandbox.set_cgroup_parent(config.session_cgroup_parent)
        self.support = sandbox.detect()
        if config.session_cgroup == "off":
            self.support = dataclasses.replace(self.support, cgroup=None, controllers=())
        _, _, saved_pool = self.state.load_everything()
        names = pool_names(
            config.session_pool_prefix, config.session_pool_size, config.session_user
        )
        self.pool = AccountPool(names, saved_pool)
        self.warm = WarmPool(self, send)
        if self.root:
            cleanup.become_subreaper()

    # --- reporting --------------------------------------------------------------------------

    def live(self) -> list[SessionRef]:
        """The sessions this agent runs, for ``hello`` (mirrors the state file)."""
        refs = [
            SessionRef(session_id=sid, state=s.record.state)
            for sid, s in sorted(self.sessions.items())
        ]
        refs += [
            SessionRef(session_id=sid, state="ended")
            for sid in sorted(self.ended_away)
            if sid not in self.sessions
        ]
        return refs

    def flush(self) -> None:
        """Send what could not be sent while disconnected. Call after ``welcome``."""
        pending, self.pending = self.pending, []
        for msg in pending:
            self._emit(msg, keep=True)
        self.ended_away.clear()  # the server has had the hello; their reports follow
        self._save()

    def _emit(self, msg: BaseModel, *, keep: bool = False) -> None:
        if not self._send(msg) and keep:
            self.pending.append(msg)

    def _progress(self, session: Session, step: ProgressStep, message: str) -> None:
        if session.warm:
            return
        log.info("session %d: %s", session.record.session_id, message)
        self._emit(
            SessionProgress(session_id=session.record.session_id, step=step, message=message)
        )

    def _notice(self, session: Session, kind: NoticeKind, message: str) -> None:
        if session.warm:
            return
        log.warning("session %d: %s", session.record.session_id, message)
        self._emit(SessionNotice(session_id=session.record.session_id, kind=kind, message=message))

    def _save(self) -> None:
        records = {sid: s.record for sid, s in self.sessions.items()}
        warm = getattr(self, "warm", None)
        if warm is not None and warm.sandbox is not None:
            records[warm.sandbox.record.session_id] = warm.sandbox.record
        for sandbox_ in warm.discarding_records() if warm is not None else ():
            records.setdefault(sandbox_.session_id, sandbox_)
        receipts = [m for m in self.pending if isinstance(m, SessionReceipt)]
        try:
            self.state.save(records, receipts, self.pool.as_dict())
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
        if (why := sessions_unsupported()) is not None:
            raise SessionRefused(why)
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
        if (warm := self.warm.take(msg, self._limits(msg))) is not None:
            # Hand the warm sandbox over (warm.py): claimed here, synchronously, so that a
            # second start is refused; the token and door settings follow in its task.
            warm.warm = False
            warm.msg = msg
            warm.url = None  # the warm token's URL: a repeated start gets the session's, later
            record = warm.record
            record.session_id, record.warm, record.state = sid, False, "starting"
            record.started_at = time.time()
            self.sessions[sid] = warm
            self._save()
            warm.task = self._spawn(self.warm.hand_over(warm), f"session-{sid}-handover")
            return {"warm": True}
        record = SessionRecord(
            session_id=sid,
            workspace=str(Path(self.config.workspace_root) / str(sid)),
            user=None,
            uid=None,
            started_at=time.time(),
            sandboxed=self.root,
        )
        session = Session(record=record, msg=msg, limits=self._limits(msg))
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

    def _limits(self, msg: SessionStart) -> SessionLimits:
        """The server's limits, with the agent's defaults for what it left open."""
        cfg = self.config
        given = msg.limits or SessionLimits()
        memory = given.memory_bytes or msg.memory_limit_bytes
        if memory is None and cfg.session_memory_percent > 0:
            memory = int(psutil.virtual_memory().total * cfg.session_memory_percent / 100)
        workspace = given.workspace_bytes
        if workspace is None and cfg.session_workspace_gb > 0:
            workspace = int(cfg.session_workspace_gb * (1 << 30))
        if workspace is not None and cfg.session_workspace_max_gb > 0:
            workspace = min(workspace, int(cfg.session_workspace_max_gb * (1 << 30)))
        return SessionLimits(
            memory_bytes=memory,
            cpu_weight=given.cpu_weight,
            cpu_quota=given.cpu_quota or (cfg.session_cpus or None),
            max_tasks=given.max_tasks or cfg.session_max_processes,
            workspace_bytes=workspace,
        )

    # --- start --------------------------------------------------------------------------------

    async def _start(self, session: Session) -> None:
        sid = session.record.session_id
        try:
            self._progress(session, "allocated", f"session allocated on {socket.gethostname()}")
            if self.warm.discarding:  # a warm sandbox this start did not fit is still going
                await asyncio.gather(*list(self.warm.discarding), return_exceptions=True)
            await self._prepare(session)
            url = await self._launch(session)
        except asyncio.CancelledError:
            raise
        except (SessionError, sandbox.SandboxError, PoolError) as exc:
            await self._fail(session, str(exc))
            return
        except Exception as exc:
            log.exception("session %d: start failed", sid)
            await self._fail(session, f"internal error: {exc!r}")
            return
        session.record.state = "running"
        session.url = session.record.url = url
        if session.cgroups is not None:
            try:  # Jupyter started at the normal weight; from now on the session's own
                session.cgroups.set_cpu_weight(session.limits.cpu_weight)
            except OSError as exc:
                await self._fail(session, f"cannot set the session's CPU weight: {exc}")
                return
        self._save()
        # The URL first: the server handles each frame in turn, and the step after it.
        self._emit(SessionReady(session_id=sid, url=url), keep=True)
        self._progress(session, "ready", "Jupyter Lab is ready")
        session.task = self._spawn(self._watch(session), f"session-{sid}-watch")
        session.activity = self._spawn(self._report_activity(session), f"session-{sid}-activity")

    async def _fail(self, session: Session, error: str, *, crashed: bool = False) -> None:
        sid = session.record.session_id
        log.warning("session %d %s: %s", sid, "crashed" if crashed else "failed", error)
        self._emit(
            SessionFailed(
                session_id=sid, error=error[:4000], phase="running" if crashed else "start"
            ),
            keep=True,
        )
        self._end(session, f"{'crashed' if crashed else 'failed'}: {error}"[:500], from_task=True)

    async def _prepare(self, session: Session) -> None:
        record = session.record
        was_retired = False
        if self.root:
            if self.support.problem is not None:
                raise SessionError(f"this machine cannot sandbox sessions: {self.support.problem}")
            account, was_retired = self.pool.acquire(record.session_id)
            session.account = account
            record.user, record.uid = account.name, account.uid
            self._save()
            run_as = RunAs(user=account.name, uid=account.uid, gid=account.gid)
        else:
            run_as = RunAs()
            session.details.append(
                "agent not root: Jupyter ran as the agent's user, without a sandbox; wipe scope "
                "is the session's processes and workspace only"
            )
            import pwd  # POSIX only (hostos.py)

            record.user = pwd.getpwuid(os.geteuid()).pw_name
        await self._check_and_make_workspace(session, run_as, was_retired)
        if self.root:
            await self._make_cgroups(session)

    async def _check_and_make_workspace(
        self, session: Session, run_as: RunAs, was_retired: bool
    ) -> None:
        """The account's quick checks (a scan of /proc, IPC, keyrings: ~20 ms) beside the
        workspace's making (fallocate, mkfs, mount: ~30 ms), for a start that does not wait
        for both in turn (bench/time_to_jupyter.py). The workspace must not exist before
        (checked first, alone); a check that fails wins over anything the making raised, and
        the session's wipe removes the workspace it made. A retired account's full wipe
        removes every file of its uid, so it runs before the making, not beside it."""
        steps: list[Awaitable[object]] = []  # made only once they will run (no coroutine left)
        if session.account is not None:
            if was_retired:
                await to_thread_settled(self._check_account, session, True)
            else:
                ws = Path(session.record.workspace)
                if ws.exists() or ws.is_symlink():
                    exists = Check("workspace", False, f"{ws} exists before the start")
                    self._refuse_account(session, [exists])
                steps.append(to_thread_settled(self._check_account, session, False))
        steps.append(to_thread_settled(self._make_workspace, session))
        running = [asyncio.ensure_future(step) for step in steps]
        try:
            await asyncio.wait(running)
        except asyncio.CancelledError:  # a stop during the start: all settle, then it goes on
            await asyncio.gather(*running, return_exceptions=True)
            raise
        errors = [step.exception() for step in running]  # all read: none left unread
        for error in errors:
            if error is not None:
                raise error  # the check's first
        # After the checks, not beside them: the first start runs `jupyter --version` as the
        # account (cached after), a process of its uid that they would count.
        session.argv = await to_thread_settled(self._check_jupyter, run_as)
        self._progress(session, "workspace_ready", "your workspace is ready")

    async def _make_cgroups(self, session: Session) -> None:
        session.cgroups = await to_thread_settled(
            sandbox.Cgroups.create, session.record.session_id, session.limits, self.support
        )
        session.details.append(session.cgroups.describe(session.limits))
        session.details.append(f"workspace {session.record.workspace}" + (
            f" capped at {session.limits.workspace_bytes} bytes (loop-mounted ext4)"
            if session.workspace is not None and session.workspace.image is not None
            else " (no size cap on this host)"
        ))  # fmt: skip

    def _check_account(self, session: Session, was_retired: bool) -> None:
        """Before a start: the account must own nothing. A retired account (its last wipe did
        not verify) is wiped and proved in full first; an account that still holds something
        is refused, retired, and the session's receipt can never be verified (quarantine)."""
        account = session.account
        assert account is not None
        if was_retired:
            report = WipeReport()
            wiper.wipe_account(account, report)
            failed = [c for c in report.checks if not c.ok]
        else:
            failed = [c for c in teardown.quick_checks(account) if not c.ok]
        if failed:
            self._refuse_account(session, failed)

    def _refuse_account(self, session: Session, failed: list[Check]) -> NoReturn:
        account = session.account
        assert account is not None
        why = "; ".join(f"{c.name}: {c.detail}" for c in failed)[:1000]
        session.record.poisoned = f"account {account.name} was not clean before the start: {why}"
        self._save()
        raise SessionError(
            f"session account {account.name} still holds something of an earlier session "
            f"({why}); the machine is taken out of service for staff to check"
        )

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
        return direct_subcommand([os.path.abspath(exe), *cmd[1:]])

    def _check_jupyter(self, run_as: RunAs) -> list[str]:
        """The resolved Jupyter command, after checking a session account can run it. Pool
        accounts have no supplementary groups, so one check stands for all of them."""
        argv = self._resolve_jupyter()
        try:
            st = os.stat(argv[0])
        except OSError as exc:
            raise SessionError(f"cannot stat {argv[0]}: {exc.strerror}") from None
        key = (argv[0], st.st_mtime_ns, None if self.root else run_as.uid)
        if key in self._checked:
            return argv
        who = run_as.user or "the agent's user"
        env = {"PATH": f"{os.path.dirname(argv[0])}:/usr/local/bin:/usr/bin:/bin",
               "LANG": "C.UTF-8", "HOME": "/nonexistent"}  # fmt: skip
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

    def _make_workspace(self, session: Session) -> Path:
        ws = Path(session.record.workspace)
        account = session.account
        if account is None:  # unprivileged agent: a plain folder of its own
            if ws.exists() or ws.is_symlink():
                report = WipeReport()
                wiper.remove_tree(ws, report)
                session.details.append(f"removed a stale workspace ({report.files_removed} files)")
            ws.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
            ws.mkdir(mode=0o700)
            make_workspace_dirs(ws, None, None)
            return ws
        session.workspace = sandbox.Workspace.create(
            ws,
            uid=account.uid,
            gid=account.gid,
            size_bytes=session.limits.workspace_bytes,
            support=self.support,
        )
        make_workspace_dirs(ws, account.uid, account.gid)
        return ws

    def _log_path(self, record: SessionRecord, name: str) -> Path:
        """A sandbox's ``jupyter`` or ``tunnel`` log, named by the id it was built under (a
        warm sandbox's keeps its warm id after the hand-over, as its folder and cgroup do)."""
        return (
            Path(self.config.state_dir)
            / f"session-{record.cgroup_id or record.session_id}-{name}.log"
        )

    async def _launch(self, session: Session) -> str:
        cfg = self.config
        sid = session.record.session_id
        Path(cfg.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        tunnel = make_tunnel(cfg, self._log_path(session.record, "tunnel"), cfg.session_stop_grace)
        tunnel.on_started = lambda proc: self._add_proc(session, proc)
        session.tunnel = tunnel
        port = tunnel.fixed_port or free_port()
        session.port = port
        record = session.record
        record.port, record.token, record.tunnel_kind = port, session.msg.token, tunnel.kind
        record.limits = session.limits.model_dump(mode="json")
        access = session.msg.access
        if access is not None and tunnel.kind != "cloudflared-named":
            raise SessionError(
                "this lab puts Cloudflare Access in front of its sessions, which only a "
                f"cloudflared-named tunnel can carry; this machine's tunnel is {tunnel.kind}"
            )
        certfile = keyfile = None
        if tunnel.tls is not None:
            certfile, keyfile = await to_thread_settled(self._copy_tls, session, tunnel.tls)
            record.certfile, record.keyfile = certfile, keyfile
        spec = JupyterSpec(
            command=session.argv,
            workspace=session.record.workspace,
            port=port,
            bind_host=tunnel.bind_host,
            token=session.msg.token,
            terminals=session.msg.terminals,
            remote=tunnel.kind != "direct" or tunnel.bind_host != "127.0.0.1",
            trust_xheaders=tunnel.kind != "direct",
            user=session.record.user or "session",
            shell="/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh",
            session_id=sid,
            nexus_url=session.msg.nexus_url or cfg.server,
            access=access,
            capability=session.msg.capability,
            certfile=certfile,
            keyfile=keyfile,
            handover_file=handover_path(session.record.workspace) if session.warm else "",
        )
        account = session.account
        await to_thread_settled(
            write_server_config,
            spec,
            account.uid if account else None,
            account.gid if account else None,
        )
        jupyter = self._jupyter_process(session, spec, self._log_path(session.record, "jupyter"))
        self._progress(session, "jupyter_starting", "starting Jupyter Lab")
        try:
            await to_thread_settled(jupyter.start)
        except asyncio.CancelledError:
            if jupyter.process.popen is not None:  # started as the stop came: the wipe ends it
                session.jupyter = jupyter
                self._add_proc(session, jupyter.process)
            raise
        except OSError as exc:
            raise SessionError(f"cannot start Jupyter: {exc.strerror or exc}") from None
        session.jupyter = jupyter
        self._add_proc(session, jupyter.process)
        if jupyter.sandboxed:
            # The sandbox's init by pid and start time, in the state file before Jupyter is
            # even ready: an agent killed now finds the namespace to end.
            for _ in range(200):
                jupyter.find_init()
                if jupyter.init_pid is not None or jupyter.poll() is not None:
                    break
                await asyncio.sleep(0.005)
            session.record.init_pid = jupyter.init_pid
            session.record.init_create_time = jupyter.init_create_time
            self._save()
        await jupyter.wait_ready(cfg.jupyter_start_timeout)
        if not tunnel.opens_at_once:
            self._progress(session, "tunnel_opening", f"opening the {tunnel.kind} tunnel")
        base = await tunnel.open(port)
        record.tunnel_metrics_port = getattr(tunnel, "metrics_port", None) or None
        return f"{base}/lab?token={session.msg.token}"

    def _copy_tls(self, session: Session, tls: tuple[str, str]) -> tuple[str, str]:
        """The configured certificate and key, copied 0600 for the session account into its
        workspace: Jupyter serves TLS itself and sees only its sandbox. The key is therefore
        readable by the session's own code (docs/security.md: use a certificate made for the
        sessions of this machine, nothing shared)."""
        folder = Path(session.record.workspace) / ".jupyter" / "tls"
        folder.mkdir(mode=0o700, exist_ok=True)
        account = session.account
        out = []
        for src, name in zip(tls, ("cert.pem", "key.pem"), strict=True):
            try:
                data = Path(src).read_bytes()
            except OSError as exc:
                raise SessionError(f"cannot read tunnel TLS file {src}: {exc.strerror}") from None
            dest = folder / name
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                if account is not None:
                    os.fchown(fd, account.uid, account.gid)
                os.write(fd, data)
            finally:
                os.close(fd)
            out.append(str(dest))
        if account is not None:
            os.chown(folder, account.uid, account.gid, follow_symlinks=False)
        return out[0], out[1]

    def _jupyter_process(
        self, session: Session, spec: JupyterSpec, log_path: Path
    ) -> JupyterServer:
        argv = jupyter_argv(spec)
        limits = session.limits
        if session.account is None:  # unprivileged: Jupyter as ourselves, marked
            env = session_env(spec, marker=(SESSION_MARKER, str(session.record.session_id)))
            proc = ManagedProcess(
                "jupyter", argv, env=env, cwd=spec.workspace,
                preexec=rlimits(max_tasks=None, memory_bytes=limits.memory_bytes),
                log_path=log_path,
            )  # fmt: skip
            return JupyterServer(spec, proc, sandboxed=False)
        account = session.account
        cgroups = session.cgroups
        controllers = self.support.controllers if cgroups and cgroups.paths else ()
        tmpfs = sandbox.DEFAULT_TMPFS_BYTES
        if limits.memory_bytes:
            tmpfs = max(64 << 20, min(tmpfs, limits.memory_bytes // 2))
        box = sandbox.SandboxSpec(
            workspace=Path(spec.workspace),
            uid=account.uid,
            gid=account.gid,
            tmpfs_bytes=tmpfs,
            hide=(str(Path(self.config.workspace_root)), str(Path(self.config.state_dir))),
            show=(_env_root(spec.command[0]),),
        )
        limit = rlimits(
            max_tasks=None if "pids" in controllers else limits.max_tasks,
            memory_bytes=None if "memory" in controllers else limits.memory_bytes,
        )
        join = cgroups.join() if cgroups is not None else None

        wiper.get_libc()  # loaded here: never dlopen in a forked child of a threaded process

        def preexec() -> None:
            if join is not None:
                join()
            limit()
            wiper.join_new_session_keyring()

        proc = ManagedProcess(
            "sandbox",
            sandbox.bwrap_argv(self.support, box, argv),
            env=session_env(spec),
            cwd="/",
            preexec=preexec,
            log_path=log_path,
        )
        return JupyterServer(spec, proc, sandboxed=True)

    def _add_proc(self, session: Session, proc: ManagedProcess) -> None:
        self._record_proc(session, proc)
        self._save()

    def _record_proc(self, session: Session, proc: ManagedProcess) -> None:
        session.record.procs.append(proc.record())
        if (keeper := proc.keeper_record()) is not None:
            session.record.procs.append(keeper)

    async def _watch(self, session: Session) -> None:
        """After ready: a Jupyter or tunnel that dies ends the session (crashed); limits hit
        are told to the student."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            self._check_limits(session)
            error = None
            if session.jupyter is not None and (why := session.jupyter.exit_text()):
                error = why
            elif session.tunnel is not None and (why := session.tunnel.exited()):
                error = f"the tunnel ended unexpectedly: {why}"
            if error is not None:
                await self._fail(session, error, crashed=True)
                return

    def _check_limits(self, session: Session) -> None:
        cg = session.cgroups
        limits = session.limits
        if cg is not None and cg.paths:
            if (n := cg.oom_kills()) > session.oom_seen:
                session.oom_seen = n
                gib = (limits.memory_bytes or 0) / (1 << 30)
                self._notice(
                    session,
                    "memory_limit",
                    f"A process of your session was stopped: the session reached its memory "
                    f"limit of {gib:.1f} GB. Free memory (restart the kernel) or use less data.",
                )
            if (n := cg.tasks_limit_hits()) > session.tasks_seen:
                session.tasks_seen = n
                self._notice(
                    session,
                    "tasks_limit",
                    f"Your session reached its limit of {limits.max_tasks} processes and "
                    "threads; new ones are refused until some end.",
                )
        ws = session.workspace
        if ws is not None and ws.mounted and not session.disk_full_told:
            with contextlib.suppress(OSError):
                st = os.statvfs(ws.path)
                if st.f_bavail <= st.f_blocks * DISK_FULL_FRACTION:
                    session.disk_full_told = True
                    gib = (limits.workspace_bytes or 0) / (1 << 30)
                    self._notice(
                        session,
                        "disk_full",
                        f"Your workspace is full ({gib:.1f} GB). Delete files to keep working.",
                    )

    # --- activity ----------------------------------------------------------------------------

    def _gpu_busy_pids(self) -> set[int] | None:
        """Pids on a GPU busy above ``idle_gpu_percent`` (None without NVML or nvidia-smi).
        The probe is made once, on the first report (NVML's init is not free). Blocks."""
        if self._gpus is None:
            self._gpus = GpuProbe(self.config.nvidia_smi)
        return self._gpus.busy_pids(self.config.idle_gpu_percent)

    async def _report_activity(self, session: Session) -> None:
        """Send ``session.activity`` now and then every ``activity_seconds`` until the session
        ends (``_end`` cancels this task). Never ends the session itself. What counts as
        activity: :mod:`.activity`."""
        sid = session.record.session_id
        if session.tracker is None:
            # A session taken back after an agent restart starts a new CPU window; its start
            # (the floor of its activity) is the one recorded.
            session.tracker = ActivityTracker(
                started_at=session.record.started_at,
                cpu_percent=self.config.idle_cpu_percent,
                cpu_window=self.config.idle_cpu_window_seconds,
            )
        while session.ending is None:
            try:
                assert session.jupyter is not None
                msg = await session.jupyter.activity(sid, session.tracker, self._gpu_busy_pids)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed poll is skipped, whatever the reason
                log.warning("session %d: cannot read the session's activity: %s", sid, exc)
            else:
                if session.ending is None and not self._send(msg):
                    # Not connected (a session taken back before the first welcome): try
                    # again soon rather than a whole period later.
                    await asyncio.sleep(min(1.0, self.config.activity_seconds))
                    continue
            await asyncio.sleep(self.config.activity_seconds)

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
        # What the stop will end (for the receipt): everything we started, with descendants.
        session.processes = {p.pid for p in cleanup.recorded_processes(session.record.procs)}
        session.processes |= set(session.cgroups.procs() if session.cgroups else ())
        grace = self.config.session_stop_grace
        if session.jupyter is not None and self.config.session_save_wait > 0:
            # The open Lab saves every document first (bounded; no wait without a Lab tab).
            saved = await session.jupyter.announce_stop(self.config.session_save_wait)
            if saved is not None:
                session.details.append(saved)
        stops = []
        if session.jupyter is not None:
            stops.append(session.jupyter.stop(grace))
        if session.tunnel is not None:
            stops.append(session.tunnel.close(grace))
        results = await asyncio.gather(*stops, return_exceptions=True)
        if session.jupyter is not None and results and results[0] == "killed":
            session.details.append(
                f"Jupyter ignored SIGINT and SIGTERM for {grace:g}s each; killed"
            )
        receipt = await self._wipe(session.record, session=session)
        self.sessions.pop(sid, None)
        self._emit(receipt, keep=True)
        self._save()

    async def _wipe(
        self, record: SessionRecord, *, session: Session | None = None
    ) -> SessionReceipt:
        """End and remove everything of the session, prove it, and make the receipt. Never
        raises: whatever goes wrong makes the receipt unverified."""
        t0 = time.monotonic()
        report = WipeReport(details=list(session.details) if session else [])
        try:
            if record.sandboxed and record.user is not None:
                init: tuple[int | None, float | None] = (None, None)
                if session is not None and session.jupyter is not None:
                    session.jupyter.find_init()
                    init = (session.jupyter.init_pid, session.jupyter.init_create_time)
                await asyncio.to_thread(
                    functools.partial(
                        teardown.wipe_sandboxed,
                        record,
                        report,
                        cgroups=session.cgroups if session else None,
                        workspace=session.workspace if session else None,
                        counted=session.processes if session else None,
                        init=init,
                    )
                )
            else:
                await asyncio.to_thread(teardown.wipe_unprivileged, record, report)
        except Exception as exc:  # never let a wipe stop the agent
            log.exception("session %d: the wipe failed", record.session_id)
            report.checks.append(Check("wipe", False, f"the wipe stopped with an error: {exc!r}"))
        if record.poisoned:
            report.checks.insert(0, Check("account_clean_before_start", False, record.poisoned))
        verified = report.verified
        if record.sandboxed and record.user is not None:
            self.pool.release(record.user, verified=verified, why=teardown.failed_text(report))
        for name in ("jupyter", "tunnel"):
            with contextlib.suppress(OSError):
                self._log_path(record, name).unlink()
        failed = [c for c in report.checks if not c.ok]
        for check in failed:
            report.details.append(f"check failed: {check.name}: {check.detail}")
        report.details.append(f"wipe took {time.monotonic() - t0:.2f}s")
        duration = max(0.0, time.time() - record.started_at) if record.started_at else 0.0
        log.info(
            "session %d wiped: verified=%s files=%d bytes=%d processes=%d",
            record.session_id, verified, report.files_removed, report.bytes_removed,
            report.processes_killed,
        )  # fmt: skip
        return teardown.receipt(
            record, report, duration, account=record.user if record.sandboxed else None
        )

    async def _wipe_unknown(self, session_id: int, reason: str) -> None:
        record = SessionRecord(
            session_id=session_id,
            workspace=str(Path(self.config.workspace_root) / str(session_id)),
            user=None,
            uid=None,
            started_at=0.0,
            sandboxed=self.root,
        )
        receipt = await self._wipe_orphan(record)
        receipt.details.insert(0, f"session unknown to this agent ({reason}); wiped anyway")
        self._emit(receipt, keep=True)
        self._save()

    async def _wipe_orphan(self, record: SessionRecord) -> SessionReceipt:
        """A session this agent has no record of (a stop after a lost start, or leftovers found
        at start-up): its workspace, cgroup and any free account that is not clean."""
        if not record.sandboxed:
            return await self._wipe(record)
        t0 = time.monotonic()
        report = WipeReport()

        # The free accounts are checked (and wiped if need be) in a thread: held out of the pool
        # meanwhile, so a start that comes now cannot be handed one of them.
        held = self.pool.hold_free()
        results: dict[str, tuple[bool, str]] = {}
        try:
            await asyncio.to_thread(teardown.wipe_orphan, record, report, held, results)
        except Exception as exc:
            log.exception("session %d: the wipe failed", record.session_id)
            report.checks.append(Check("wipe", False, f"the wipe stopped with an error: {exc!r}"))
        finally:
            for name in held:
                ok, why = results.get(name, (False, "the check did not finish"))
                self.pool.release(name, verified=ok, why=why)
        report.details.append(f"wipe took {time.monotonic() - t0:.2f}s")
        return teardown.receipt(record, report, 0.0, account=None)

    # --- crash safety -------------------------------------------------------------------------

    async def recover(self) -> None:
        """After an agent restart: take back every running session that still runs (see
        :meth:`_adopt`); end and wipe the rest, and what sessions left when the machine
        rebooted (their sandboxes found by init pid and start time, their cgroups, workspaces
        and accounts). Runs before the first ``hello``, which lists the sessions taken back (and
        the wiped ones as ``ended``); failures and receipts are sent after ``welcome``. Nothing
        here may stop the agent: a failing wipe becomes an unverified receipt."""
        if self._recovered:
            return
        self._recovered = True
        records, receipts, _ = self.state.load_everything()
        self.pending.extend(receipts)
        adopted: list[Session] = []
        for record in records.values():
            sid = record.session_id
            if record.warm:
                receipt = await self._wipe(record)
                self.warm.add_receipt(
                    receipt.model_dump(exclude={"type", "session_id"}),
                    "agent restarted: warm sandbox wiped",
                )
                continue
            if record.state == "running":
                try:
                    session, why = await self._adopt(record)
                except Exception as exc:  # never let a take-back stop the agent
                    log.exception("session %d: taking it back failed", sid)
                    session, why = None, f"taking it back failed: {exc!r}"
                if session is not None:
                    log.info("session %d taken back after the agent restart", sid)
                    adopted.append(session)
                    continue
                log.warning("session %d cannot be taken back (%s); wiping it", sid, why)
                self._emit(
                    SessionFailed(
                        session_id=sid, phase="running",
                        error=f"Jupyter did not survive the agent restart: {why}"[:4000],
                    ),
                    keep=True,
                )  # fmt: skip
                first = f"agent restarted: {why}; wiped"
            elif record.state == "starting":
                log.warning("session %d was starting when the agent stopped; wiping it", sid)
                self._emit(
                    SessionFailed(
                        session_id=sid, phase="start",
                        error="the agent restarted while the session was starting",
                    ),
                    keep=True,
                )  # fmt: skip
                first = "agent restarted during the start: leftovers of this session wiped"
            else:
                log.warning("session %d was stopping when the agent stopped; wiping it", sid)
                first = "agent restarted: leftovers of this session wiped"
            self.ended_away[sid] = record.state
            receipt = await self._wipe(record)
            receipt.details.insert(0, first)
            self.pending.append(receipt)
        for session in adopted:
            sid = session.record.session_id
            self.sessions[sid] = session
            session.task = self._spawn(self._watch(session), f"session-{sid}-watch")
            session.activity = self._spawn(
                self._report_activity(session), f"session-{sid}-activity"
            )
        records = {sid: r for sid, r in records.items() if sid not in self.sessions and not r.warm}
        # Warm ids and those of handed-over sessions (their folder and cgroup keep the warm id).
        known = {
            r.cgroup_id for r in (*records.values(), *(s.record for s in adopted)) if r.cgroup_id
        }
        leftovers: set[int] = set()
        with contextlib.suppress(OSError):
            for entry in Path(self.config.workspace_root).iterdir():
                if re.fullmatch(r"[0-9]{1,15}", entry.name) and int(entry.name) > 0:
                    leftovers.add(int(entry.name))
        if self.root:
            with contextlib.suppress(OSError):
                leftovers.update(sandbox.leftover_cgroup_sessions())
        for sid in sorted(leftovers - set(records) - set(self.sessions) - known):
            record = SessionRecord(
                session_id=sid,
                workspace=str(Path(self.config.workspace_root) / str(sid)),
                user=None,
                uid=None,
                started_at=0.0,
                sandboxed=self.root,
            )
            receipt = await self._wipe_orphan(record)
            receipt.details.insert(0, "leftovers found at agent start; wiped")
            self.pending.append(receipt)
        for slot in self.pool.slots.values():
            if slot.state == "busy" and slot.session_id not in set(records) | set(self.sessions):
                slot.state, slot.session_id = "free", None  # its session's wipe ran above
        if self.root:  # the accounts just wiped and proved above need no second look
            busy = {s.record.user for s in self.sessions.values()}
            await self._check_free_accounts(
                skip={r.user for r in records.values() if r.user} | {u for u in busy if u}
            )
        self._save()

    async def _adopt(self, record: SessionRecord) -> tuple[Session | None, str]:
        """Take back a session that was running when the agent stopped (JupyterHub's spawner
        ``load_state`` + ``poll``): its sandbox by the recorded pids *and* start times (outer
        bwrap, its init inside the PID namespace, the init in the session's cgroup), Jupyter
        answering on its port with the session's token, then its tunnel (taken back, or opened
        again). Returns the session, or None and why it cannot be taken back."""
        sid = record.session_id
        if record.port is None or not record.token:
            return None, "the state file does not say where its Jupyter listens"
        log_path = self._log_path(record, "jupyter")
        role = "sandbox" if record.sandboxed else "jupyter"
        rec = next((p for p in reversed(record.procs) if p.role == role), None)
        proc = (
            ManagedProcess.adopt(role, rec.pid, rec.create_time, log_path=log_path)
            if rec is not None
            else None
        )
        if proc is None:
            return None, "Jupyter ended while the agent was not running"
        if record.sandboxed:
            init = sandbox.sandbox_init(proc.pid)
            try:
                same = (
                    init is not None
                    and init.pid == record.init_pid
                    and record.init_create_time is not None
                    and abs(init.create_time() - record.init_create_time) <= 0.05
                )
            except psutil.Error:
                same = False
            if not same:
                return None, "the sandbox's init is not the one recorded"
            cgroups = sandbox.Cgroups.existing(record.cgroup_id or sid)
            if cgroups.paths and record.init_pid not in cgroups.procs():
                return None, "the sandbox is not in the session's cgroup"
        else:
            try:
                env = psutil.Process(proc.pid).environ()
            except psutil.Error:
                env = {}
            if env.get(SESSION_MARKER) != str(sid):
                return None, "the recorded process is not this session's Jupyter"
        token = record.token
        limits = SessionLimits.model_validate(record.limits) if record.limits else SessionLimits()
        msg = SessionStart(
            msgid="restored", session_id=sid, token=token, duration_seconds=1, limits=limits
        )
        spec = JupyterSpec(
            command=[], workspace=record.workspace, port=record.port, bind_host="127.0.0.1",
            token=token, terminals=True, remote=False, trust_xheaders=False,
            user=record.user or "session", shell="",
            certfile=record.certfile, keyfile=record.keyfile,
        )  # fmt: skip
        jupyter = JupyterServer(spec, proc, sandboxed=record.sandboxed)
        jupyter.init_pid, jupyter.init_create_time = record.init_pid, record.init_create_time
        # Ours, and alive: it answers on its port with this session's token (a recycled port
        # held by another program does not).
        try:
            status, _ = await http_get(
                "127.0.0.1", record.port, "/api/status",
                headers={"Authorization": f"token {token}"}, timeout=5.0,
                tls=record.certfile is not None,
            )  # fmt: skip
        except (OSError, asyncio.TimeoutError, TimeoutError):
            status = 0
        if status != 200:
            return None, f"Jupyter does not answer on port {record.port}"
        session = Session(record=record, msg=msg, limits=limits, jupyter=jupyter)
        session.port = record.port
        if record.sandboxed:
            session.cgroups = sandbox.Cgroups.existing(record.cgroup_id or sid)
            session.workspace = sandbox.Workspace.existing(Path(record.workspace))
        try:
            url = await self._adopt_tunnel(session)
        except SessionError as exc:
            session.tunnel = None
            return None, f"its tunnel could not be opened again: {exc}"
        session.url = url
        if url != record.url:
            # A quick tunnel opened again has a new name: the server must give out the new URL.
            record.url = url
            self._emit(SessionReady(session_id=sid, url=url), keep=True)
        session.details.append("taken back after an agent restart")
        return session, ""

    async def _adopt_tunnel(self, session: Session) -> str:
        """The session's tunnel after an agent restart: the recorded one if it still runs and
        is registered, else (it died with the agent, or on its own) a new one."""
        record = session.record
        assert record.port is not None
        sid = record.session_id
        log_path = self._log_path(record, "tunnel")
        tunnel = make_tunnel(self.config, log_path, self.config.session_stop_grace)
        # Recorded, not saved: the state file is written once recovery has been through every
        # record (a save now would drop the records not yet looked at).
        tunnel.on_started = lambda proc: self._record_proc(session, proc)
        session.tunnel = tunnel
        rec = next((p for p in reversed(record.procs) if p.role == "tunnel"), None)
        base = await tunnel.adopt(record.port, rec, record.tunnel_metrics_port)
        if base is None:
            # A remnant that runs but does not serve: end it (pid and start time) first.
            for proc in cleanup.recorded_processes([rec] if rec else []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            log.info("session %d: opening its %s tunnel again", sid, tunnel.kind)
            base = await tunnel.open(record.port)
            record.tunnel_metrics_port = getattr(tunnel, "metrics_port", None) or None
        return f"{base}/lab?token={record.token}"

    async def _check_free_accounts(self, *, skip: set[str]) -> None:
        """At start-up: a free account that holds anything is wiped; retired if that fails."""
        held = self.pool.hold_free(skip=skip)
        results: dict[str, tuple[bool, str]] = {}
        try:
            await asyncio.to_thread(teardown.check_accounts, held, WipeReport(), results)
        except Exception:
            log.exception("checking the session accounts failed")
        finally:
            for name in held:
                ok, why = results.get(name, (False, "the check did not finish"))
                self.pool.release(name, verified=ok, why=why)

    async def shutdown(self) -> None:
        """Agent stopping. With ``keep_sessions_on_stop`` (an upgrade, ``systemctl restart``) a
        running session keeps running: its record stays and the next agent takes it back.
        Everything else has its programs stopped; the next agent wipes it from its record."""
        keep = {
            sid for sid, s in self.sessions.items()
            if s.record.state == "running" and s.ending is None
        } if keeps_sessions_on_stop(self.config) else set()  # fmt: skip
        for sid, session in self.sessions.items():
            if session.task is not None:
                session.task.cancel()
            if sid in keep and session.activity is not None:
                session.activity.cancel()
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
        warm = self.warm.sandbox
        if warm is not None:  # its record stays: the next agent wipes it (warm.receipt)
            if warm.jupyter is not None:
                stops.append(warm.jupyter.stop(grace))
            if warm.tunnel is not None:
                stops.append(warm.tunnel.close(grace))
        for sid, session in self.sessions.items():
            if sid in keep:
                log.info("session %d keeps running; the next agent takes it back", sid)
                continue
            if session.jupyter is not None:
                stops.append(session.jupyter.stop(grace))
            if session.tunnel is not None:
                stops.append(session.tunnel.close(grace))
        await asyncio.gather(*stops, return_exceptions=True)
        self._save()


def direct_subcommand(argv: list[str]) -> list[str]:
    """``…/jupyter lab …`` → ``…/jupyter-lab …``: what Jupyter's dispatcher (jupyter_core's
    ``jupyter`` command) would exec itself, found beside it, without the dispatcher's own
    Python start-up first (about 65 ms of every session's start; bench/time_to_jupyter.py).
    Anything else is left as configured."""
    if len(argv) < 2 or os.path.basename(argv[0]) != "jupyter" or not argv[1].isidentifier():
        return argv
    # Where the dispatcher looks first: beside the real file (a symlinked `jupyter`), then
    # beside the link.
    for folder in dict.fromkeys(
        (os.path.dirname(os.path.realpath(argv[0])), os.path.dirname(argv[0]))
    ):
        sub = os.path.join(folder, f"jupyter-{argv[1]}")
        if os.path.isfile(sub) and os.access(sub, os.X_OK):
            return [sub, *argv[2:]]
    return argv


def _env_root(executable: str) -> str:
    """The environment that holds Jupyter (``…/bin/jupyter`` → ``…``), made visible in the
    sandbox even where it lives under a folder the sandbox replaces (e.g. /var/tmp)."""
    return str(Path(executable).parent.parent)


__all__ = ["ProcRecord", "SessionManager", "SessionRefused"]
