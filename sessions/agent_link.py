"""The agent link: one websocket per lab computer at ``/ws/agent/``.

Thin by design: every frame is validated against the protocol models the agent package
defines, and every state change goes through ``machines.services`` (liveness, presence,
specs) or ``sessions.services`` (session reports, one entry: ``apply_agent_report``). It lives
in the sessions app because it speaks for both: ``machines`` never imports ``sessions``.
Events for the connection from any server process are typed in ``nexcompute.agent_events``,
one handler each.

Heartbeats stay off the database and off Redis: metrics go into a per-process batch that is
flushed to dashboards once per interval (PITFALLS: per-beat fan-out tops out near 3,000 agents),
and the row is written at most every ``NEXCOMPUTE_METRICS_WRITE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async as _db_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from dashboard.feed import batcher
from machines import services as machine_services
from machines.auth import bearer_from_scope
from machines.heartbeats import metrics_writer
from machines.models import Machine, MachineStatus
from machines.presence import OwnerPresence, PresenceRules, away_reason, counts_present
from nexcompute import agent_events, logcontext
from nexcompute.channel_layer import join_group_alone
from nexcompute.consumer_dispatch import InTurnDispatch
from nexcompute.gc_pacer import pacer
from nexcompute.metrics import AGENTS_CONNECTED
from nexcompute.realtime import machine_group
from nexcompute_agent import protocol
from sessions import occupancy, policy, services, warm

log = logging.getLogger(__name__)
T = TypeVar("T")

_held = [0]  # agent websockets this process holds (its event loop's own count)
_fleet: list[float] = [-1e9, 0]  # (monotonic time of the count, machines up or lately)


def fleet_share() -> int:
    """This process's share of the fleet that is up or was lately: the agents that would come
    back after a restart. A machine counts while it is not offline, and for the longest window
    and the grace after it was last seen: a socket the server sees close marks its machine
    offline at once (a proxy restart closes them all), and those agents are coming back.
    Machines switched off for longer do not lengthen the window. Counted at most once a minute."""
    now = time.monotonic()
    if now - _fleet[0] > 60:
        lately = timezone.now() - dt.timedelta(
            seconds=settings.NEXCOMPUTE_RECONNECT_WINDOW_MAX
            + settings.NEXCOMPUTE_OFFLINE_GRACE_SECONDS
        )
        up = Machine.objects.filter(~Q(status=MachineStatus.OFFLINE) | Q(last_seen__gte=lately))
        _fleet[:] = [now, up.count()]
    return math.ceil(_fleet[1] / max(1, settings.NEXCOMPUTE_WEB_PROCESSES))


def reconnect_window(share: int = 0) -> float:
    """How long this process's agents should spread their first reconnect over, should they
    all lose it at once (the process restarted or killed): the agents it holds, or its share of
    the fleet if more (the first agents back after a restart find it nearly empty), at the pace
    one process takes connects, capped (docs/protocol.md, "Reconnect behaviour")."""
    rate = settings.NEXCOMPUTE_RECONNECT_RATE
    if rate <= 0:
        return 0.0
    cap = min(settings.NEXCOMPUTE_RECONNECT_WINDOW_MAX, 3600.0)  # the field's own bound
    return round(max(0.0, min(cap, max(_held[0], share) / rate)), 3)


@functools.cache
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=settings.NEXCOMPUTE_AGENT_DB_THREADS, thread_name_prefix="agent-db"
    )


def database_sync_to_async(fn: Any) -> Any:
    """Run ``fn`` in the agent link's own thread pool, not the one shared thread: thousands of
    agents say hello at once after a server restart, and each connection's calls are
    independent (and mostly wait on PostgreSQL, so more threads than asyncio's default 6)."""
    return _db_sync_to_async(fn, thread_sensitive=False, executor=_executor())


# Token bucket per connection (settings NEXCOMPUTE_AGENT_RATE_*): a burst of 20 frames, then
# 5 frames/s. Beyond it each frame gets an error; a connection that keeps flooding (20 frames
# over the limit) is closed with CLOSE_RATE_LIMITED.
RATE_STRIKES_BEFORE_CLOSE = 20


class AgentConsumer(InTurnDispatch, AsyncWebsocketConsumer):
    machine_id: int
    group: str

    async def connect(self) -> None:
        machine = self.scope.get("machine")
        if machine is None:
            await self.close()  # before accept: the handshake is refused (HTTP 403)
            return
        self.machine_id = machine.pk
        self.machine_name = machine.name
        logcontext.bind(machine_id=machine.pk)  # on every log line of this connection
        self.group = machine_group(machine.pk)
        self.said_hello = False
        self.replaced = False
        self.protocol_version: int = protocol.PROTOCOL_VERSION
        self.fleet_share = 0  # this process's share of the machines up or lately (at hello)
        self.capabilities: frozenset[str] = frozenset(protocol.CAPABILITIES)
        self.rate_burst = float(settings.NEXCOMPUTE_AGENT_RATE_BURST)
        self.rate_per_second = float(settings.NEXCOMPUTE_AGENT_RATE_PER_SECOND)
        self.tokens = self.rate_burst
        self.last_refill = time.monotonic()
        self.strikes = 0
        self.last_frame = time.monotonic()
        self.owner_present: bool | None = None
        # The lab's presence rules, loaded at hello (machines/presence.py).
        self.owner = OwnerPresence(PresenceRules(), present=False)
        self.pending_replies: dict[str, str] = {}  # msgid -> reply channel of the asker
        # Warm sandboxes (sessions/warm.py): what this agent was last told, when, and what it
        # last reported.
        self.warm_sent: protocol.WarmSet | None = None
        self.warm_checked = 0.0
        self.warm_ready: bool | None = None
        self.watchdog: asyncio.TimerHandle | None = None  # the silence check (_check_silence)
        self.closing: asyncio.Task[None] | None = None
        # Accept first: the handshake costs nothing but the credential check (done by the
        # middleware), so a fleet reconnecting after a server restart is not held up by Redis
        # round trips before accept (daphne's connect timeout). Frames that arrive meanwhile
        # wait in the consumer's queue until connect returns.
        await self.accept()
        # One live connection per machine: tell an older one (in any server process) to go.
        await join_group_alone(
            self.channel_layer,
            self.group,
            self.channel_name,
            dict(agent_events.disconnect(self.channel_name)),
        )
        self.counted = True
        pacer.ensure_running()  # the process's collections by the clock (thousands of agents)
        AGENTS_CONNECTED.inc()
        _held[0] += 1
        self._arm_watchdog(settings.NEXCOMPUTE_OFFLINE_GRACE_SECONDS)

    async def dispatch(self, message: Any) -> None:
        """Channels' dispatch, without its ``aclose_old_connections()`` before every message.

        That call hops to the one thread-sensitive worker thread to close stale database
        connections, for every frame and event of every connection: thousands of agents beating
        queue behind that single thread (and the GIL), each handshake waits its turn, and past
        daphne's 5 s connect timeout the fleet never gets in (issue #11/#12 bench). This
        consumer touches the database only through ``database_sync_to_async`` in the thread
        pool, which closes connections around each call itself.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def disconnect(self, code: int) -> None:
        if not hasattr(self, "group"):
            return
        if getattr(self, "counted", False):
            self.counted = False
            AGENTS_CONNECTED.dec()
            _held[0] -= 1
        if self.watchdog is not None:
            self.watchdog.cancel()
        await self.channel_layer.group_discard(self.group, self.channel_name)
        # A connection that never said hello never brought the machine online: leave the row
        # alone (in a reconnect storm, half-open attempts must not cost database writes).
        if self.said_hello and not self.replaced:
            went_offline = await database_sync_to_async(machine_services.machine_disconnected)(
                machine_id=self.machine_id, reason=f"agent disconnected ({code})"
            )
            if went_offline:
                batcher.update(self.machine_id, last_seen=timezone.now(), status="offline")

    def _arm_watchdog(self, delay: float) -> None:
        self.watchdog = asyncio.get_running_loop().call_later(delay, self._check_silence)

    def _check_silence(self) -> None:
        """Close a connection that has gone silent past the grace (half-open TCP).

        One timer per connection, due when the grace since the last frame runs out, and set
        again from the newest frame while frames come: a beating agent costs one timer call per
        grace (35 s), not a task waking every few seconds (at 20,000 agents that was 4,000
        wake-ups a second, more than their beats).
        """
        grace = settings.NEXCOMPUTE_OFFLINE_GRACE_SECONDS
        silent = time.monotonic() - self.last_frame
        if silent < grace:
            self._arm_watchdog(grace - silent)
            return
        self.watchdog = None
        log.info("machine %s silent for %.0f s: closing", self.machine_id, silent)
        # Channels then delivers websocket.disconnect, whose handler marks it offline.
        self.closing = asyncio.create_task(self.close(code=protocol.CLOSE_NORMAL))
        self.closing.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self.closing = None
        if not task.cancelled() and task.exception() is not None:
            log.warning(
                "machine %s: closing a silent socket failed: %r", self.machine_id, task.exception()
            )

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

    def _dump(self, msg: Any) -> str:
        """A server message in the form this connection's agent understands."""
        return protocol.dump_for(msg, self.protocol_version, self.capabilities)

    async def send_error(self, code: str, detail: str) -> None:
        await self.send(
            text_data=protocol.dump(
                protocol.ServerError(code=code, detail=detail[: protocol.MAX_TEXT])
            )
        )

    async def _over_rate(self, text_data: str | None) -> bool:
        """True if the frame must be dropped: the connection sends faster than allowed.

        Session reports (ready, failed, receipts) must not be dropped: over the limit they
        still count as strikes (a flood gets closed), but are handled. The type is peeked
        before parsing; anything else over the limit is refused.
        """
        if self._rate_ok():
            return False
        self.strikes += 1
        if self.strikes >= RATE_STRIKES_BEFORE_CLOSE:
            await self.close(code=protocol.CLOSE_RATE_LIMITED)
            return True
        head = (text_data or "")[:64].replace(" ", "")
        if '"type":"session.' in head:
            return False
        await self.send_error("rate_limited", f"at most {self.rate_per_second:g} frames/s")
        return True

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.last_frame = time.monotonic()
        if await self._over_rate(text_data):
            return
        raw = text_data if text_data is not None else (bytes_data or b"")
        if len(raw) > protocol.MAX_FRAME_BYTES:
            await self.close(code=protocol.CLOSE_TOO_BIG)
            return
        if not self.said_hello and await self._refuse_version(raw):
            return
        try:
            msg = protocol.parse_agent_message(raw)
        except protocol.ProtocolError as exc:
            await self.send_error(exc.code, exc.detail)
            return
        if not self.said_hello and not isinstance(msg, protocol.Hello):
            await self.send_error("hello_required", "the first message must be hello")
            await self.close(code=protocol.CLOSE_POLICY)
            return
        try:
            await self.dispatch_message(msg)
        except Exception:  # one bad frame must not take the connection (or the server) down
            log.exception("machine %s: handling %s failed", self.machine_id, msg.type)
            await self.send_error("internal", f"could not handle {msg.type}")

    async def dispatch_message(self, msg: Any) -> None:
        handler = {
            "hello": self.on_hello,
            "heartbeat": self.on_heartbeat,
            "reply": self.on_reply,
            "warm.receipt": self.on_warm_receipt,
        }
        await handler.get(msg.type, self.on_session_report)(msg)

    async def _refuse_version(self, raw: str | bytes) -> bool:
        """Before the hello is validated (a newer agent's may carry fields this server does not
        know): an agent whose protocol this server does not serve is told plainly which side
        to upgrade, in an error frame and the close reason, and closed (4002)."""
        version = protocol.hello_version(raw)
        why = protocol.supported(version) if version is not None else None
        if why is None:
            return False
        log.warning("machine %s: %s", self.machine_id, why)
        code = why.split(":", 1)[0]
        await self.send_error(code, why)
        await self.close(code=protocol.CLOSE_PROTOCOL_VERSION, reason=why)
        return True

    async def on_hello(self, msg: protocol.Hello) -> None:
        # The version was checked before validation (_refuse_version); this connection speaks
        # the agent's version and sends only what it supports.
        self.protocol_version = msg.protocol_version
        self.capabilities = frozenset(
            msg.capabilities if msg.protocol_version >= 2 else protocol.CAPABILITIES_V1
        )
        machine, commands = await database_sync_to_async(self._hello_and_reconcile)(msg)
        batcher.update(
            machine.pk,
            last_seen=timezone.now(),
            status=machine.status,
            owner_present=machine.owner_present,
        )
        self.said_hello = True
        self.owner_present = msg.owner_present
        self.owner = OwnerPresence(
            PresenceRules(
                idle_minutes=machine.lab.owner_idle_minutes,
                reoffer_minutes=machine.lab.owner_reoffer_minutes,
            ),
            present=msg.owner_present,
        )
        welcome = protocol.Welcome(
            machine_id=machine.pk,
            name=machine.name,
            heartbeat_seconds=settings.NEXCOMPUTE_HEARTBEAT_SECONDS,
            server_time=timezone.now(),
            protocol_version=self.protocol_version,
            reconnect_window_seconds=reconnect_window(self.fleet_share),
        )
        await self.send(text_data=self._dump(welcome))
        # Then what reconciliation asks for: starts still due, stops (wipes) still owed.
        for command in commands:
            if command["type"] == "agent.session_start":
                await self.agent_session_start(command)
            else:
                await self.agent_session_stop(command)
        await self._send_warm()

    def _hello_and_reconcile(
        self, msg: protocol.Hello
    ) -> tuple[Any, list[agent_events.SessionCommand]]:
        """One trip to the database thread for everything a hello needs (connect storms)."""
        machine = machine_services.machine_hello(
            machine_id=self.machine_id,
            hostname=msg.hostname,
            agent_version=msg.agent_version,
            specs=msg.specs.model_dump(),
            owner_present=msg.owner_present,
            status_of=occupancy.machine_status_for,
        )
        commands = occupancy.reconcile(
            machine_id=self.machine_id,
            agent_sessions=[s.session_id for s in msg.sessions if s.state != "ended"],
            ended=[s.session_id for s in msg.sessions if s.state == "ended"],
        )
        self.fleet_share = fleet_share()
        return machine, commands

    async def on_heartbeat(self, msg: protocol.Heartbeat) -> None:
        metrics = msg.metrics.model_dump(exclude_none=True)
        now = timezone.now()
        # The lab's rules: idle or locked too long counts as away, and leaving counts only
        # after the re-offer delay; a returning owner counts at once.
        reported = counts_present(
            rules=self.owner.rules, owner_present=msg.owner_present, idle_seconds=msg.idle_seconds
        )
        present = self.owner.update(reported, time.time())  # minutes: the wall clock will do
        if present != self.owner_present:
            self.owner_present = present
            why = None
            if not present and msg.owner_present:
                why = away_reason(idle_seconds=msg.idle_seconds, locked=msg.locked)
            machine = await database_sync_to_async(machine_services.machine_set_owner_present)(
                machine_id=self.machine_id, present=present, message=why
            )
            await self.on_owner_presence(machine.pk, present)
            await self._send_warm()
        if msg.warm is not None and msg.warm != self.warm_ready:
            self.warm_ready = msg.warm
            # Dashboards hear it once, from the service's push after its commit.
            await database_sync_to_async(machine_services.machine_set_warm)(
                machine_id=self.machine_id, ready=msg.warm
            )
        elif time.monotonic() - self.warm_checked > settings.NEXCOMPUTE_WARM_CHECK_SECONDS:
            await self._send_warm()  # the lab's hours: looked at again now and then
        batcher.update(self.machine_id, metrics=metrics, last_seen=now)
        metrics_writer.update(self.machine_id, metrics=metrics, seen=now)

    async def on_owner_presence(self, machine_id: int, present: bool) -> None:
        """The lease policy reacts to the owner returning: the session is warned at once, and
        the beat's owner-returned sweep stops it after NEXCOMPUTE_OWNER_GRACE_MINUTES."""
        if present:
            await database_sync_to_async(policy.session_owner_returned)(machine_id=machine_id)

    async def _send_warm(self) -> None:
        """Tell an agent that keeps warm sandboxes what it should keep, if that changed."""
        if "session.warm" not in self.capabilities or not self.said_hello:
            return
        self.warm_checked = time.monotonic()
        if not settings.NEXCOMPUTE_WARM_POOLS and self.warm_sent is None:
            return  # off on this server and never turned on: no query, nothing to say
        wanted = await database_sync_to_async(warm.warm_settings)(machine_id=self.machine_id)
        if warm.same(self.warm_sent, wanted):
            return
        if self.warm_sent is None and not wanted.enabled:
            return  # an agent keeps none until told to: nothing to say
        self.warm_sent = wanted
        await self.send(text_data=self._dump(wanted))

    async def on_warm_receipt(self, msg: protocol.WarmReceipt) -> None:
        """A warm sandbox was discarded: its wipe's proof (unverified: quarantine)."""
        if not await self._still_authorised():
            return
        failed = [f"{c.name}: {c.detail}" for c in msg.checks if not c.ok]
        summary = (
            f"{msg.files_removed} files, {msg.processes_killed} processes removed"
            if msg.verified
            else "; ".join(failed) or "not verified"
        )
        await database_sync_to_async(machine_services.machine_record_warm_receipt)(
            machine_id=self.machine_id, verified=msg.verified, reason=msg.reason, summary=summary
        )

    async def agent_warm_check(self, event: agent_events.WarmCheckEvent) -> None:
        await self._send_warm()

    async def on_reply(self, msg: protocol.Reply) -> None:
        reply_channel = self.pending_replies.pop(msg.msgid, None)
        if reply_channel:
            await self.channel_layer.send(
                reply_channel,
                {"type": "agent.reply", "ok": msg.ok, "error": msg.error, "data": msg.data},
            )

    async def on_session_report(self, msg: services.SessionReport) -> None:
        """Progress, readiness, failure, notices, receipts and activity of this machine's
        sessions."""
        with logcontext.log_context(session_id=msg.session_id):
            authorised, ok = await database_sync_to_async(self._if_authorised)(
                services.apply_agent_report, machine_id=self.machine_id, msg=msg
            )
        if not authorised:
            await self._unauthorised()
            return
        if not ok:
            await self.send_error(
                "unknown_session", f"session {msg.session_id} is not on this machine"
            )

    async def _still_authorised(self) -> bool:
        """The credential is checked again before every command and session report, not only
        at the handshake: a revocation whose channel-layer message was lost (PITFALLS: full
        channels drop group messages) still ends the link at the next command. Heartbeats
        are not checked (they touch neither the database nor a session)."""
        authorised, _ = await database_sync_to_async(self._if_authorised)(lambda: None)
        if not authorised:
            await self._unauthorised()
        return authorised

    def _if_authorised(self, fn: Callable[..., T], /, **kwargs: Any) -> tuple[bool, T | None]:
        """The credential check and then ``fn``, in one trip to the database thread (a start
        or a session's ``ready`` waits on it): ``(False, None)`` without running ``fn`` when
        the credential no longer holds."""
        token = bearer_from_scope(self.scope) or ""
        machine = machine_services.machine_authenticate(token)
        if machine is None or machine.pk != self.machine_id:
            return False, None
        return True, fn(**kwargs)

    async def _unauthorised(self) -> None:
        log.warning("machine %s: credential no longer valid; closing", self.machine_id)
        await self.close(code=protocol.CLOSE_UNAUTHORIZED)

    # --- channel-layer events (from any server process; nexcompute.agent_events) -----------

    async def agent_disconnect(self, event: agent_events.DisconnectEvent) -> None:
        if event["by"] != self.channel_name:
            self.replaced = True
            await self.close(code=protocol.CLOSE_REPLACED)

    async def agent_revoke(self, event: agent_events.RevokeEvent) -> None:
        await self.close(code=protocol.CLOSE_UNAUTHORIZED)

    async def agent_ping(self, event: agent_events.PingEvent) -> None:
        if not self.said_hello:
            return
        msgid = protocol.new_msgid()
        self.pending_replies[msgid] = event["reply_channel"]
        await self.send(text_data=self._dump(protocol.Ping(msgid=msgid)))

    async def agent_session_start(self, event: agent_events.SessionStartEvent) -> None:
        """The details (token, lease, limits) are read from the database now, so a start for
        a session cancelled meanwhile is not sent."""
        if not self.said_hello:
            return  # the agent resyncs from the database on hello
        authorised, start = await database_sync_to_async(self._if_authorised)(
            services.session_start_command, session_id=event["session_id"]
        )
        if not authorised:
            await self._unauthorised()
            return
        if start is not None:
            await self.send(text_data=self._dump(start))

    async def agent_session_stop(self, event: agent_events.SessionStopEvent) -> None:
        if not self.said_hello:
            return  # the agent resyncs from the database on hello
        if not await self._still_authorised():
            return
        stop = protocol.SessionStop(
            msgid=protocol.new_msgid(), session_id=event["session_id"], reason=event["reason"]
        )
        await self.send(text_data=self._dump(stop))
