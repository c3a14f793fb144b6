"""The agent link's message loop (nexcompute/consumer_dispatch.py): channels' semantics, one
message at a time, without a task per message."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.exceptions import StopConsumer
from channels.utils import await_many_dispatch

from nexcompute.consumer_dispatch import InTurnDispatch, dispatch_in_turn
from sessions.agent_link import AgentConsumer


class Source:
    """A receive callable over a queue, counting its calls and noting a cancelled wait."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.calls = 0
        self.cancelled = False

    async def __call__(self) -> Any:
        self.calls += 1
        try:
            return await self.queue.get()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_messages_from_both_sources_are_handled_one_at_a_time() -> None:
    client, layer = Source(), Source()
    release = asyncio.Event()
    running: list[str] = []
    most = [0]
    handled: list[str] = []

    async def dispatch(message: str) -> None:
        running.append(message)
        most[0] = max(most[0], len(running))
        if message == "a1":
            await release.wait()
        running.remove(message)
        handled.append(message)

    loop = asyncio.create_task(dispatch_in_turn([client, layer], dispatch))
    client.queue.put_nowait("a1")
    client.queue.put_nowait("a2")
    await wait_until(lambda: running == ["a1"])
    layer.queue.put_nowait("b1")
    # The attack: b1 has been received (the layer's queue is empty again) while a1 is still
    # being handled, and the client's next message waits in its queue.
    await wait_until(lambda: layer.queue.empty())
    await asyncio.sleep(0.05)
    assert running == ["a1"] and handled == []
    assert client.calls == 1 and client.queue.qsize() == 1  # a2 not received before a1 is done
    release.set()
    await wait_until(lambda: len(handled) == 3)
    assert most[0] == 1
    assert handled.index("a1") < handled.index("a2")  # each source in its order
    assert set(handled) == {"a1", "a2", "b1"}
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert client.cancelled and layer.cancelled  # both pumps ended


async def test_stop_consumer_ends_the_loop_and_cancels_the_other_source() -> None:
    client, layer = Source(), Source()

    async def dispatch(message: dict[str, str]) -> None:
        if message["type"] == "websocket.disconnect":
            raise StopConsumer

    loop = asyncio.create_task(dispatch_in_turn([client, layer], dispatch))
    client.queue.put_nowait({"type": "websocket.receive"})
    await wait_until(lambda: client.calls == 2)
    client.queue.put_nowait({"type": "websocket.disconnect"})
    with pytest.raises(StopConsumer):
        await asyncio.wait_for(loop, 5)
    assert layer.cancelled  # the layer's pending receive was cancelled, not left running


async def test_a_handler_error_propagates() -> None:
    client, layer = Source(), Source()

    async def dispatch(message: str) -> None:
        raise ValueError(f"No handler for message type {message}")

    loop = asyncio.create_task(dispatch_in_turn([client, layer], dispatch))
    layer.queue.put_nowait("nobody.knows")
    with pytest.raises(ValueError, match="nobody.knows"):
        await asyncio.wait_for(loop, 5)
    assert client.cancelled


async def count_tasks_made(run: Any, messages: int) -> int:
    """Tasks created while ``run(receivers, dispatch)`` handles ``messages`` messages."""
    loop = asyncio.get_running_loop()
    made = [0]
    default = loop.get_task_factory()

    def factory(lp: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made[0] += 1
        return asyncio.Task(coro, loop=lp, **kwargs)

    client, layer = Source(), Source()
    handled = [0]

    async def dispatch(message: int) -> None:
        handled[0] += 1

    loop.set_task_factory(factory)
    try:
        task = asyncio.ensure_future(run([client, layer], dispatch))
        for i in range(messages):
            client.queue.put_nowait(i)
            await wait_until(lambda: client.queue.empty())
        await wait_until(lambda: handled[0] == messages)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        loop.set_task_factory(default)
    return made[0] - 1  # not the task that ran it


async def test_no_task_is_made_per_message() -> None:
    # The measure works: channels' loop makes a task for every message (and more).
    assert await count_tasks_made(await_many_dispatch, 200) >= 200
    assert await count_tasks_made(dispatch_in_turn, 200) == 2  # one pump per source


def test_the_agent_link_uses_it() -> None:
    assert AgentConsumer.__call__ is InTurnDispatch.__call__
