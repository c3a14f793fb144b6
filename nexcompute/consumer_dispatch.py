"""A consumer's message loop without a task and an ``asyncio.wait`` per message.

Channels' ``AsyncConsumer.__call__`` runs ``await_many_dispatch``: for every message it makes a
new task for the next receive and waits on both sources with ``asyncio.wait`` (a waiter future,
a callback closure, a set and a context each time). A connection that beats every 10 s keeps
those objects alive until its next beat, so the collector walks them twice before they reach
the old generation: about 30 tracked objects per heartbeat, the young and middle collections of
a web process holding 6,000-10,000 agents (``nexcompute/gc_pacer.py``; measured with
``gc.get_objects`` in ``bench/fleet.py``'s daphne).

``InTurnDispatch.__call__`` does what channels' does, with one long-lived pump per source (the
client's ``receive`` and the channel layer's) and a lock so that messages are still handled one
at a time, as channels handles them: each source's next message is received only after its last
one was handled, and a message never runs beside another. A handler that raises
``StopConsumer`` (the socket closed) or anything else ends the loop, the other pump is cancelled
(a message it had received and not yet handled is dropped, as channels drops it) and the error
propagates as it does from channels.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from channels.exceptions import StopConsumer
from channels.layers import get_channel_layer

Receive = Callable[[], Awaitable[Any]]


async def dispatch_in_turn(
    receivers: list[Receive], dispatch: Callable[[Any], Awaitable[None]]
) -> None:
    """Receive from every source and ``dispatch`` each message, one at a time, until a
    dispatch raises (``StopConsumer`` included, which the caller catches)."""
    turn = asyncio.Lock()

    async def pump(receive: Receive) -> None:
        while True:
            message = await receive()
            async with turn:
                await dispatch(message)

    pumps = [asyncio.ensure_future(pump(receive)) for receive in receivers]
    try:
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # what ended it (a pump only ends by raising)
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)  # ended, by their ids


class InTurnDispatch:
    """Mixin for an ``AsyncConsumer`` subclass (listed first): its ``__call__`` as channels'
    (channel layer, ``base_send``, ``StopConsumer`` ends it cleanly), with the message loop of
    ``dispatch_in_turn``."""

    channel_layer_alias: str
    dispatch: Callable[[Any], Awaitable[None]]

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Any) -> None:
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        receivers = [receive]
        if self.channel_layer is not None:
            self.channel_name = await self.channel_layer.new_channel()
            self.channel_receive = functools.partial(self.channel_layer.receive, self.channel_name)
            receivers.append(self.channel_receive)
        self.base_send = send
        try:
            await dispatch_in_turn(receivers, self.dispatch)
        except StopConsumer:
            pass
