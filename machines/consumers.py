"""The agent link: one websocket per lab computer at ``/ws/agent/``.

Thin by design: every frame is validated against the protocol models the agent package
defines, and every state change goes through ``machines.services`` / ``sessions.services``.

Heartbeats stay off the database and off Redis: metrics go into a per-process batch that is
flushed to dashboards once per interval (PITFALLS: per-beat fan-out tops out near 3,000 agents),
and the row is written at most every ``NEXCOMPUTE_METRICS_WRITE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from channels.db import database_sync_to_async as _db_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from machines import services
from machines.dashboard import batcher, metrics_writer
from nexcompute.realtime import machine_group
from nexcompute_agent import protocol as p
from sessions import policy as session_policy
from sessions import services as session_services

log = logging.getLogger(__name__)


def database_sync_to_async(fn: Any) -> Any:
    """Run ``fn`` in the thread pool, not the one shared thread: thousands of agents say hello
    at once after a server restart, and each connection's calls are independent."""
    return _db_sync_to_async(fn, thread_sensitive=False)


# Token bucket per connection (settings NEXCOMPUTE_AGENT_RATE_*): a burst of 20 frames, then
# 5 frames/s. Beyond it each frame gets an error; a connection that keeps flooding (20 frames
# over the limit) is closed with CLOSE_RATE_LIMITED.
RATE_STRIKES_BEFORE_CLOSE = 20


class AgentConsumer(AsyncWebsocketConsumer):
    machine_id: int
    group: str

    async def connect(self) -> None:
        machine = self.scope.get("machine")
        if machine is None:
            await self.close()  # before accept: the handshake is refused (HTTP 403)
            return
        self.machine_id = machine.pk
        self.machine_name = machine.name
        self.group = machine_group(machine.pk)
        self.said_hello = False
        self.replaced = False
        self.rate_burst = float(settings.NEXCOMPUTE_AGENT_RATE_BURST)
        self.rate_per_second = float(settings.NEXCOMPUTE_AGENT_RATE_PER_SECOND)
        self.tokens = self.rate_burst
        self.last_refill = time.monotonic()
        self.strikes = 0
        self.last_frame = time.monotonic()
        self.owner_present: bool | None = None
        self.pending_replies: dict[str, str] = {}  # msgid -> reply channel of the asker
        self.watchdog: asyncio.Task[None] | None = None
        # One live connection per machine: tell an older one (in any server process) to go.
        await self.channel_layer.group_send(
            self.group, {"type": "agent.replaced", "by": self.channel_name}
        )
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        self.watchdog = asyncio.create_task(self._watch_silence())

    async def disconnect(self, code: int) -> None:
        if not hasattr(self, "group"):
            return
        if self.watchdog is not None:
            self.watchdog.cancel()
        await self.channel_layer.group_discard(self.group, self.channel_name)
        # A connection that never said hello never brought the machine online: leave the row
        # alone (in a reconnect storm, half-open attempts must not cost database writes).
        if self.said_hello and not self.replaced:
            went_offline = await database_sync_to_async(services.machine_disconnected)(
                machine_id=self.machine_id, reason=f"agent disconnected ({code})"
            )
            if went_offline:
                batcher.update(self.machine_id, last_seen=timezone.now(), status="offline")

    async def _watch_silence(self) -> None:
        """Close a connection that has gone silent past the grace (half-open TCP)."""
        grace = settings.NEXCOMPUTE_OFFLINE_GRACE_SECONDS
        while True:
            await asyncio.sleep(min(grace / 4, 5.0))
            if time.monotonic() - self.last_frame > grace:
                log.info("machine %s silent for %.0f s: closing", self.machine_id, grace)
                # Channels then delivers websocket.disconnect, whose handler marks it offline
                # (calling disconnect() here would cancel this very task mid-way).
                await self.close(code=p.CLOSE_NORMAL)
                return

    # --- frames from the agent ------------------------------------------------------------

    def _rate_ok(self) -> bool:
        now = time.monotonic()
        refill = (now - self.last_refill) * self.rate_per_second
        self.tokens = min(self.rate_burst, self.tokens + refill)
        self.last_refill = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    async def send_error(self, code: str, detail: str) -> None:
        await self.send(text_data=p.dump(p.ServerError(code=code, detail=detail[: p.MAX_TEXT])))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.last_frame = time.monotonic()
        if not self._rate_ok():
            self.strikes += 1
            if self.strikes >= RATE_STRIKES_BEFORE_CLOSE:
                await self.close(code=p.CLOSE_RATE_LIMITED)
                return
            # Session reports (ready, failed, receipts) must not be dropped: over the limit
            # they still count as strikes (a flood gets closed), but are handled. The type
            # is peeked before parsing; anything else over the limit is refused.
            head = (text_data or "")[:64].replace(" ", "")
            if '"type":"session.' not in head:
                await self.send_error("rate_limited", f"at most {self.rate_per_second:g} frames/s")
                return
        raw = text_data if text_data is not None else (bytes_data or b"")
        if len(raw) > p.MAX_FRAME_BYTES:
            await self.close(code=p.CLOSE_TOO_BIG)
            return
        try:
            msg = p.parse_agent_message(raw)
        except p.ProtocolError as exc:
            await self.send_error(exc.code, exc.detail)
            return
        if not self.said_hello and not isinstance(msg, p.Hello):
            await self.send_error("hello_required", "the first message must be hello")
            await self.close(code=p.CLOSE_POLICY)
            return
        try:
            await self.dispatch_message(msg)
        except Exception:  # one bad frame must not take the connection (or the server) down
            log.exception("machine %s: handling %s failed", self.machine_id, msg.type)
            await self.send_error("internal", f"could not handle {msg.type}")

    async def dispatch_message(self, msg: Any) -> None:
        if isinstance(msg, p.Hello):
            await self.on_hello(msg)
        elif isinstance(msg, p.Heartbeat):
            await self.on_heartbeat(msg)
        elif isinstance(msg, p.Reply):
            await self.on_reply(msg)
        else:
            await self.on_session_message(msg)

    async def on_hello(self, msg: p.Hello) -> None:
        if msg.protocol_version != p.PROTOCOL_VERSION:
            await self.send_error(
                "protocol_version",
                f"server speaks protocol {p.PROTOCOL_VERSION}, agent {msg.protocol_version}",
            )
            await self.close(code=p.CLOSE_PROTOCOL_VERSION)
            return
        machine, commands = await database_sync_to_async(self._hello_and_reconcile)(msg)
        batcher.update(
            machine.pk,
            last_seen=timezone.now(),
            status=machine.status,
            owner_present=machine.owner_present,
        )
        self.said_hello = True
        self.owner_present = msg.owner_present
        await self.send(
            text_data=p.dump(
                p.Welcome(
                    machine_id=machine.pk,
                    name=machine.name,
                    heartbeat_seconds=settings.NEXCOMPUTE_HEARTBEAT_SECONDS,
                    server_time=timezone.now(),
                )
            )
        )
        # Then what reconciliation asks for: starts still due, stops (wipes) still owed.
        for command in commands:
            await self.on_session_command(command)

    def _hello_and_reconcile(self, msg: p.Hello) -> tuple[Any, list[dict[str, Any]]]:
        """One trip to the database thread for everything a hello needs (connect storms)."""
        machine = services.machine_hello(
            machine_id=self.machine_id,
            hostname=msg.hostname,
            agent_version=msg.agent_version,
            specs=msg.specs.model_dump(),
            owner_present=msg.owner_present,
        )
        commands = session_services.reconcile(
            machine_id=self.machine_id, agent_sessions=[s.session_id for s in msg.sessions]
        )
        return machine, commands

    async def on_heartbeat(self, msg: p.Heartbeat) -> None:
        metrics = msg.metrics.model_dump(exclude_none=True)
        now = timezone.now()
        if msg.owner_present != self.owner_present:
            self.owner_present = msg.owner_present
            machine = await database_sync_to_async(services.machine_set_owner_present)(
                machine_id=self.machine_id, present=msg.owner_present
            )
            await self.on_owner_presence(machine.pk, msg.owner_present)
        batcher.update(self.machine_id, metrics=metrics, last_seen=now)
        metrics_writer.update(self.machine_id, metrics=metrics, seen=now)

    async def on_owner_presence(self, machine_id: int, present: bool) -> None:
        """The lease policy reacts to the owner returning: the session is warned at once, and
        the beat's owner-returned sweep stops it after NEXCOMPUTE_OWNER_GRACE_MINUTES."""
        if present:
            await database_sync_to_async(session_policy.session_owner_returned)(
                machine_id=machine_id
            )

    async def on_reply(self, msg: p.Reply) -> None:
        reply_channel = self.pending_replies.pop(msg.msgid, None)
        if reply_channel:
            await self.channel_layer.send(
                reply_channel,
                {"type": "agent.reply", "ok": msg.ok, "error": msg.error, "data": msg.data},
            )

    async def on_session_message(self, msg: Any) -> None:
        """Progress, readiness, failure, receipts and activity of this machine's sessions."""
        ok = await database_sync_to_async(self._apply_session_message)(msg)
        if not ok:
            await self.send_error(
                "unknown_session", f"session {msg.session_id} is not on this machine"
            )

    def _apply_session_message(self, msg: Any) -> bool:
        session = session_services.session_for_machine(
            machine_id=self.machine_id, session_id=msg.session_id
        )
        if session is None:
            return False
        if isinstance(msg, p.SessionProgress):
            session_services.session_progress(session=session, step=msg.step, message=msg.message)
        elif isinstance(msg, p.SessionReady):
            session_services.session_mark_running(session=session, url=msg.url)
        elif isinstance(msg, p.SessionFailed):
            session_services.session_mark_failed(session=session, error=msg.error)
        elif isinstance(msg, p.SessionReceipt):
            session_services.session_record_receipt(
                session=session,
                verified=msg.verified,
                files_removed=msg.files_removed,
                bytes_removed=msg.bytes_removed,
                processes_killed=msg.processes_killed,
                details=list(msg.details),
            )
        elif isinstance(msg, p.SessionActivity):
            session_services.session_record_activity(
                session=session,
                last_activity=msg.last_activity,
                kernels_busy=msg.kernels_busy,
                connections=msg.connections,
            )
        return True

    # --- channel-layer events (from any server process) ------------------------------------

    async def agent_replaced(self, event: dict[str, Any]) -> None:
        if event["by"] != self.channel_name:
            self.replaced = True
            await self.close(code=p.CLOSE_REPLACED)

    async def agent_command(self, event: dict[str, Any]) -> None:
        payload = event["payload"]
        kind = payload.get("type")
        if kind == "disconnect":
            await self.close(code=int(payload.get("code", p.CLOSE_NORMAL)))
            return
        if not self.said_hello:
            return  # the agent resyncs from the database on hello
        if kind == "ping":
            msgid = p.new_msgid()
            if payload.get("reply_channel"):
                self.pending_replies[msgid] = payload["reply_channel"]
            await self.send(text_data=p.dump(p.Ping(msgid=msgid)))
            return
        await self.on_session_command(payload)

    async def on_session_command(self, payload: dict[str, Any]) -> None:
        """Turn ``session.start``/``session.stop`` commands into protocol messages.

        The command carries ids only; the details (token, lease) are read from the database
        now, so a start for a session cancelled meanwhile is not sent.
        """
        kind = payload.get("type")
        if kind == "session.start":
            start = await database_sync_to_async(session_services.session_start_command)(
                session_id=int(payload["session_id"])
            )
            if start is not None:
                await self.send(text_data=p.dump(p.SessionStart(msgid=p.new_msgid(), **start)))
        elif kind == "session.stop":
            stop = p.SessionStop(
                msgid=p.new_msgid(),
                session_id=int(payload["session_id"]),
                reason=str(payload.get("reason") or "ended")[: p.MAX_STR],
            )
            await self.send(text_data=p.dump(stop))
