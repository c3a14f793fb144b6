"""The agent consumer in-process (WebsocketCommunicator, in-memory layer): auth, bad frames,
floods, and a raw frame fuzzer of 10,000 frames."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import threading
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from machines.models import Machine, MachineStatus
from machines.services import enrollment_token_create, lab_get_or_create, machine_enroll
from nexcompute.asgi import application
from nexcompute_agent import protocol
from tests.communicator import WebsocketCommunicator
from tests.factories import AGENT_SPECS, MachineFactory

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = {
    "type": "hello",
    "protocol_version": protocol.PROTOCOL_VERSION,
    "agent_version": "0.1.0",
    "hostname": "pc1",
    "specs": AGENT_SPECS,
    "sessions": [],
    "owner_present": False,
    "capabilities": list(protocol.CAPABILITIES),
}
BEAT = {
    "type": "heartbeat",
    "metrics": {"cpu_percent": 5.0, "memory_percent": 30.0},
    "owner_present": False,
}


@pytest.fixture(autouse=True)
def _in_memory_layer(in_memory_layer: None) -> None:
    """Every test here uses the in-process channel layer (fixture in conftest.py)."""


@pytest.fixture
def credential(db: Any) -> str:
    _, token = enrollment_token_create(lab=lab_get_or_create(name="Lab"))
    _, cred = machine_enroll(token=token, hostname="pc1")
    return cred


def communicator(credential: str | None) -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {credential}".encode())] if credential else []
    return WebsocketCommunicator(application, "/ws/agent/", headers=headers)


async def connected(credential: str) -> WebsocketCommunicator:
    comm = communicator(credential)
    ok, _ = await comm.connect()
    assert ok
    await comm.send_json_to(HELLO)
    welcome = await comm.receive_json_from(timeout=5)
    assert welcome["type"] == "welcome"
    return comm


async def machine_status() -> str:
    return await sync_to_async(lambda: Machine.objects.get().status)()


@pytest.mark.parametrize("token", [None, "nxm_wrong", "x" * 500])
async def test_it_refuses_a_missing_or_wrong_credential(credential: str, token: str | None) -> None:
    comm = communicator(token)
    ok, _ = await comm.connect()
    assert not ok


async def test_it_refuses_a_revoked_credential(credential: str) -> None:
    await sync_to_async(Machine.objects.update)(credential_revoked_at="2026-01-01T00:00:00Z")
    ok, _ = await communicator(credential).connect()
    assert not ok


async def test_it_refuses_another_machines_credential_digest(credential: str) -> None:
    # Same lookup prefix, different secret: still refused.
    ok, _ = await communicator(credential[:-4] + "AAAA").connect()
    assert not ok


async def test_hello_brings_the_machine_online_and_close_takes_it_offline(
    credential: str,
) -> None:
    comm = await connected(credential)
    assert await machine_status() == MachineStatus.AVAILABLE
    await comm.disconnect()
    assert await machine_status() == MachineStatus.OFFLINE


async def test_frames_do_not_wait_for_the_shared_sync_thread(credential: str) -> None:
    """A connect storm regression (bench/fleet.py, issues #11/#12): channels' dispatch hopped
    to the one thread-sensitive worker thread before every frame of every connection, so
    thousands of agents queued behind that single thread and handshakes overran daphne's
    connect timeout. With that thread held busy, an agent still connects, says hello, gets
    its welcome and beats."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(30)

    blocker = asyncio.ensure_future(sync_to_async(hold, thread_sensitive=True)())
    try:
        await asyncio.to_thread(held.wait, 10)
        # The attack is real: the shared thread is inside hold(), so anything else sent to
        # it (a thread-sensitive call) waits until release.
        assert held.is_set() and not blocker.done()
        probe = asyncio.ensure_future(sync_to_async(lambda: None, thread_sensitive=True)())
        comm = await connected(credential)  # handshake, hello and welcome
        await comm.send_json_to(BEAT)
        assert await comm.receive_nothing(timeout=0.2)  # handled: no error frame
        assert not probe.done()  # the shared thread was still held throughout
        await comm.disconnect()
    finally:
        release.set()
        await blocker
    await probe


async def test_the_first_frame_must_be_hello(credential: str) -> None:
    comm = communicator(credential)
    await comm.connect()
    await comm.send_json_to(BEAT)
    err = await comm.receive_json_from()
    assert err == {"type": "error", "code": "hello_required", "detail": err["detail"]}
    closed = await comm.receive_output()
    assert closed == {"type": "websocket.close", "code": protocol.CLOSE_POLICY}


# What a protocol-1 agent's Welcome model accepts (extra="forbid": any other key and the agent
# drops the welcome and never connects).
WELCOME_V1_KEYS = {"type", "machine_id", "name", "heartbeat_seconds", "server_time"}
HELLO_V1 = {k: v for k, v in HELLO.items() if k != "capabilities"} | {"protocol_version": 1}


async def test_an_agent_newer_than_the_server_is_told_plainly(credential: str) -> None:
    """A newer agent's hello may carry fields this server has never heard of: the version is
    read first, and the answer names the side to upgrade."""
    comm = communicator(credential)
    await comm.connect()
    newer = protocol.PROTOCOL_VERSION + 1
    await comm.send_json_to({**HELLO, "protocol_version": newer, "field_from_the_future": 1})
    err = await comm.receive_json_from()
    assert err["code"] == "protocol_too_new"
    assert f"agent speaks {newer}" in err["detail"] and "upgrade the server" in err["detail"]
    closed = await comm.receive_output()
    assert closed["code"] == protocol.CLOSE_PROTOCOL_VERSION
    assert closed["reason"].startswith("protocol_too_new: ")
    assert await machine_status() == MachineStatus.OFFLINE


async def test_an_agent_older_than_the_previous_protocol_is_told_to_upgrade(
    credential: str,
) -> None:
    comm = communicator(credential)
    await comm.connect()
    await comm.send_json_to({**HELLO_V1, "protocol_version": protocol.MIN_PROTOCOL_VERSION - 1})
    err = await comm.receive_json_from()
    assert err["code"] == "protocol_too_old" and "upgrade the agent" in err["detail"]
    assert (await comm.receive_output())["code"] == protocol.CLOSE_PROTOCOL_VERSION


@pytest.mark.parametrize(
    "server_version", [protocol.PROTOCOL_VERSION, protocol.PROTOCOL_VERSION + 1]
)
async def test_a_server_serves_an_agent_of_the_previous_protocol(
    credential: str, monkeypatch: pytest.MonkeyPatch, server_version: int
) -> None:
    """A server at protocol N+1 (this one, and one bumped once more) serves an agent speaking
    N: welcome in the form the older agent's models accept, commands without what it lacks."""
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", server_version)
    monkeypatch.setattr(protocol, "MIN_PROTOCOL_VERSION", server_version - 1)
    agent_version = server_version - 1
    comm = communicator(credential)
    await comm.connect()
    hello = HELLO_V1 if agent_version == 1 else {**HELLO, "capabilities": ["session.adopt"]}
    await comm.send_json_to({**hello, "protocol_version": agent_version})
    welcome = await comm.receive_json_from(timeout=5)
    assert welcome["type"] == "welcome", welcome
    if agent_version == 1:
        assert set(welcome) == WELCOME_V1_KEYS
    else:
        assert welcome["protocol_version"] == agent_version
    if agent_version < 4:  # its models forbid the field that came with protocol 4
        assert "reconnect_window_seconds" not in welcome
    assert await machine_status() == MachineStatus.AVAILABLE
    await comm.disconnect()


async def test_welcome_spreads_a_reconnect_storm_over_the_agents_this_process_holds(
    credential: str, settings: Any
) -> None:
    """The window is the agents this process holds at the pace it takes connects: here one
    agent at 4 connects a second, 0.25 s; capped by NEXCOMPUTE_RECONNECT_WINDOW_MAX."""
    from sessions import agent_link

    settings.NEXCOMPUTE_RECONNECT_RATE = 4.0
    agent_link._fleet[0] = -1e9  # no count cached by an earlier test: this one's one machine
    held = agent_link._held[0]
    comm = communicator(credential)
    assert (await comm.connect())[0]
    await comm.send_json_to(HELLO)
    welcome = await comm.receive_json_from(timeout=5)
    assert welcome["reconnect_window_seconds"] == pytest.approx((held + 1) / 4.0)
    # The first agents back after a restart find the process nearly empty: its share of the
    # machines up counts then (30 machines over 2 processes: 15, at 4 a second): 25 up, and 4
    # whose sockets closed a minute ago (offline, coming back). Machines switched off an hour
    # ago do not count: 20 of them, which counting enrolled machines would add.
    await sync_to_async(lambda: MachineFactory.create_batch(25))()
    await sync_to_async(
        lambda: MachineFactory.create_batch(
            4, status=MachineStatus.OFFLINE, last_seen=timezone.now() - dt.timedelta(minutes=1)
        )
    )()
    await sync_to_async(
        lambda: MachineFactory.create_batch(
            20, status=MachineStatus.OFFLINE, last_seen=timezone.now() - dt.timedelta(hours=1)
        )
    )()
    assert await sync_to_async(Machine.objects.count)() == 50
    agent_link._fleet[0] = -1e9  # the cached count is stale
    settings.NEXCOMPUTE_WEB_PROCESSES = 2
    assert await sync_to_async(agent_link.fleet_share)() == 15
    assert agent_link.reconnect_window(15) == pytest.approx(max(held + 1, 15) / 4.0)
    settings.NEXCOMPUTE_RECONNECT_WINDOW_MAX = 0.1
    assert agent_link.reconnect_window() == 0.1
    settings.NEXCOMPUTE_RECONNECT_RATE = 0
    assert agent_link.reconnect_window() == 0.0
    await comm.disconnect()
    assert agent_link._held[0] == held  # the connection counted out when it went


async def test_a_start_leaves_out_what_the_agent_does_not_support(credential: str) -> None:
    """An agent without the ``session.limits`` capability gets the memory limit in the older
    field; one with it gets the limits."""
    start = protocol.SessionStart(
        msgid="m1", session_id=1, token="t", duration_seconds=60,
        limits=protocol.SessionLimits(memory_bytes=1 << 30),
    )  # fmt: skip
    old = json.loads(protocol.dump_for(start, 2, frozenset({"session.adopt"})))
    assert "limits" not in old and old["memory_limit_bytes"] == 1 << 30
    protocol.SessionStart.model_validate(old)
    new = json.loads(protocol.dump_for(start, 2, frozenset(protocol.CAPABILITIES)))
    assert new["limits"]["memory_bytes"] == 1 << 30
    welcome = protocol.Welcome(
        machine_id=1, name="pc", heartbeat_seconds=10, server_time="2026-01-01T00:00:00Z",
        protocol_version=2,
    )  # fmt: skip
    assert set(json.loads(protocol.dump_for(welcome, 1, frozenset()))) == WELCOME_V1_KEYS


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ("[]", "invalid"),
        ('{"type": "nope"}', "unknown_type"),
        (json.dumps({**BEAT, "extra": 1}), "invalid"),
        (json.dumps({**BEAT, "metrics": {"cpu_percent": "high", "memory_percent": 1}}), "invalid"),
        (json.dumps({**BEAT, "metrics": {"cpu_percent": 500, "memory_percent": 1}}), "invalid"),
    ],
)
async def test_a_malformed_frame_gets_an_error_and_the_link_stays(
    credential: str, frame: str, code: str
) -> None:
    comm = await connected(credential)
    await comm.send_to(text_data=frame)
    err = await comm.receive_json_from()
    assert err["type"] == "error"
    assert err["code"] == code
    # Still serving: a valid heartbeat is accepted silently, a bad one answered.
    await comm.send_json_to(BEAT)
    await comm.send_to(text_data="{")
    assert (await comm.receive_json_from())["code"] == "bad_json"
    await comm.disconnect()


async def test_an_oversized_frame_closes_with_4009(credential: str) -> None:
    comm = await connected(credential)
    await comm.send_to(text_data="x" * (protocol.MAX_FRAME_BYTES + 1))
    assert (await comm.receive_output())["code"] == protocol.CLOSE_TOO_BIG


async def test_a_flood_gets_error_frames_then_4008(credential: str, settings: Any) -> None:
    settings.NEXCOMPUTE_AGENT_RATE_BURST = 5
    settings.NEXCOMPUTE_AGENT_RATE_PER_SECOND = 0.001
    comm = await connected(credential)  # the hello used one token
    for _ in range(40):
        await comm.send_json_to(BEAT)
    outputs = []
    while True:
        out = await comm.receive_output(timeout=5)
        outputs.append(out)
        if out["type"] == "websocket.close":
            break
    errors = [json.loads(o["text"]) for o in outputs if o["type"] == "websocket.send"]
    assert errors and all(e["code"] == "rate_limited" for e in errors)
    assert outputs[-1]["code"] == protocol.CLOSE_RATE_LIMITED


async def test_a_newer_connection_replaces_the_older(credential: str) -> None:
    first = await connected(credential)
    second = await connected(credential)
    assert (await first.receive_output())["code"] == protocol.CLOSE_REPLACED
    await first.disconnect()
    assert await machine_status() == MachineStatus.AVAILABLE  # the replaced one did not flap it
    await second.disconnect()


# --- fuzz ---------------------------------------------------------------------------------------

FUZZ_FRAMES = 10_000


def _mutate(rng: random.Random, obj: Any, depth: int = 0) -> Any:
    """One random structural change to a JSON value."""
    if isinstance(obj, dict) and obj and depth < 3 and rng.random() < 0.6:
        key = rng.choice(list(obj))
        out = dict(obj)
        action = rng.randrange(4)
        if action == 0:
            del out[key]
        elif action == 1:
            out[key] = _mutate(rng, out[key], depth + 1)
        elif action == 2:
            out[rng.choice(["x", "msgid", "type", "", "ü" * 3])] = _random_value(rng)
        else:
            out[key] = _random_value(rng)
        return out
    return _random_value(rng)


def _random_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            -1,
            0,
            2**70,
            1e308,
            -0.5,
            "",
            "x" * rng.randrange(300),
            "\u0000\ud7ff",
            [],
            [1, "a", None],
            {},
            {"type": "hello"},
            rng.choice(sorted(protocol.AGENT_MESSAGE_TYPES | protocol.SERVER_MESSAGE_TYPES)),
        ]
    )


def fuzz_frames(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    bases: list[dict[str, Any]] = [
        HELLO,
        BEAT,
        {"type": "reply", "msgid": "abc", "ok": True},
        {"type": "session.progress", "session_id": 1, "step": "ready", "message": "m"},
        {
            "type": "session.receipt",
            "session_id": 1,
            "verified": True,
            "files_removed": 1,
            "bytes_removed": 1,
            "processes_killed": 0,
            "duration_seconds": 1.0,
        },
    ]
    frames = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.75:
            frames.append(json.dumps(_mutate(rng, rng.choice(bases))))
        elif kind < 0.85:
            frames.append(json.dumps(_random_value(rng)))
        elif kind < 0.95:
            raw = json.dumps(rng.choice(bases))
            cut = rng.randrange(len(raw))
            frames.append(raw[:cut] + rng.choice(["", "}", "\\", '"', "\x00"]) + raw[cut + 1 :])
        else:
            frames.append("[" * rng.randrange(1, 5000))
    return frames


def _rejected(frame: str) -> bool:
    try:
        msg = protocol.parse_agent_message(frame)
    except protocol.ProtocolError:
        return True
    # Valid session frames for unknown sessions are answered with an error too.
    return not isinstance(msg, protocol.Hello | protocol.Heartbeat | protocol.Reply)


async def test_fuzz_ten_thousand_frames_get_errors_and_never_break_the_link(
    credential: str, settings: Any
) -> None:
    settings.NEXCOMPUTE_AGENT_RATE_BURST = 10**9  # the flood limit is tested above
    frames = [f for f in fuzz_frames(seed=20261128, n=FUZZ_FRAMES) if '"hello"' not in f]
    assert len(frames) > 8_000
    comm = await connected(credential)
    expected_errors = sum(_rejected(f) for f in frames)
    assert expected_errors > len(frames) // 2  # the fuzzer mostly produces bad frames
    for frame in frames:
        await comm.send_to(text_data=frame)
    await comm.send_to(text_data="{")  # a sentinel: its error is the last output
    errors = 0
    while True:
        out = await comm.receive_output(timeout=30)
        assert out["type"] == "websocket.send", out  # never a close
        body = json.loads(out["text"])
        assert body["type"] == "error"
        assert set(body) == {"type", "code", "detail"}
        errors += 1
        if errors == expected_errors + 1:
            break
    assert await comm.receive_nothing(timeout=0.2)
    # Still online (fuzzed heartbeats may have said the owner is at the keyboard).
    assert await machine_status() in {MachineStatus.AVAILABLE, MachineStatus.OWNER_PRESENT}
    await comm.disconnect()


# --- sessions over the link ---------------------------------------------------------------------


async def test_a_session_runs_through_the_link_and_is_wiped(credential: str) -> None:
    from accounts.models import User
    from sessions.models import ComputeSession
    from sessions.services import session_request, session_stop
    from sessions.states import EndReason

    comm = await connected(credential)
    user = await sync_to_async(User.objects.create)(username="student1")
    session = await sync_to_async(session_request)(user=user)

    start = await comm.receive_json_from(timeout=5)
    assert start["type"] == "session.start"
    assert start["session_id"] == session.pk
    assert start["token"] == session.jupyter_token and len(start["token"]) >= 32

    await comm.send_json_to(
        {
            "type": "session.progress",
            "session_id": session.pk,
            "step": "workspace_ready",
            "message": "Workspace ready.",
        }
    )
    await comm.send_json_to(
        {"type": "session.ready", "session_id": session.pk, "url": "http://127.0.0.1:9/lab"}
    )
    await comm.send_json_to(BEAT)  # an ack-free frame: wait until the ready was handled
    await comm.receive_nothing(timeout=0.3)

    row = await sync_to_async(ComputeSession.objects.get)(pk=session.pk)
    assert row.state == "running"
    assert row.jupyter_url == "http://127.0.0.1:9/lab"
    assert await machine_status() == MachineStatus.BUSY

    await sync_to_async(session_stop)(session=row, reason=EndReason.USER, actor=user)
    stop = await comm.receive_json_from(timeout=5)
    assert stop["type"] == "session.stop" and stop["session_id"] == session.pk
    assert await machine_status() == MachineStatus.CLEANING
    await comm.send_json_to(
        {
            "type": "session.receipt",
            "session_id": session.pk,
            "verified": True,
            "files_removed": 12,
            "bytes_removed": 3456,
            "processes_killed": 2,
            "duration_seconds": 0.5,
        }
    )
    await comm.receive_nothing(timeout=0.3)
    row = await sync_to_async(ComputeSession.objects.get)(pk=session.pk)
    assert row.state == "ended"
    assert row.cleanup_verified is True and row.files_removed == 12
    assert row.jupyter_token == "" and row.jupyter_url == ""
    assert await machine_status() == MachineStatus.AVAILABLE
    await comm.disconnect()


@pytest.mark.parametrize("what", ["start", "report"])
async def test_a_credential_revoked_meanwhile_stops_a_start_and_a_report(
    credential: str, what: str
) -> None:
    """Revoked in the database only (its channel-layer message lost): the credential check
    made in the same database trip as the work refuses both, closes 4001, and does nothing."""
    from accounts.models import User
    from sessions.models import ComputeSession
    from sessions.services import session_request

    comm = await connected(credential)
    user = await sync_to_async(User.objects.create)(username="student1")

    def revoke() -> None:
        Machine.objects.update(credential_revoked_at="2026-01-01T00:00:00Z")

    if what == "start":
        await sync_to_async(revoke)()
        session = await sync_to_async(session_request)(user=user)  # its start comes now
    else:
        session = await sync_to_async(session_request)(user=user)
        start = await comm.receive_json_from(timeout=5)
        assert start["type"] == "session.start"  # the link worked before the revocation
        await sync_to_async(revoke)()
        await comm.send_json_to(
            {"type": "session.ready", "session_id": session.pk, "url": "http://127.0.0.1:9/lab"}
        )
    closed = await comm.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": protocol.CLOSE_UNAUTHORIZED}
    row = await sync_to_async(ComputeSession.objects.get)(pk=session.pk)
    assert row.state == "requested" and row.jupyter_url == ""


async def test_an_agent_cannot_speak_for_another_machines_session(credential: str) -> None:
    from sessions.services import session_request
    from tests.factories import MachineFactory, UserFactory

    other_machine = await sync_to_async(MachineFactory.create)()
    user = await sync_to_async(UserFactory.create)()
    session = await sync_to_async(session_request)(user=user, machine_id=other_machine.pk)
    comm = await connected(credential)
    await comm.send_json_to(
        {"type": "session.ready", "session_id": session.pk, "url": "http://evil/lab"}
    )
    err = await comm.receive_json_from()
    assert err["code"] == "unknown_session"
    await comm.disconnect()


async def test_hello_reconciles_sessions(credential: str) -> None:
    from sessions.models import ComputeSession
    from sessions.services import session_mark_running, session_request
    from tests.factories import UserFactory

    # A session that was running when the agent vanished, and one the agent lists but the
    # server never knew: the first ends as agent_lost, both are wiped.
    comm = await connected(credential)
    user = await sync_to_async(UserFactory.create)()
    session = await sync_to_async(session_request)(user=user)
    assert (await comm.receive_json_from(timeout=5))["type"] == "session.start"
    await sync_to_async(session_mark_running)(session=session, url="http://x/lab")
    await comm.disconnect()

    comm = communicator(credential)
    await comm.connect()
    await comm.send_json_to({**HELLO, "sessions": [{"session_id": 424242, "state": "running"}]})
    assert (await comm.receive_json_from())["type"] == "welcome"
    stops = {(await comm.receive_json_from())["session_id"] for _ in range(2)}
    assert stops == {session.pk, 424242}
    row = await sync_to_async(ComputeSession.objects.get)(pk=session.pk)
    assert (row.state, row.end_reason) == ("ended", "agent_lost")
    # Not offered until the wipe is confirmed.
    assert await machine_status() == MachineStatus.CLEANING
    await comm.disconnect()


async def test_a_silent_agent_is_cut_off_after_the_grace_not_before(
    credential: str, settings: Any
) -> None:
    settings.NEXCOMPUTE_OFFLINE_GRACE_SECONDS = 1.0
    comm = await connected(credential)
    # A beat within the grace keeps it online (no flapping on one late beat)...
    assert await comm.receive_nothing(timeout=0.6)
    await comm.send_json_to(BEAT)
    assert await comm.receive_nothing(timeout=0.6)
    assert await machine_status() == MachineStatus.AVAILABLE
    # ...silence past it closes the socket (a half-open TCP connection) and the machine goes
    # offline once Channels delivers the disconnect.
    closed = await comm.receive_output(timeout=5)
    assert closed["type"] == "websocket.close"
    await comm.disconnect()
    assert await machine_status() == MachineStatus.OFFLINE
