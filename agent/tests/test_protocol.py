from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexcompute_agent import protocol as p

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
SPECS = p.Specs(
    cpu_model="Xeon",
    cpu_count=8,
    memory_bytes=16 << 30,
    disk_bytes=500 << 30,
    os="Linux 6.1 (Debian GNU/Linux 12)",
    gpus=[p.Gpu(name="NVIDIA H200", memory_bytes=141 << 30)],
)

AGENT_MESSAGES: list[Any] = [
    p.Hello(
        protocol_version=p.PROTOCOL_VERSION,
        agent_version="0.1.0",
        hostname="lab-1",
        specs=SPECS,
        sessions=[p.SessionRef(session_id=3, state="running")],
        owner_present=False,
    ),
    p.Heartbeat(
        metrics=p.Metrics(cpu_percent=12.5, memory_percent=40, gpu_percent=3.0),
        owner_present=True,
        idle_seconds=12.0,
    ),
    p.Reply(msgid=p.new_msgid(), ok=True, data={"pong": True}),
    p.Reply(msgid=p.new_msgid(), ok=False, error="nope"),
    p.SessionProgress(session_id=1, step="jupyter_starting", message="starting JupyterLab"),
    p.SessionReady(session_id=1, url="https://lab-1.example.edu/?token=x"),
    p.SessionFailed(session_id=1, error="jupyter exited 1"),
    p.SessionReceipt(
        session_id=1,
        verified=True,
        files_removed=10,
        bytes_removed=2048,
        processes_killed=2,
        duration_seconds=1.5,
        details=["removed /w/1"],
    ),
    p.SessionActivity(session_id=1, last_activity=NOW, kernels_busy=1, connections=2),
]
SERVER_MESSAGES: list[Any] = [
    p.Welcome(machine_id=1, name="lab-1", heartbeat_seconds=10, server_time=NOW),
    p.Ping(msgid=p.new_msgid()),
    p.SessionStart(msgid="m1", session_id=1, token="tok", duration_seconds=3600),
    p.SessionStop(msgid="m2", session_id=1, reason="user"),
    p.ServerError(code="invalid", detail="heartbeat.metrics: Field required"),
]


@pytest.mark.parametrize("msg", AGENT_MESSAGES, ids=lambda m: m.type)
def test_agent_messages_round_trip(msg: Any) -> None:
    wire = p.dump(msg)
    assert " " not in wire.split('"type"')[0]  # compact
    assert p.parse_agent_message(wire) == msg
    assert p.parse_agent_message(wire.encode()) == msg


@pytest.mark.parametrize("msg", SERVER_MESSAGES, ids=lambda m: m.type)
def test_server_messages_round_trip(msg: Any) -> None:
    assert p.parse_server_message(p.dump(msg)) == msg


def test_directions_do_not_mix() -> None:
    with pytest.raises(p.ProtocolError) as exc:
        p.parse_server_message(p.dump(AGENT_MESSAGES[1]))
    assert exc.value.code == "unknown_type"
    assert p.AGENT_MESSAGE_TYPES.isdisjoint(p.SERVER_MESSAGE_TYPES)


def _code(raw: str | bytes, agent: bool = True) -> str:
    parse = p.parse_agent_message if agent else p.parse_server_message
    with pytest.raises(p.ProtocolError) as exc:
        parse(raw)
    return exc.value.code


def test_unknown_fields_are_rejected() -> None:
    data = json.loads(p.dump(AGENT_MESSAGES[1]))
    data["extra"] = 1
    assert _code(json.dumps(data)) == "invalid"
    data = json.loads(p.dump(AGENT_MESSAGES[0]))
    data["specs"]["extra"] = 1
    assert _code(json.dumps(data)) == "invalid"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ('{"type": "nope"}', "unknown_type"),
        ('{"no_type": 1}', "invalid"),
        ('{"type": 5}', "invalid"),
        ("[1, 2]", "invalid"),
        ('"hello"', "invalid"),
        ("{", "bad_json"),
        ('{"type": "heartbeat", "x": NaN}', "bad_json"),
        (b"\xff\xfe", "bad_json"),
        ("[" * 50_000, "bad_json"),
        (
            '{"type":"reply","msgid":"a","ok":true,"data":{"x":' + "[" * 5000 + "]" * 5000 + "}}",
            "bad_json",
        ),
        (
            '{"type": "heartbeat", "owner_present": true, "metrics": {"cpu_percent": 101, '
            '"memory_percent": 1}}',
            "invalid",
        ),
        ('{"type": "reply", "msgid": "", "ok": true}', "invalid"),
    ],
)
def test_bad_frames_are_rejected_with_a_code(raw: str | bytes, code: str) -> None:
    assert _code(raw) == code


def test_oversize_frames_are_rejected() -> None:
    body = json.dumps(
        {"type": "reply", "msgid": "a", "ok": True, "data": {"x": "y" * p.MAX_FRAME_BYTES}}
    )
    assert _code(body) == "too_large"
    assert _code(body.encode()) == "too_large"
    # Multi-byte characters count as bytes, not characters.
    wide = json.dumps(
        {"type": "session.failed", "session_id": 1, "error": "é" * 40_000}, ensure_ascii=False
    )
    assert len(wide) < p.MAX_FRAME_BYTES < len(wide.encode())
    assert _code(wide) == "too_large"


BIG, INT32 = 2**62, 2**31 - 1


def _with(msg: Any, path: tuple[Any, ...], value: Any) -> str:
    data = json.loads(p.dump(msg))
    obj = data
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value
    return json.dumps(data)


# (message, path to the field, largest accepted value): numbers the server stores in bigint or
# integer columns are bounded so they cannot overflow them.
BOUNDED: list[tuple[Any, tuple[Any, ...], int | float]] = [
    (AGENT_MESSAGES[0], ("specs", "memory_bytes"), BIG),
    (AGENT_MESSAGES[0], ("specs", "disk_bytes"), BIG),
    (AGENT_MESSAGES[0], ("specs", "gpus", 0, "memory_bytes"), BIG),
    (AGENT_MESSAGES[0], ("sessions", 0, "session_id"), BIG),
    (AGENT_MESSAGES[7], ("files_removed",), BIG),
    (AGENT_MESSAGES[7], ("bytes_removed",), BIG),
    (AGENT_MESSAGES[7], ("duration_seconds",), float(BIG)),
    (AGENT_MESSAGES[7], ("processes_killed",), INT32),
    (AGENT_MESSAGES[7], ("session_id",), BIG),
    (AGENT_MESSAGES[8], ("kernels_busy",), INT32),
    (AGENT_MESSAGES[8], ("connections",), INT32),
    (AGENT_MESSAGES[8], ("session_id",), BIG),
    (AGENT_MESSAGES[4], ("session_id",), BIG),
    (SERVER_MESSAGES[0], ("machine_id",), BIG),
    (SERVER_MESSAGES[2], ("session_id",), BIG),
    (SERVER_MESSAGES[2], ("duration_seconds",), BIG),
    (SERVER_MESSAGES[2], ("memory_limit_bytes",), BIG),
    (SERVER_MESSAGES[3], ("session_id",), BIG),
]


@pytest.mark.parametrize(
    ("msg", "path", "top"),
    BOUNDED,
    ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else None,
)
def test_numbers_have_upper_bounds(msg: Any, path: tuple[Any, ...], top: float) -> None:
    agent = msg.type in p.AGENT_MESSAGE_TYPES
    parse = p.parse_agent_message if agent else p.parse_server_message
    assert parse(_with(msg, path, top))  # the bound itself is accepted
    too_big = top * 2 if isinstance(top, float) else top + 1
    for value in (too_big, 2**63, 2**64, 10**30):
        assert _code(_with(msg, path, value), agent=agent) == "invalid", (path, value)


def test_datetimes_must_be_aware() -> None:
    raw = p.dump(SERVER_MESSAGES[0]).replace("Z", "")
    assert _code(raw, agent=False) == "invalid"


def test_close_codes() -> None:
    assert (p.CLOSE_UNAUTHORIZED, p.CLOSE_PROTOCOL_VERSION, p.CLOSE_REPLACED) == (4001, 4002, 4003)
    assert (p.CLOSE_RATE_LIMITED, p.CLOSE_POLICY, p.CLOSE_TOO_BIG) == (4008, 4000, 4009)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
known_types = sorted(p.AGENT_MESSAGE_TYPES | p.SERVER_MESSAGE_TYPES)
field_names = st.sampled_from(
    ["msgid", "ok", "data", "session_id", "metrics", "specs", "owner_present", "step", "url"]
)
frames = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.builds(
        lambda t, fields: json.dumps({"type": t, **fields}),
        st.sampled_from(known_types) | st.text(max_size=12),
        st.dictionaries(field_names | st.text(max_size=8), json_values, max_size=6),
    ),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_fuzz_parsers_only_raise_protocol_error(raw: str | bytes) -> None:
    for parse in (p.parse_agent_message, p.parse_server_message):
        try:
            parse(raw)
        except p.ProtocolError as exc:
            assert exc.code in {"too_large", "bad_json", "unknown_type", "invalid"}


def test_the_session_capability_goes_only_to_agents_that_know_it() -> None:
    start = p.SessionStart(
        msgid="m1", session_id=3, token="t", duration_seconds=60, capability="nxcap_3_" + "x" * 43
    )
    new = json.loads(p.dump_for(start, 2, frozenset(p.CAPABILITIES)))
    assert new["capability"] == "nxcap_3_" + "x" * 43
    assert p.SessionStart.model_validate(new) == start
    # An agent of the previous release (strict frames, no such field) is sent none.
    old = json.loads(p.dump_for(start, 2, frozenset({"session.limits", "session.adopt"})))
    assert "capability" not in old
    v1 = json.loads(p.dump_for(start, 1, frozenset(p.CAPABILITIES_V1)))
    assert "capability" not in v1
    # And without one, the agent's start frame is still valid (the extension shows no lease).
    assert p.SessionStart.model_validate({**new, "capability": None}).capability is None
