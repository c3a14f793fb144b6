"""The agent's connection to the Nexus: connect, hello/welcome, heartbeats, commands, reconnect.

Shape (after hass_nabucasa's ``BaseIoT``): an explicit :class:`ConnectionState`, a
``close_requested`` flag and an outer loop in :meth:`Agent.run` that never dies on transient
errors. Each connection runs a reader, a writer and a heartbeat task; when one ends the others are
cancelled and the outer loop decides whether to reconnect or stop.

Backoff: after a failed or lost connection the agent waits ``uniform(0, min(backoff_max,
backoff_initial * 2**n))`` ("full jitter"), where ``n`` counts failures since the last
``welcome``. After losing a connection that had its ``welcome``, the first wait is at least
``uniform(0, welcome.reconnect_window_seconds)``: the server's window for its whole fleet,
which lost the connection at the same moment if the server process restarted. Receiving
``welcome`` resets ``n`` (a server that accepts the socket but never says welcome does not
reset it). A close with 4008 (rate limited) keeps ``n`` at 3 or more.

Exit codes of :meth:`Agent.run`: 0 stop requested; 3 credential refused (HTTP 401/403 on the
handshake that the server's API confirms, or close 4001); 4 this agent's protocol is too old
for the server (close 4002, ``protocol_too_old``); 5 replaced by another agent (close 4003). A
server older than the agent (close 4002, ``protocol_too_new``) is not fatal: the agent retries
at its longest backoff.

A 401/403 on the handshake is confirmed with ``GET /api/agents/me`` before the agent gives up:
daphne also answers 403 to a handshake its application did not accept in time (a server
overloaded by a reconnect storm), and a fleet must not exit on that. Only the API refusing the
credential (401/403) is fatal; anything else is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from nexcompute_agent import __version__
from nexcompute_agent.aio import wait_for
from nexcompute_agent.presence import PresenceDetector, PresenceSample, make_detector
from nexcompute_agent.probe import HostProbe
from nexcompute_agent.protocol import (
    CAPABILITIES,
    CLOSE_PROTOCOL_VERSION,
    CLOSE_RATE_LIMITED,
    CLOSE_REPLACED,
    CLOSE_UNAUTHORIZED,
    MAX_FRAME_BYTES,
    MAX_TEXT,
    PROTOCOL_VERSION,
    SERVER_MESSAGE_TYPES,
    Heartbeat,
    Hello,
    Ping,
    ProtocolError,
    Reply,
    ServerCommand,
    ServerError,
    SessionRef,
    SessionStart,
    SessionStop,
    WarmSet,
    Welcome,
    dump,
    parse_server_message,
)
from nexcompute_agent.sessions import SessionManager, SessionRefused

if TYPE_CHECKING:
    from pydantic import BaseModel

    from nexcompute_agent.config import AgentConfig

log = logging.getLogger(__name__)

# websockets logs every handshake header at DEBUG, including Authorization. Give it a logger of
# its own pinned at INFO so that --verbose never writes the credential to the log.
_WS_LOGGER = logging.getLogger("nexcompute_agent.websockets")
_WS_LOGGER.setLevel(logging.INFO)

EXIT_OK = 0
EXIT_CREDENTIAL = 3
EXIT_PROTOCOL = 4
EXIT_REPLACED = 5

OPEN_TIMEOUT = 10.0
PING_INTERVAL = 20.0
CLOSE_TIMEOUT = 2.0
OUTBOX_SIZE = 256


class ConnectionState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"  # welcome received
    STOPPING = "stopping"


class CommandError(Exception):
    """Raised by a handler to answer ``reply`` ok=False with this text."""


CREDENTIAL_CHECK_PATH = "/api/agents/me"
CREDENTIAL_CHECK_TIMEOUT = 10.0


def credential_status(server: str, credential: str) -> int | None:
    """The HTTP status ``GET /api/agents/me`` answers this credential with (200 accepted,
    401/403 refused), or None when the server cannot be asked (unreachable, timed out)."""
    request = urllib.request.Request(
        server.rstrip("/") + CREDENTIAL_CHECK_PATH,
        headers={
            "Authorization": f"Bearer {credential}",
            "Accept": "application/json",
            "User-Agent": f"nexcompute-agent/{__version__}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=CREDENTIAL_CHECK_TIMEOUT) as response:  # noqa: S310 - the configured Nexus URL (http/https, validated)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return None


class FatalError(Exception):
    """The agent must stop: retrying cannot help (bad credential, incompatible server)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


Handler = Callable[["Agent", Any], Awaitable["dict[str, Any] | None"]]
"""``async def handler(agent, msg) -> data``; the returned dict becomes ``reply.data``."""
H = TypeVar("H", bound=Handler)


def full_jitter(ceiling: float) -> float:
    return random.uniform(0, ceiling)


class Agent:
    """One agent process. ``await Agent(config).run()`` returns an exit code.

    Commands are dispatched through a registry keyed by message type and filled with the
    :meth:`handler` decorator::

        @Agent.handler("session.start")
        async def start(agent: Agent, msg: SessionStart) -> dict[str, Any]: ...

    A handler that raises answers ``reply`` ok=False with the error text; the connection stays up.
    Each command runs in its own task, so a slow one does not block reading; its task is cancelled
    if the connection ends before it finishes.
    """

    _registry: ClassVar[dict[str, Handler]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._registry = dict(cls._registry)  # a subclass extends, never mutates, its parent's

    @classmethod
    def handler(cls, msg_type: str) -> Callable[[H], H]:
        if msg_type not in SERVER_MESSAGE_TYPES:
            raise ValueError(f"{msg_type!r} is not a server message type")

        def register(fn: H) -> H:
            cls._registry[msg_type] = fn
            return fn

        return register

    def __init__(
        self,
        config: AgentConfig,
        *,
        presence: PresenceDetector | None = None,
        probe: HostProbe | None = None,
        jitter: Callable[[float], float] = full_jitter,
        welcome_timeout: float = 10.0,
    ) -> None:
        self.config = config
        self.state = ConnectionState.DISCONNECTED
        self.close_requested = False
        self.last_disconnect_reason: str | None = None
        self.handlers: dict[str, Handler] = dict(type(self)._registry)
        self.presence = presence or make_detector(config)
        self.probe = probe or HostProbe(config.workspace_root, config.nvidia_smi)
        self.heartbeat_seconds = config.heartbeat_seconds
        self.welcome: Welcome | None = None
        self.welcome_timeout = welcome_timeout
        self._jitter = jitter
        self._stop = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._outbox: asyncio.Queue[str] | None = None
        self._commands: set[asyncio.Task[None]] = set()
        self._presence = PresenceSample(owner_present=False)
        self._got_welcome = False
        self._rate_limited = False
        self._server_too_old = False  # an error frame said protocol_too_new
        self._server_behind = False  # closed for it: back off at the maximum
        self.sessions = SessionManager(config, self.send)
        self._beat_now = asyncio.Event()  # the warm pool changed: tell the server at once
        self.sessions.warm.on_change = self._beat_now.set

    # --- public -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask :meth:`run` to close the socket (code 1000) and return 0. Safe from a signal
        handler registered with ``loop.add_signal_handler``."""
        self.close_requested = True
        self.state = ConnectionState.STOPPING
        self._stop.set()

    def send(self, msg: BaseModel) -> bool:
        """Queue a message for the server. False (and dropped) when not connected."""
        if self._outbox is None or self.state is not ConnectionState.CONNECTED:
            return False
        try:
            self._outbox.put_nowait(dump(msg))
        except asyncio.QueueFull:
            log.warning("outgoing queue full; dropping %s", getattr(msg, "type", "message"))
            return False
        return True

    def live_sessions(self) -> list[SessionRef]:
        """Sessions this agent believes are live (its state file), reported in ``hello``."""
        return self.sessions.live()

    async def run(self) -> int:
        """Connect and stay connected until stopped. Returns the process exit code."""
        failures = 0
        keeper: asyncio.Task[None] | None = None
        try:
            # Wipe what sessions left after a crash or reboot before reporting to the server;
            # their receipts go out after the first welcome.
            await self.sessions.recover()
            keeper = asyncio.create_task(self.sessions.warm.run(), name="warm-pool")
            while not self.close_requested:
                self.state = ConnectionState.CONNECTING
                conn = asyncio.create_task(self._connect_once())
                stopping = asyncio.create_task(self._stop.wait())
                done, _ = await asyncio.wait({conn, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if conn not in done:
                    await self._close_for_stop(conn)
                    break
                stopping.cancel()
                try:
                    conn.result()
                except FatalError as exc:
                    self.last_disconnect_reason = exc.message
                    log.critical("%s", exc.message)
                    return exc.exit_code
                except Exception as exc:  # the outer loop never dies on a surprise
                    self.last_disconnect_reason = f"unexpected error: {exc!r}"
                    log.exception("connection failed unexpectedly")
                if self.close_requested:
                    break
                self.state = ConnectionState.DISCONNECTED
                spread = 0.0
                if self._got_welcome:
                    failures = 0
                    # A connection that was up: the whole fleet of that server process may have
                    # lost it this moment (restart, kill -9); spread over the server's window.
                    if self.welcome is not None:
                        spread = self.welcome.reconnect_window_seconds or 0.0
                if self._rate_limited:
                    failures = max(failures, 3)
                if self._server_behind:
                    failures = max(failures, 32)
                delay = max(self._backoff_delay(failures), self._spread_delay(spread))
                failures += 1
                log.info("disconnected (%s); retrying in %.2fs", self.last_disconnect_reason, delay)
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                    await wait_for(self._stop.wait(), delay)
        finally:
            self.state = ConnectionState.DISCONNECTED
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            # Socket first, then the children (SIGTERM → grace → SIGKILL). Their records stay in
            # the state file, so the next start wipes them and sends the receipts.
            await self.sessions.shutdown()
        log.info("stopped")
        return EXIT_OK

    # --- connection ---------------------------------------------------------------------------

    def _backoff_delay(self, failures: int) -> float:
        ceiling = min(
            self.config.backoff_max, self.config.backoff_initial * 2.0 ** min(failures, 32)
        )
        return max(0.0, min(ceiling, self._jitter(ceiling)))

    def _spread_delay(self, window: float) -> float:
        return max(0.0, min(window, self._jitter(window))) if window > 0 else 0.0

    async def _close_for_stop(self, conn: asyncio.Task[None]) -> None:
        self.state = ConnectionState.STOPPING
        ws = self._ws
        if ws is not None:
            # Bounded by close_timeout; the reader then sees ConnectionClosedOK and ends.
            with contextlib.suppress(Exception):
                await ws.close(1000, "agent stopping")
        conn.cancel()
        await asyncio.gather(conn, return_exceptions=True)

    async def _connect_once(self) -> None:
        """One connection attempt and its lifetime. Returns (or raises a non-fatal error) when
        the caller should reconnect; raises :class:`FatalError` when it should stop."""
        self._got_welcome = False
        self._rate_limited = False
        self._server_too_old = False
        self._server_behind = False
        url = self.config.websocket_url
        log.info("connecting to %s", url)
        try:
            ws = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {self.config.credential}"},
                user_agent_header=f"nexcompute-agent/{__version__}",
                max_size=MAX_FRAME_BYTES,
                open_timeout=OPEN_TIMEOUT,
                ping_interval=PING_INTERVAL,
                close_timeout=CLOSE_TIMEOUT,
                logger=_WS_LOGGER,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                api = await asyncio.to_thread(credential_status, self.config.server,
                                              self.config.credential)  # fmt: skip
                if api in (401, 403):
                    raise FatalError(
                        EXIT_CREDENTIAL,
                        f"credential refused by server (revoked or wrong); re-enroll "
                        f"(HTTP {status}, API {api})",
                    ) from None
                # Not confirmed: daphne answers 403 to a handshake not accepted in time.
                log.warning("handshake refused (HTTP %s) but the API answered %s: retrying",
                            status, api or "nothing")  # fmt: skip
                self.last_disconnect_reason = f"handshake refused: HTTP {status}; API {api}"
                return
            self.last_disconnect_reason = f"handshake refused: HTTP {status}"
            return
        except (OSError, asyncio.TimeoutError, TimeoutError, WebSocketException) as exc:
            self.last_disconnect_reason = f"cannot connect: {exc or type(exc).__name__}"
            return

        self._ws = ws
        try:
            await self._serve(ws)
        except ConnectionClosed as exc:
            self._on_closed(exc)
        except (asyncio.TimeoutError, TimeoutError):
            self.last_disconnect_reason = f"no welcome within {self.welcome_timeout:g}s"
        finally:
            self._ws = None
            self._outbox = None
            await ws.close()

    def _on_closed(self, exc: ConnectionClosed) -> None:
        code = exc.rcvd.code if exc.rcvd is not None else None
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        suffix = f": {reason}" if reason else ""
        if code == CLOSE_UNAUTHORIZED:
            raise FatalError(EXIT_CREDENTIAL, f"credential revoked by server; re-enroll{suffix}")
        if code == CLOSE_PROTOCOL_VERSION and (
            reason.startswith("protocol_too_new") or self._server_too_old
        ):
            # The server is older than this agent (it is being upgraded, or was rolled back):
            # keep trying, at the longest backoff, rather than take the machine offline for good.
            self._server_behind = True
            self.last_disconnect_reason = (
                f"the server does not speak protocol {PROTOCOL_VERSION} yet{suffix}; "
                "retrying until it is upgraded"
            )
            log.error("%s", self.last_disconnect_reason)
            return
        if code == CLOSE_PROTOCOL_VERSION:
            raise FatalError(
                EXIT_PROTOCOL,
                f"protocol version mismatch: this agent speaks version {PROTOCOL_VERSION}"
                f"{suffix}; upgrade nexcompute-agent",
            )
        if code == CLOSE_REPLACED:
            raise FatalError(
                EXIT_REPLACED,
                "replaced by another agent connected with this machine's credential"
                f"{suffix}; stop the other agent or re-enroll this one",
            )
        self._rate_limited = code == CLOSE_RATE_LIMITED
        if code is None:
            self.last_disconnect_reason = "connection lost (no close frame)"
        else:
            self.last_disconnect_reason = f"connection closed with code {code}{suffix}"

    async def _serve(self, ws: ClientConnection) -> None:
        self._presence = self._sample_presence()
        specs = await asyncio.to_thread(self.probe.specs)
        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            agent_version=__version__,
            hostname=socket.gethostname()[:256] or "unknown",
            specs=specs,
            sessions=self.live_sessions(),
            owner_present=self._presence.owner_present,
            capabilities=list(CAPABILITIES),
        )
        await ws.send(dump(hello))
        welcome = await wait_for(self._await_welcome(ws), self.welcome_timeout)
        self._apply_welcome(welcome)
        self._got_welcome = True
        self._outbox = asyncio.Queue(maxsize=OUTBOX_SIZE)
        self.state = ConnectionState.CONNECTED
        log.info("connected as machine %d (%s)", welcome.machine_id, welcome.name)
        self.sessions.flush()

        tasks = [
            asyncio.create_task(self._reader(ws), name="reader"),
            asyncio.create_task(self._writer(ws, self._outbox), name="writer"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [*tasks, *self._commands]:
                task.cancel()
            await asyncio.gather(*tasks, *self._commands, return_exceptions=True)
            if self.state is ConnectionState.CONNECTED:
                self.state = ConnectionState.DISCONNECTED
            self.sessions.warm.connection_lost()
        for task in done:
            task.result()  # re-raise ConnectionClosed and friends for _connect_once

    async def _await_welcome(self, ws: ClientConnection) -> Welcome:
        while True:
            msg = self._parse(await ws.recv())
            if isinstance(msg, Welcome):
                return msg
            if isinstance(msg, ServerError):
                self._log_server_error(msg)
                self._server_too_old = self._server_too_old or msg.code == "protocol_too_new"
            elif msg is not None:
                log.warning("ignoring %s received before welcome", msg.type)

    def _apply_welcome(self, welcome: Welcome) -> None:
        self.welcome = welcome
        self.heartbeat_seconds = welcome.heartbeat_seconds

    # --- per-connection tasks ------------------------------------------------------------------

    async def _reader(self, ws: ClientConnection) -> None:
        while True:
            msg = self._parse(await ws.recv())
            if msg is None:
                continue
            if isinstance(msg, ServerError):
                self._log_server_error(msg)
            elif isinstance(msg, Welcome):
                self._apply_welcome(msg)
            else:
                task = asyncio.create_task(self._run_command(msg), name=f"command-{msg.type}")
                self._commands.add(task)
                task.add_done_callback(self._commands.discard)

    async def _writer(self, ws: ClientConnection, outbox: asyncio.Queue[str]) -> None:
        while True:
            await ws.send(await outbox.get())

    async def _heartbeat(self) -> None:
        """Send a heartbeat now, then every ``heartbeat_seconds``; poll presence every
        ``presence_poll_seconds`` and send at once when it changes, so an owner who sits down
        reaches the server without waiting for the next beat."""
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        reported: tuple[bool, bool | None] = (self._presence.owner_present, None)  # hello's
        warm_told: bool | None = None
        while True:
            sample = self._sample_presence()
            self._presence = sample
            self.sessions.warm.owner_present = sample.owner_present
            warm = self.sessions.warm.status()
            # Locking or unlocking the screen is news too: the server may count it as leaving.
            changed = (sample.owner_present, sample.locked) != reported
            if changed:
                log.info(
                    "owner %s%s",
                    "present" if sample.owner_present else "absent",
                    " (screen locked)" if sample.locked else "",
                )
            if changed or warm != warm_told or loop.time() >= next_beat:
                metrics = await asyncio.to_thread(self.probe.metrics)
                self.send(
                    Heartbeat(
                        metrics=metrics,
                        owner_present=sample.owner_present,
                        idle_seconds=sample.idle_seconds,
                        locked=sample.locked,
                        warm=warm,
                    )
                )
                warm_told = warm
                reported = (sample.owner_present, sample.locked)
                next_beat = loop.time() + self.heartbeat_seconds
            wait = min(self.config.presence_poll_seconds, next_beat - loop.time())
            self._beat_now.clear()
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await wait_for(self._beat_now.wait(), max(0.0, wait))

    async def _run_command(self, msg: ServerCommand) -> None:
        handler = self.handlers.get(msg.type)
        try:
            if handler is None:
                raise CommandError(f"unsupported command {msg.type}")
            data = await handler(self, msg)
            frame = Reply(msgid=msg.msgid, ok=True, data=data or {})
            dump(frame)  # fail here, not in the writer, if data cannot be serialized
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, CommandError):
                log.exception("handler for %s failed", msg.type)
            error = (str(exc) or type(exc).__name__)[:MAX_TEXT]
            frame = Reply(msgid=msg.msgid, ok=False, error=error)
        self.send(frame)

    # --- helpers -------------------------------------------------------------------------------

    def _parse(self, raw: str | bytes) -> Any:
        try:
            return parse_server_message(raw)
        except ProtocolError as exc:
            log.warning("ignoring a frame from the server: %s", exc)
            return None

    @staticmethod
    def _log_server_error(msg: ServerError) -> None:
        log.warning("server rejected a frame: %s: %s", msg.code, msg.detail)

    def _sample_presence(self) -> PresenceSample:
        try:
            return self.presence.sample()
        except Exception:
            log.exception("presence detector failed; keeping the last sample")
            return self._presence


# --- command handlers ---------------------------------------------------------------------------


@Agent.handler("ping")
async def handle_ping(agent: Agent, msg: Ping) -> dict[str, Any]:
    return {"pong": True}


@Agent.handler("session.start")
async def handle_session_start(agent: Agent, msg: SessionStart) -> dict[str, Any]:
    """Accept at once (ok); progress, ready/failed and receipts follow as their own messages."""
    try:
        return agent.sessions.start(msg)
    except SessionRefused as exc:
        raise CommandError(str(exc)) from None


@Agent.handler("session.stop")
async def handle_session_stop(agent: Agent, msg: SessionStop) -> dict[str, Any]:
    """Accept at once (ok); the receipt follows. ``data.known`` says whether it was live."""
    return agent.sessions.stop(msg)


@Agent.handler("warm.set")
async def handle_warm_set(agent: Agent, msg: WarmSet) -> dict[str, Any]:
    """Keep a warm sandbox or not (sessions/warm.py); ``data.warm``: one is ready now."""
    return agent.sessions.warm.configure(msg)
