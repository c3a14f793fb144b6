"""Channel-layer group names and the after-commit senders every service uses.

Messages carry dotted, feature-prefixed types (``session.updated``, ``dashboard.machines``;
the events for an agent's connection are built in ``nexcompute.agent_events``). Nothing that
must not be lost depends on a group message alone: the database is the truth, and agents and
browsers resync it when they (re)connect.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
from typing import Any

from asgiref.sync import SyncToAsync, async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

DASHBOARD_GROUP = "dashboard"


def machine_group(machine_id: int) -> str:
    return f"machine.{machine_id}"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


def _in_async_thread() -> bool:
    """True in a thread that ``sync_to_async`` runs (a view under daphne, a consumer's database
    call): ``async_to_sync`` then hops to that event loop, which costs little."""
    loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    pid = getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None)
    return loop is not None and pid == os.getpid() and loop.is_running()


class _Sender:
    """One event loop thread per process that sends, in order, what plain threads (Celery
    tasks, commands, benches) hand it.

    From a thread with no event loop, ``async_to_sync`` starts a new thread and a new loop for
    each call, and channels-redis a new Redis pool for each loop: three pushes after a session
    request cost three threads, three loops and three Redis connections, about 2 s per granted
    request at 32 concurrent requests (bench/allocate.py; the GIL queue makes each step slow).
    Here they cost a queue put; the request does not wait for Redis.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] | None = None
        self.pending = 0

    def _start(self) -> asyncio.AbstractEventLoop:
        with self.lock:
            if self.loop is None or self.pid != os.getpid():  # first use, or a forked child
                loop = asyncio.new_event_loop()
                self.queue = None
                ready = threading.Event()
                threading.Thread(
                    target=self._run, args=(loop, ready), name="channel-sender", daemon=True
                ).start()
                ready.wait(5)
                self.loop, self.pid = loop, os.getpid()
                atexit.register(self.drain, 2.0)
            return self.loop

    def _run(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        self.queue = asyncio.Queue()
        loop.create_task(self._pump(self.queue))
        ready.set()
        loop.run_forever()

    async def _pump(self, queue: asyncio.Queue[tuple[str, dict[str, Any]]]) -> None:
        while True:
            group, message = await queue.get()
            await _send_async(group, message)
            with self.lock:
                self.pending -= 1

    def submit(self, group: str, message: dict[str, Any]) -> None:
        loop = self._start()
        with self.lock:
            self.pending += 1
        loop.call_soon_threadsafe(self._put, group, message)

    def _put(self, group: str, message: dict[str, Any]) -> None:
        assert self.queue is not None
        self.queue.put_nowait((group, message))

    def drain(self, timeout: float) -> bool:
        """Wait until everything submitted is sent (at exit: a command's last push)."""
        deadline = time.monotonic() + timeout
        while self.pending > 0 and self.pid == os.getpid() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.pending <= 0


_sender = _Sender()


def start_sender() -> None:
    """Start this process's sender thread now, if the layer is one that needs it (Redis)."""
    from django.conf import settings

    backend = str(settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", ""))
    if backend and not backend.endswith("InMemoryChannelLayer"):
        _sender._start()


async def _send_async(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(group, message)
    except Exception:  # the push is best effort; the database already holds the truth
        log.exception("channel layer send to %s failed", group)
        from nexcompute.metrics import count_channel_failure

        count_channel_failure(group.split(".", 1)[0])


def _send_now(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    if isinstance(layer, InMemoryChannelLayer) or _in_async_thread():
        # In-memory (tests, one process): its queues belong to the caller's loop.
        async_to_sync(_send_async)(group, message)
    else:
        _sender.submit(group, message)


def send_on_commit(group: str, message: dict[str, Any]) -> None:
    """Send ``message`` to ``group`` once the current transaction commits (at once if none)."""
    transaction.on_commit(lambda: _send_now(group, message))


def session_updated_on_commit(user_id: int, session_id: int) -> None:
    send_on_commit(
        user_group(user_id),
        {"type": "session.updated", "session_id": session_id, "owner_id": user_id},
    )


def machine_updated_on_commit(snapshot: dict[str, Any]) -> None:
    """Tell dashboards a machine changed (status, presence); ``snapshot`` is its public view."""
    send_on_commit(DASHBOARD_GROUP, {"type": "dashboard.machines", "machines": [snapshot]})
