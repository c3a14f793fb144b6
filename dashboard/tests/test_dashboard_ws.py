"""Who may open ``/ws/dashboard/`` and what each student receives on it (in-memory layer)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.test import Client

from accounts.models import User
from accounts.services import default_policy
from machines.services import enrollment_token_create, lab_get_or_create, machine_enroll
from nexcompute import realtime
from nexcompute.asgi import application
from sessions.models import ComputeSession, SessionEvent
from sessions.services import session_event, session_request
from tests.communicator import WebsocketCommunicator
from tests.factories import LabFactory, MachineFactory

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = b"http://127.0.0.1:8000"


@pytest.fixture(autouse=True)
def _in_memory_layer(in_memory_layer: None) -> None:
    """Every test here uses the in-process channel layer (fixture in conftest.py)."""


def cookie_for(user: User) -> str:
    client = Client()
    client.force_login(user)
    return str(client.cookies["sessionid"].value)


async def socket(user: User | None, origin: bytes = ORIGIN) -> WebsocketCommunicator:
    headers = [(b"origin", origin), (b"host", b"127.0.0.1:8000")]
    if user is not None:
        cookie = await sync_to_async(cookie_for)(user)
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    return WebsocketCommunicator(application, "/ws/dashboard/", headers=headers)


async def open_socket(user: User) -> WebsocketCommunicator:
    comm = await socket(user)
    ok, _ = await comm.connect()
    assert ok
    return comm


async def messages(comm: WebsocketCommunicator, timeout: float = 0.3) -> list[dict[str, Any]]:
    """Everything the socket receives until it has been quiet for ``timeout`` seconds."""
    out = []
    # receive_nothing, not a receive timeout: a timed-out receive cancels the consumer.
    while not await comm.receive_nothing(timeout=timeout):
        out.append(await comm.receive_json_from())
    return out


async def test_an_anonymous_socket_is_refused() -> None:
    comm = await socket(None)
    ok, _ = await comm.connect()
    assert not ok
    await comm.disconnect()


@pytest.mark.parametrize("origin", [b"http://evil.example", b"null", b""])
async def test_a_foreign_origin_is_refused_even_with_a_valid_session(
    owner: User, origin: bytes
) -> None:
    comm = await socket(owner, origin=origin)
    ok, _ = await comm.connect()
    assert not ok
    await comm.disconnect()


async def test_a_student_never_receives_another_students_session_events(
    owner: User, other: User
) -> None:
    machines = await sync_to_async(lambda: [MachineFactory.create() for _ in range(2)])()
    mine_socket, theirs_socket = await open_socket(owner), await open_socket(other)

    def start() -> tuple[ComputeSession, ComputeSession]:
        mine = session_request(user=owner, machine_id=machines[0].pk)
        theirs = session_request(user=other, machine_id=machines[1].pk)
        session_event(mine, SessionEvent.Kind.WARNING, "Owner returned: saving time.")
        return mine, theirs

    mine, theirs = await sync_to_async(start)()
    got_mine = [m for m in await messages(mine_socket) if m["type"] == "session"]
    got_theirs = [m for m in await messages(theirs_socket) if m["type"] == "session"]
    assert got_mine and {m["session_id"] for m in got_mine} == {mine.pk}
    assert got_theirs and {m["session_id"] for m in got_theirs} == {theirs.pk}

    # Even a message wrongly addressed to the owner's group with another owner is dropped.
    layer = get_channel_layer()
    await layer.group_send(
        realtime.user_group(owner.pk),
        {"type": "session.updated", "session_id": theirs.pk, "owner_id": other.pk},
    )
    assert [m for m in await messages(mine_socket) if m["type"] == "session"] == []
    await mine_socket.disconnect()
    await theirs_socket.disconnect()


async def test_a_student_does_not_receive_machines_of_labs_their_policy_forbids(
    owner: User,
) -> None:
    def setup() -> tuple[int, int]:
        allowed, forbidden = LabFactory.create(name="Open"), LabFactory.create(name="Shut")
        default_policy().labs.add(allowed)
        return MachineFactory.create(lab=allowed).pk, MachineFactory.create(lab=forbidden).pk

    seen, hidden = await sync_to_async(setup)()
    comm = await open_socket(owner)
    layer = get_channel_layer()
    await layer.group_send(
        realtime.DASHBOARD_GROUP,
        {
            "type": "dashboard.machines",
            "machines": [{"id": seen, "status": "busy"}, {"id": hidden, "status": "available"}],
        },
    )
    got = await messages(comm)
    assert got == [{"type": "machines", "machines": [{"id": seen, "status": "busy"}]}]
    # A batch of forbidden machines only is not sent at all.
    await layer.group_send(
        realtime.DASHBOARD_GROUP,
        {"type": "dashboard.machines", "machines": [{"id": hidden, "status": "offline"}]},
    )
    assert await messages(comm) == []
    await comm.disconnect()


async def test_a_machine_enrolled_after_the_socket_opened_reaches_it(owner: User) -> None:
    comm = await open_socket(owner)
    await asyncio.sleep(0.6)  # past the visible-set reload limit

    def enroll() -> int:
        _, token = enrollment_token_create(lab=lab_get_or_create(name="New lab"))
        machine, _ = machine_enroll(token=token, hostname="fresh-pc")
        return machine.pk

    machine_id = await sync_to_async(enroll)()
    got = await messages(comm)
    ids = {m["id"] for msg in got if msg["type"] == "machines" for m in msg["machines"]}
    assert machine_id in ids
    await comm.disconnect()
