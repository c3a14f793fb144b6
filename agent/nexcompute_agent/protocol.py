"""The agent websocket protocol, defined once.

Both ends import this module: the agent to build and parse frames, the Nexus consumer
(``machines/``) to validate every frame it receives. It must never import Django.

Every frame is one JSON object (a websocket text frame) with a ``type``. Requests from the
server carry a ``msgid`` (uuid4 hex); the agent answers each with a ``reply`` that carries the
same ``msgid``. ``docs/protocol.md`` describes the handshake, every message, the close codes
and the reconnect rules.

Contract of the parse functions: for *any* input (bytes or str, any size, any content) they
either return a validated model or raise :class:`ProtocolError`; never another exception type.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, ClassVar, Final, Literal, Union, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION: Final = 4
"""The version this package speaks. 2: ``hello.capabilities``, ``welcome.protocol_version``,
session refs in state ``ended`` (a restarted agent's sessions it could not take back).
3: ``session.activity.source`` and ``cpu_percent`` (the agent's own activity rule).
4: ``welcome.reconnect_window_seconds`` (a fleet's reconnects spread over the server's pace)."""
MIN_PROTOCOL_VERSION: Final = 1
"""The oldest agent protocol the server still serves: at least the previous version, so that a
server upgrade never takes the fleet offline until every PC is upgraded."""
MAX_FRAME_BYTES: Final = 64 * 1024

CAPABILITIES: Final = (
    "session.limits",
    "session.adopt",
    "session.capability",
    "session.warm",
)
"""What this agent can do, sent in ``hello``. The server sends an agent only what it supports.

- ``session.limits``: ``session.start.limits`` (otherwise only ``memory_limit_bytes``).
- ``session.adopt``: sessions outlive an agent restart; hello's sessions may say ``ended``.
- ``session.capability``: ``session.start.capability`` (the session-scoped capability for the
  Jupyter extension; an agent without it is sent none, its frames being strict).
- ``session.warm``: the agent keeps a warm sandbox when told to (``warm.set``) and hands it
  over on ``session.start``; it then reports ``heartbeat.warm`` and sends ``warm.receipt``.
"""
CAPABILITIES_V1: Final = ("session.limits",)
"""What a protocol-1 agent (which sends no capabilities) can do."""

# Websocket close codes. 4000-4999 are ours (RFC 6455, section 7.4.2).
CLOSE_NORMAL: Final = 1000
"""Normal closure (agent shutting down, server restarting). The agent reconnects unless it is
the side that is stopping."""
# Application reasons use 4000-4999 only: daphne refuses to send 1008/1009 (``invalid close
# code``), and the peer then sees 1011 instead of the reason (docs/protocol.md, "Close codes").
CLOSE_POLICY: Final = 4000
"""Policy violation, e.g. the first frame was not ``hello``. The agent reconnects with backoff."""
CLOSE_TOO_BIG: Final = 4009
"""A frame exceeded :data:`MAX_FRAME_BYTES`. The agent reconnects with backoff."""
CLOSE_UNAUTHORIZED: Final = 4001
"""The machine credential was revoked while connected. The agent stops (exit 3): re-enroll."""
CLOSE_PROTOCOL_VERSION: Final = 4002
"""``hello.protocol_version`` is not supported by the server; the close reason (and an
``error`` frame before it) says which side is behind: ``protocol_too_old`` (the agent stops,
exit 4: upgrade it) or ``protocol_too_new`` (the server is older than the agent: the agent keeps
retrying at its longest backoff until the server is upgraded)."""
CLOSE_REPLACED: Final = 4003
"""A newer connection for the same machine replaced this one. The agent stops (exit 5) so that
two agents with one credential do not fight over the machine."""
CLOSE_RATE_LIMITED: Final = 4008
"""The agent sent frames faster than the server allows. The agent reconnects with backoff."""

MAX_STR: Final = 256
MAX_TEXT: Final = 4096
# Upper bounds for numbers the server stores: below a signed 64-bit column (bigint) with room to
# spare, and a signed 32-bit one (integer). Larger values are refused as ``invalid``.
MAX_BIG: Final = 2**62
MAX_INT32: Final = 2**31 - 1
MAX_CPU_PERCENT: Final = 100.0 * 65536  # percent of one core, for any machine's core count

Str = Annotated[str, Field(max_length=MAX_STR)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
MsgId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z_-]+$")]
Percent = Annotated[float, Field(ge=0, le=100)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
BigCount = Annotated[int, Field(ge=0, le=MAX_BIG)]
"""Bytes, files: fits a bigint column."""
Count32 = Annotated[int, Field(ge=0, le=MAX_INT32)]
"""Processes, kernels, connections: fits an integer column."""
SessionId = Annotated[int, Field(ge=1, le=MAX_BIG)]


def new_msgid() -> str:
    """A fresh request id (uuid4 hex)."""
    return uuid.uuid4().hex


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    SINCE: ClassVar[dict[str, int]] = {}
    """Fields added after protocol 1, by the version that added them: left out of what is sent
    to a peer speaking an older version (its models forbid unknown fields)."""
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()
    """Optional fields added by a capability: left out while None, so that a peer without it
    (whose models forbid unknown fields) can still read the frame."""

    def _omitted(self) -> set[str]:
        return {name for name in self.OMIT_IF_NONE if getattr(self, name) is None}


# ---------------------------------------------------------------------------------------------
# Shared parts


class Gpu(_Model):
    name: Str
    memory_bytes: BigCount


class Specs(_Model):
    cpu_model: Str
    cpu_count: Annotated[int, Field(ge=1, le=65536)]
    memory_bytes: BigCount
    disk_bytes: BigCount
    os: Str
    gpus: Annotated[list[Gpu], Field(max_length=64)] = []


class Metrics(_Model):
    cpu_percent: Percent
    memory_percent: Percent
    gpu_percent: Percent | None = None
    gpu_memory_percent: Percent | None = None


class SessionRef(_Model):
    """A session the agent believes is live on this machine (sent in ``hello``)."""

    session_id: SessionId
    state: Str


ProgressStep = Literal[
    "allocated", "workspace_ready", "jupyter_starting", "tunnel_opening", "ready"
]


class SessionLimits(_Model):
    """What one session may use on the machine (from the owner's quota policy). ``None``: the
    agent's own default (see ``docs/sandbox.md``)."""

    memory_bytes: Annotated[int, Field(gt=0, le=MAX_BIG)] | None = None
    """Hard memory limit (RAM + swap) of the whole session."""
    cpu_weight: Annotated[int, Field(ge=1, le=10000)] = 20
    """Share of CPU time under contention, on cgroup v2's scale (100 = a normal process)."""
    cpu_quota: Annotated[float, Field(gt=0, le=65536)] | None = None
    """At most this many CPUs' worth of time; None: all CPUs (the weight still applies)."""
    max_tasks: Annotated[int, Field(ge=16, le=MAX_INT32)] | None = None
    """Processes and threads of the session at once."""
    workspace_bytes: Annotated[int, Field(gt=0, le=MAX_BIG)] | None = None
    """Size of the session's workspace (its temp folders are memory, capped by the memory limit)."""


class WipeCheck(_Model):
    """One check of the wipe's proof (``session.receipt``) and its result."""

    name: Str
    ok: bool
    detail: Text = ""


NoticeKind = Literal["memory_limit", "tasks_limit", "disk_full", "account"]


# ---------------------------------------------------------------------------------------------
# Agent -> server


class Hello(_Model):
    """First frame after the socket opens."""

    type: Literal["hello"] = "hello"
    protocol_version: int
    agent_version: Str
    hostname: Str
    specs: Specs
    sessions: Annotated[list[SessionRef], Field(max_length=256)] = []
    owner_present: bool
    capabilities: Annotated[list[Str], Field(max_length=64)] = []
    """What this agent supports (:data:`CAPABILITIES`); a protocol-1 agent sends none."""

    SINCE: ClassVar[dict[str, int]] = {"capabilities": 2}


class Heartbeat(_Model):
    type: Literal["heartbeat"] = "heartbeat"
    metrics: Metrics
    owner_present: bool
    """Someone is logged in at this computer's own keyboard and screen (not over the network)."""
    idle_seconds: NonNegFloat | None = None
    """How long that person has not touched keyboard or mouse (or has had the screen locked);
    None: the presence source cannot tell. The server counts an owner idle longer than the
    lab's ``owner_idle_minutes`` as away."""
    locked: bool | None = None
    """Their screen is locked (logind's ``LockedHint``); None: the source cannot tell."""
    warm: bool | None = None
    """A warm sandbox is ready to be handed over (``session.warm``). Sent only to a server
    that sent ``warm.set`` on this connection (an older server forbids the field)."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"warm"})


class Reply(_Model):
    """The answer to a server command with the same ``msgid``."""

    type: Literal["reply"] = "reply"
    msgid: MsgId
    ok: bool
    error: Text | None = None
    data: dict[str, Any] = {}


class SessionProgress(_Model):
    type: Literal["session.progress"] = "session.progress"
    session_id: SessionId
    step: ProgressStep
    message: Text


class SessionReady(_Model):
    type: Literal["session.ready"] = "session.ready"
    session_id: SessionId
    url: Annotated[str, Field(min_length=1, max_length=2048)]


class SessionFailed(_Model):
    """The session could not start (``phase`` start) or its Jupyter/tunnel died after
    ``session.ready`` (``phase`` running: the session crashed)."""

    type: Literal["session.failed"] = "session.failed"
    session_id: SessionId
    error: Text
    phase: Literal["start", "running"] = "start"


class SessionNotice(_Model):
    """Something the student should know while the session runs, e.g. a process of the session
    was killed because the session hit its memory limit."""

    type: Literal["session.notice"] = "session.notice"
    session_id: SessionId
    kind: NoticeKind
    message: Text


class SessionReceipt(_Model):
    """Cleanup report after a session ended."""

    type: Literal["session.receipt"] = "session.receipt"
    session_id: SessionId
    verified: bool
    files_removed: BigCount
    bytes_removed: BigCount
    processes_killed: Count32
    duration_seconds: Annotated[float, Field(ge=0, le=MAX_BIG)]
    details: Annotated[list[Text], Field(max_length=256)] = []
    checks: Annotated[list[WipeCheck], Field(max_length=64)] = []
    """The proof: every check run after the sandbox was gone, each with its result.
    ``verified`` is true only when every check passed."""
    account: Str | None = None
    """The session account (pool member) the session ran as."""


ActivitySource = Literal["kernel", "terminal", "lab", "cpu", "gpu", "start"]


class SessionActivity(_Model):
    """The session's activity for the idle rule (docs/policy.md, "Idle"). From protocol 3
    ``last_activity`` is the agent's own rule (the latest of a kernel executing, terminal input,
    the student's interaction in Lab, CPU or GPU use above a threshold; the start as the floor)
    and ``source`` says which one it was; a protocol-2 agent sends Jupyter's
    ``last_activity``."""

    type: Literal["session.activity"] = "session.activity"
    session_id: SessionId
    last_activity: AwareDatetime | None
    kernels_busy: Count32
    connections: Count32
    source: ActivitySource | None = None
    cpu_percent: Annotated[float, Field(ge=0, le=MAX_CPU_PERCENT)] | None = None
    """The session's processes' CPU over the agent's window, in percent of one core."""

    SINCE: ClassVar[dict[str, int]] = {"source": 3, "cpu_percent": 3}


class WarmReceipt(_Model):
    """A warm sandbox that was never handed over was discarded (``warm.set`` disabled it, the
    owner came back, its age ran out, its settings changed): the proof of its wipe, as in
    ``session.receipt``. Sent only to a server that sent ``warm.set``."""

    type: Literal["warm.receipt"] = "warm.receipt"
    reason: Str
    verified: bool
    files_removed: BigCount
    bytes_removed: BigCount
    processes_killed: Count32
    duration_seconds: Annotated[float, Field(ge=0, le=MAX_BIG)]
    details: Annotated[list[Text], Field(max_length=256)] = []
    checks: Annotated[list[WipeCheck], Field(max_length=64)] = []
    account: Str | None = None


# ---------------------------------------------------------------------------------------------
# Server -> agent


class Welcome(_Model):
    """The server's answer to ``hello``; the connection is usable after it."""

    type: Literal["welcome"] = "welcome"
    machine_id: Annotated[int, Field(le=MAX_BIG)]
    name: Str
    heartbeat_seconds: Annotated[float, Field(gt=0, le=3600)]
    server_time: AwareDatetime
    protocol_version: int | None = None
    """The version the server speaks on this connection (the agent's own, when supported)."""
    reconnect_window_seconds: Annotated[float, Field(ge=0, le=3600)] | None = None
    """After this connection is lost, the agent's first reconnect waits a random time in
    ``[0, window)``: every agent of a restarted or killed server process loses its connection
    at the same moment, and the server sets the window from how many agents it holds and how
    many connects a second one process takes (``NEXCOMPUTE_RECONNECT_RATE``)."""

    SINCE: ClassVar[dict[str, int]] = {"protocol_version": 2, "reconnect_window_seconds": 4}


class Ping(_Model):
    """Liveness check; answered with ``reply`` ok=True, data={"pong": True}."""

    type: Literal["ping"] = "ping"
    msgid: MsgId


class SessionAccess(_Model):
    """Cloudflare Access in front of the session (named tunnels, per lab): the session's
    Jupyter refuses every browser request without a valid ``Cf-Access-Jwt-Assertion`` for
    ``email`` (docs/security.md)."""

    team_domain: Annotated[str, Field(min_length=1, max_length=253)]
    """``<team>.cloudflareaccess.com`` (issuer ``https://<team_domain>``)."""
    audience: Annotated[str, Field(min_length=1, max_length=255)]
    """The Access application's AUD tag."""
    email: Annotated[str, Field(min_length=3, max_length=254)]
    """The session owner's email, as the identity provider gives it to Access."""


class SessionStart(_Model):
    type: Literal["session.start"] = "session.start"
    msgid: MsgId
    session_id: SessionId
    token: Annotated[str, Field(min_length=1, max_length=MAX_STR)]
    duration_seconds: Annotated[int, Field(gt=0, le=MAX_BIG)]
    terminals: bool = True
    memory_limit_bytes: Annotated[int, Field(gt=0, le=MAX_BIG)] | None = None
    """Older form of ``limits.memory_bytes``; ``limits`` wins when both are given."""
    limits: SessionLimits | None = None
    nexus_url: Annotated[str, Field(max_length=500)] = ""
    """The Nexus's public base URL; the session's Jupyter links to it when it refuses a
    browser (sign-in happens there)."""
    access: SessionAccess | None = None
    """Cloudflare Access for this session, when its lab has it configured."""
    capability: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    """The session-scoped capability (docs/jupyter-extension.md): lets the session's own
    Jupyter read and extend this session's lease at the Nexus, and nothing else. Optional: a
    server one protocol version older sends none, and the extension then shows no lease."""


class WarmSet(_Model):
    """Whether this machine keeps a warm sandbox, and with what (the lab's default policy):
    sent to agents with ``session.warm`` after ``welcome`` and whenever it changes (the lab
    opens or closes, its warm pool is switched, the policy changes). The agent hands a warm
    sandbox over only for a ``session.start`` with the same ``limits`` and ``terminals``;
    otherwise it discards it and starts cold. The agent itself keeps none while the owner is
    present, while it runs a session, or past ``max_age_seconds``."""

    type: Literal["warm.set"] = "warm.set"
    msgid: MsgId
    enabled: bool
    reason: Str = ""
    """Why not (when disabled), for the agent's log and the discard's receipt."""
    limits: SessionLimits | None = None
    terminals: bool = True
    nexus_url: Annotated[str, Field(max_length=500)] = ""
    max_age_seconds: Annotated[int, Field(ge=60, le=MAX_INT32)] = 3600


class SessionStop(_Model):
    type: Literal["session.stop"] = "session.stop"
    msgid: MsgId
    session_id: SessionId
    reason: Str


class ServerError(_Model):
    """The server rejected a frame; the connection stays up."""

    type: Literal["error"] = "error"
    code: Str
    detail: Text


AgentMessage = Annotated[
    Union[  # noqa: UP007 - a discriminated union needs the Union[...] form on Python 3.10
        Hello,
        Heartbeat,
        Reply,
        SessionProgress,
        SessionReady,
        SessionFailed,
        SessionReceipt,
        SessionActivity,
        SessionNotice,
        WarmReceipt,
    ],
    Field(discriminator="type"),
]
ServerMessage = Annotated[
    Union[Welcome, Ping, SessionStart, SessionStop, WarmSet, ServerError],  # noqa: UP007
    Field(discriminator="type"),
]
ServerCommand = Union[Ping, SessionStart, SessionStop, WarmSet]  # noqa: UP007
"""Server messages that carry a ``msgid`` and expect a ``reply``."""

AGENT_ADAPTER: Final[TypeAdapter[AgentMessage]] = TypeAdapter(AgentMessage)
SERVER_ADAPTER: Final[TypeAdapter[ServerMessage]] = TypeAdapter(ServerMessage)


def _types_of(union: Any) -> frozenset[str]:
    members = get_args(get_args(union)[0])
    return frozenset(get_args(m.model_fields["type"].annotation)[0] for m in members)


AGENT_MESSAGE_TYPES: Final = _types_of(AgentMessage)
SERVER_MESSAGE_TYPES: Final = _types_of(ServerMessage)


class ProtocolError(Exception):
    """A frame that cannot be accepted. ``code`` is one of too_large, bad_json, unknown_type,
    invalid; ``detail`` is short, human-readable and safe to send back in an ``error`` frame."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_object(raw: str | bytes, known: frozenset[str]) -> dict[str, Any]:
    if isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
        if len(data) > MAX_FRAME_BYTES:
            raise ProtocolError("too_large", f"frame exceeds {MAX_FRAME_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_json", "frame is not UTF-8") from None
    elif isinstance(raw, str):
        # A str of n characters encodes to at least n bytes; only encode when it could fit.
        if len(raw) > MAX_FRAME_BYTES or (
            len(raw.encode("utf-8", errors="surrogatepass")) > MAX_FRAME_BYTES
        ):
            raise ProtocolError("too_large", f"frame exceeds {MAX_FRAME_BYTES} bytes")
        text = raw
    else:
        raise ProtocolError("invalid", "frame must be str or bytes")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError; RecursionError comes from absurd nesting.
        raise ProtocolError("bad_json", "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("invalid", "frame must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid", "frame has no string 'type'")
    if kind not in known:
        raise ProtocolError("unknown_type", f"unknown message type {kind[:64]!r}")
    return obj


def _validate(adapter: TypeAdapter[Any], obj: dict[str, Any]) -> Any:
    try:
        return adapter.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[:3]
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(frame)'}: {e['msg']}" for e in first
        )
        raise ProtocolError("invalid", where[:MAX_STR]) from None
    except (ValueError, TypeError, RecursionError):
        raise ProtocolError("invalid", "frame does not match the message schema") from None


def parse_agent_message(raw: str | bytes) -> AgentMessage:
    """Parse a frame sent by an agent. Raises :class:`ProtocolError` and nothing else."""
    msg: AgentMessage = _validate(AGENT_ADAPTER, _load_object(raw, AGENT_MESSAGE_TYPES))
    return msg


def parse_server_message(raw: str | bytes) -> ServerMessage:
    """Parse a frame sent by the server. Raises :class:`ProtocolError` and nothing else."""
    msg: ServerMessage = _validate(SERVER_ADAPTER, _load_object(raw, SERVER_MESSAGE_TYPES))
    return msg


def dump(msg: BaseModel) -> str:
    """Serialize a message as compact JSON (the form sent on the wire)."""
    omitted = msg._omitted() if isinstance(msg, _Model) else set()
    return msg.model_dump_json(exclude=omitted or None)


def dump_for(msg: _Model, version: int, capabilities: frozenset[str] | set[str]) -> str:
    """Serialize ``msg`` for a peer speaking ``version`` with ``capabilities``: what it does not
    support is left out (fields added after its version; ``session.start.limits`` without
    ``session.limits``, the memory limit then in its older form)."""
    exclude = {name for name, since in type(msg).SINCE.items() if since > version}
    exclude |= msg._omitted()
    if isinstance(msg, SessionStart) and "session.capability" not in capabilities:
        exclude.add("capability")
    if isinstance(msg, SessionStart) and "session.limits" not in capabilities:
        exclude.add("limits")
        if msg.limits is not None and msg.limits.memory_bytes and not msg.memory_limit_bytes:
            msg = msg.model_copy(update={"memory_limit_bytes": msg.limits.memory_bytes})
    return msg.model_dump_json(exclude=exclude or None)


def hello_version(raw: str | bytes) -> int | None:
    """``protocol_version`` of a frame that says it is a ``hello``, read before validation (a
    newer agent's hello may carry fields this side does not know); None if there is none."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("type") != "hello":
        return None
    version = data.get("protocol_version")
    if isinstance(version, bool) or not isinstance(version, int):
        return None
    return version


def supported(version: int) -> str | None:
    """None when the server serves an agent speaking ``version``, else the close reason:
    ``protocol_too_old: …`` or ``protocol_too_new: …`` (at most 123 bytes, a close reason)."""
    if version < MIN_PROTOCOL_VERSION:
        return (
            f"protocol_too_old: agent speaks {version}, server {MIN_PROTOCOL_VERSION}-"
            f"{PROTOCOL_VERSION}; upgrade the agent"
        )
    if version > PROTOCOL_VERSION:
        return (
            f"protocol_too_new: agent speaks {version}, server {MIN_PROTOCOL_VERSION}-"
            f"{PROTOCOL_VERSION}; upgrade the server"
        )
    return None


__all__ = [
    "AGENT_MESSAGE_TYPES",
    "SessionAccess",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_PROTOCOL_VERSION",
    "CLOSE_RATE_LIMITED",
    "CLOSE_REPLACED",
    "CLOSE_TOO_BIG",
    "CLOSE_UNAUTHORIZED",
    "CAPABILITIES",
    "CAPABILITIES_V1",
    "MIN_PROTOCOL_VERSION",
    "MAX_BIG",
    "MAX_FRAME_BYTES",
    "MAX_INT32",
    "PROTOCOL_VERSION",
    "SERVER_MESSAGE_TYPES",
    "dump_for",
    "hello_version",
    "supported",
    "AgentMessage",
    "Gpu",
    "Heartbeat",
    "Hello",
    "Metrics",
    "Ping",
    "ProgressStep",
    "ProtocolError",
    "Reply",
    "ServerCommand",
    "ServerError",
    "ServerMessage",
    "SessionActivity",
    "ActivitySource",
    "SessionFailed",
    "SessionLimits",
    "SessionNotice",
    "SessionProgress",
    "SessionReady",
    "SessionReceipt",
    "SessionRef",
    "SessionStart",
    "SessionStop",
    "Specs",
    "WarmReceipt",
    "WarmSet",
    "Welcome",
    "WipeCheck",
    "dump",
    "new_msgid",
    "parse_agent_message",
    "parse_server_message",
]
