"""Warm sandboxes: one session sandbox kept ready on a free machine, handed over in
milliseconds when a session is allocated to it (docs/sandbox.md, "Warm sandboxes").

A warm sandbox is built exactly as a session's (:meth:`SessionManager._prepare` and
:meth:`SessionManager._launch`): a fresh pool account, its workspace and cgroup, Jupyter started
in the sandbox from the session environment and answering, the tunnel open. It is made under a
*warm id* (at or above :data:`WARM_BASE`, far above any id a server hands out) with a random
token of the agent's own, and Jupyter's identity provider watches a hand-over file.

Hand-over (``session.start`` with the limits and terminals it was built with): the agent writes
the session's token, id, door settings and capability into the hand-over file (0600, the
session account's, renamed into place), checks that Jupyter answers the new token, and sends
``session.ready``. The warm token, and any cookie issued for it, stop working at that moment
(identity.py); the Lab extension takes the session's id and capability from the same file.

Discard: a warm sandbox never handed over is stopped and wiped in full, with the proof, and a
``warm.receipt`` goes to the server when the server turns warm pools off for this machine
(``warm.set`` enabled false: lab closed, lab's warm pool off, machine not free), the owner is
present, a session starts that it does not fit, the settings change, or it is older than
``max_age_seconds``. Nothing is kept while the owner is present or a session runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from nexcompute_agent.protocol import (
    SessionLimits,
    SessionReady,
    SessionStart,
    WarmReceipt,
    WarmSet,
)
from nexcompute_agent.sessions.state import SessionRecord

if TYPE_CHECKING:
    from collections.abc import Callable

    from nexcompute_agent.sessions.manager import Session, SessionManager

log = logging.getLogger(__name__)

WARM_BASE = 900_000_000_000_000
"""Warm ids start here: 15 digits (a workspace folder name the start-up sweep knows), far above
the ids of any server's sessions table."""
HANDOVER_FILE = "nexcompute_handover.json"  # in the workspace's .jupyter folder
TICK = 0.5  # how often the pool looks at what it should keep
HANDOVER_TIMEOUT = 5.0
BUILD_RETRY_SECONDS = 30.0  # a build that failed is not tried again sooner
CONFIRM_SECONDS = 30.0  # after a lost connection, how long a warm sandbox waits for warm.set


def is_warm_id(session_id: int) -> bool:
    return session_id >= WARM_BASE


class WarmPool:
    """At most one warm sandbox for a :class:`SessionManager`. ``run()`` keeps it (a task the
    agent starts); ``configure`` applies the server's ``warm.set``; ``take`` hands it over."""

    def __init__(self, manager: SessionManager, send: Callable[[Any], bool]) -> None:
        self.m = manager
        self._send = send
        self.settings: WarmSet | None = None
        self.owner_present = False
        self.sandbox: Session | None = None
        self.ready_at: float | None = None
        self.building: asyncio.Task[None] | None = None
        self.discarding: set[asyncio.Task[None]] = set()
        self._discarded: list[Session] = []  # in the state file until their wipe is done
        self.receipts: list[WarmReceipt] = []  # sent once a server that knows them says warm.set
        self.server_knows = False  # this connection's server sent warm.set
        self.lost_at = 0.0  # monotonic time the last connection was lost
        self.on_change: Callable[[], None] | None = None  # the agent beats at once on a change
        self.last_reason = ""
        self.retry_at = 0.0  # after a failed build: not before (monotonic)

    # --- inputs -------------------------------------------------------------------------------

    def configure(self, msg: WarmSet) -> dict[str, Any]:
        old = self.settings
        self.settings = msg
        self.server_knows = True
        if self.sandbox is not None and old is not None and msg.enabled and (
            msg.limits != old.limits or msg.terminals != old.terminals
            or msg.nexus_url != old.nexus_url
        ):  # fmt: skip
            self.discard("the warm pool's settings changed")
        self.flush()
        self._tick()
        return {"warm": self.ready}

    def connection_lost(self) -> None:
        """A new connection's server may be older: no warm fields until it says warm.set. The
        sandbox itself is kept for :data:`CONFIRM_SECONDS` (the same server usually comes back
        and says warm.set again); unconfirmed past that, it is wiped (the lab may have closed
        meanwhile, and a server says nothing when there is nothing to keep)."""
        if self.server_knows:
            self.lost_at = time.monotonic()
        self.server_knows = False

    def flush(self) -> None:
        if not self.server_knows:
            return
        pending, self.receipts = self.receipts, []
        for receipt in pending:
            if not self._send(receipt):
                self.receipts.append(receipt)

    def discarding_records(self) -> list[SessionRecord]:
        return [s.record for s in self._discarded]

    @property
    def ready(self) -> bool:
        return self.sandbox is not None and self.ready_at is not None

    def status(self) -> bool | None:
        """For ``heartbeat.warm``: None when this connection's server does not know warm pools."""
        return self.ready if self.server_knows else None

    # --- the keeper ---------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:  # the keeper never dies
                log.exception("warm pool: tick failed")
            await asyncio.sleep(TICK)

    def _wanted(self) -> tuple[bool, str]:
        s = self.settings
        if s is None:
            return False, "the server has not asked for a warm sandbox"
        if not s.enabled:
            return False, s.reason or "the server turned the warm pool off"
        if not self.server_knows and time.monotonic() - self.lost_at > CONFIRM_SECONDS:
            return False, "no server has confirmed the warm pool since the connection was lost"
        if self.owner_present:
            return False, "the owner is present"
        if self.m.sessions:
            return False, "a session runs"
        if not self.m.root:
            return False, "warm sandboxes need a root agent (pool accounts)"
        return True, ""

    def _tick(self) -> None:
        want, why = self._wanted()
        sb = self.sandbox
        if sb is not None and not want:
            self.discard(why)
        elif sb is not None and self.ready_at is not None and sb.jupyter is not None and (
            exited := sb.jupyter.exit_text() or (sb.tunnel.exited() if sb.tunnel else None)
        ):  # fmt: skip
            self.discard(f"it ended by itself: {exited}"[:200])
        elif (
            sb is not None and self.ready_at is not None and self.settings is not None
            and time.time() - self.ready_at > self.settings.max_age_seconds
        ):  # fmt: skip
            self.discard(f"older than {self.settings.max_age_seconds} s")
        elif (
            sb is None and want and self.building is None and not self.discarding
            and time.monotonic() >= self.retry_at
        ):  # fmt: skip
            self._build()

    def _build(self) -> None:
        assert self.settings is not None
        s = self.settings
        wid = WARM_BASE + secrets.randbelow(10**14)
        token = secrets.token_urlsafe(32)
        msg = SessionStart(
            msgid="warm", session_id=wid, token=token, duration_seconds=1,
            terminals=s.terminals, limits=s.limits or SessionLimits(), nexus_url=s.nexus_url,
        )  # fmt: skip
        from nexcompute_agent.sessions.manager import Session

        record = SessionRecord(
            session_id=wid,
            workspace=str(Path(self.m.config.workspace_root) / str(wid)),
            user=None,
            uid=None,
            started_at=time.time(),
            sandboxed=self.m.root,
            warm=True,
            cgroup_id=wid,
        )
        session = Session(record=record, msg=msg, limits=self.m._limits(msg), warm=True)
        self.sandbox = session
        self.ready_at = None
        self.m._save()  # before anything exists: a crash mid-build is found and wiped
        self.building = self.m._spawn(self._build_task(session), "warm-build")

    async def _build_task(self, session: Session) -> None:
        t0 = time.monotonic()
        try:
            await self.m._prepare(session)
            url = await self.m._launch(session)
            if session.cgroups is not None:
                session.cgroups.set_cpu_weight(session.limits.cpu_weight)
        except asyncio.CancelledError:
            self.building = None
            raise
        except Exception as exc:
            log.warning("warm pool: building a warm sandbox failed: %s", exc)
            self.building = None
            self.retry_at = time.monotonic() + BUILD_RETRY_SECONDS
            self.discard(f"the build failed: {exc}"[:200])
            return
        self.building = None
        session.url = url
        session.record.url = url
        session.record.state = "warm"
        self.ready_at = time.time()
        self.m._save()
        log.info(
            "warm pool: sandbox %d ready in %.2f s (%s)",
            session.record.session_id, time.monotonic() - t0, session.record.user,
        )  # fmt: skip
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # --- hand-over ----------------------------------------------------------------------------

    def take(self, msg: SessionStart, limits: SessionLimits) -> Session | None:
        """The ready warm sandbox for ``msg`` if it fits (same limits and terminals; Cloudflare
        Access only through a named tunnel), removed from the pool; else None (the keeper then
        discards it, since a session now runs). Synchronous: the caller claims it at once."""
        sb = self.sandbox
        if sb is None or sb.ending is not None:
            return None
        why = ""
        if self.ready_at is None:
            why = "a session starts before the warm sandbox is ready"
        elif limits != sb.limits or msg.terminals != sb.msg.terminals:
            why = "the session's limits differ from the warm sandbox's"
        elif msg.access is not None and (
            sb.tunnel is None or sb.tunnel.kind != "cloudflared-named"
        ):
            why = "Cloudflare Access needs a cloudflared-named tunnel"
        if why:
            # The session starts cold now: the warm sandbox goes at once, not at the keeper's
            # next tick (a named tunnel's Jupyter port is the same for both; the cold start
            # waits for this discard, ``SessionManager._start``).
            self.last_reason = why
            self.discard(why)
            return None
        self.sandbox = None
        self.ready_at = None
        return sb

    async def hand_over(self, session: Session) -> None:
        """Make ``session`` (a warm sandbox just taken, re-keyed to its session) the session's:
        its token and door settings into the hand-over file, the new token checked, ready."""
        m = self.m
        sid = session.record.session_id
        msg = session.msg
        t0 = time.monotonic()
        m._progress(session, "allocated", "session allocated: a warm sandbox is handed over")
        jupyter = session.jupyter
        assert jupyter is not None and session.record.url is not None
        # session.url was cleared at take-over (a repeated start must not replay the warm URL).
        base = session.record.url.split("/lab?", 1)[0]
        access = msg.access
        data = {
            "token": msg.token,
            "session_id": sid,
            "nexus_url": msg.nexus_url or m.config.server,
            "access_team_domain": access.team_domain if access else "",
            "access_audience": access.audience if access else "",
            "access_email": access.email if access else "",
            # For the Lab extension (time left, Extend): scoped to this session only.
            "capability": msg.capability or "",
        }
        account = session.account
        folder = Path(session.record.workspace) / ".jupyter"
        try:
            write_handover(
                folder, data, account.uid if account else None, account.gid if account else None
            )
        except OSError as exc:  # never leave the session "starting" with no answer
            await m._fail(session, f"could not hand the warm sandbox over: {exc}")
            return
        import dataclasses

        jupyter.spec = dataclasses.replace(
            jupyter.spec, token=msg.token, session_id=sid, access=access
        )
        session.record.token = msg.token
        try:
            await jupyter.wait_ready(HANDOVER_TIMEOUT)
        except Exception as exc:
            await m._fail(session, f"the warm sandbox did not take the session's token: {exc}")
            return
        # (The CPU weight was set when the sandbox was built; take() checked the limits match.)
        url = f"{base}/lab?token={msg.token}"
        session.url = session.record.url = url
        session.record.state = "running"
        session.details.append(
            f"started from a warm sandbox (warm id {session.record.cgroup_id}); handed over in "
            f"{(time.monotonic() - t0) * 1000:.0f} ms"
        )
        m._save()
        m._emit(SessionReady(session_id=sid, url=url), keep=True)  # the URL first (manager)
        m._progress(session, "ready", "Jupyter Lab is ready")
        session.task = m._spawn(m._watch(session), f"session-{sid}-watch")
        session.activity = m._spawn(m._report_activity(session), f"session-{sid}-activity")
        self._changed()

    # --- discard ------------------------------------------------------------------------------

    def discard(self, reason: str) -> None:
        sb = self.sandbox
        if sb is None:
            return
        self.sandbox = None
        self.ready_at = None
        if self.building is not None:
            self.building.cancel()
        log.info("warm pool: discarding sandbox %d: %s", sb.record.session_id, reason)
        self._discarded.append(sb)
        task = self.m._spawn(self._discard_task(sb, self.building, reason), "warm-discard")
        self.building = None
        self.discarding.add(task)
        task.add_done_callback(self.discarding.discard)
        self._changed()

    async def _discard_task(
        self, sb: Session, building: asyncio.Task[None] | None, reason: str
    ) -> None:
        if building is not None and not building.done():
            await asyncio.wait({building}, timeout=30.0)
        sb.record.state = "stopping"
        sb.details.insert(0, f"warm sandbox discarded: {reason}")
        sb.processes = {p.pid for p in _recorded(sb)}
        sb.processes |= set(sb.cgroups.procs() if sb.cgroups else ())
        grace = self.m.config.session_stop_grace
        stops = []
        if sb.jupyter is not None:
            stops.append(sb.jupyter.stop(grace))
        if sb.tunnel is not None:
            stops.append(sb.tunnel.close(grace))
        await asyncio.gather(*stops, return_exceptions=True)
        receipt = await self.m._wipe(sb.record, session=sb)
        self._discarded.remove(sb)
        self.add_receipt(receipt.model_dump(exclude={"type", "session_id"}), reason)
        self.m._save()
        self._changed()

    def add_receipt(self, fields: dict[str, Any], reason: str) -> None:
        self.receipts.append(WarmReceipt(reason=reason[:256], **fields))
        del self.receipts[:-16]  # bounded: older ones are in the agent's log
        self.flush()

    def memory_bytes(self) -> int | None:
        """The idle warm sandbox's resident memory (its processes' unique set size), or None."""
        sb = self.sandbox
        if sb is None or sb.jupyter is None:
            return None
        total = 0
        try:
            root = psutil.Process(sb.jupyter.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_full_info().uss
        except psutil.Error:
            return None
        return total


def _recorded(session: Session) -> list[psutil.Process]:
    from nexcompute_agent.sessions import cleanup

    return cleanup.recorded_processes(session.record.procs)


def write_handover(folder: Path, data: dict[str, Any], uid: int | None, gid: int | None) -> Path:
    """The hand-over file, 0600 and the session account's from the first byte, renamed into
    place so that Jupyter never reads half of it."""
    path = folder / HANDOVER_FILE
    tmp = folder / f".{HANDOVER_FILE}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if uid is not None and gid is not None:
            os.fchown(fd, uid, gid)
        os.write(fd, json.dumps(data).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def handover_path(workspace: str) -> str:
    return str(Path(workspace) / ".jupyter" / HANDOVER_FILE)


__all__ = ["WARM_BASE", "WarmPool", "handover_path", "is_warm_id", "write_handover"]
