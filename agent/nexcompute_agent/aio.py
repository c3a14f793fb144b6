"""asyncio helpers that the standard library gets wrong on the Pythons we support.

``asyncio.wait_for`` before Python 3.12 swallows a cancellation that arrives in the same loop
iteration as the awaited operation finishing: it returns the operation's result (or raises its
error) and the caller's ``task.cancel()`` is lost. A loop that polls with short timeouts (the
agent's readiness and activity polls) then goes on running after it was told to stop, and
whoever awaits it hangs. :func:`wait_for` never loses a cancellation.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float) -> T:
    """Await ``aw`` for at most ``timeout`` seconds; raise the built-in ``TimeoutError`` when it
    runs out (``aw`` is cancelled then). A cancellation of the caller always propagates as
    ``CancelledError``, even when ``aw`` finished at the same moment."""
    if sys.version_info >= (3, 12):
        async with asyncio.timeout(timeout):
            return await aw
    # 3.10 has no asyncio.timeout; 3.11.0-3.11.2's raises CancelledError instead of
    # TimeoutError in a task that once absorbed a cancel (Debian 12 ships 3.11.2).
    return await wait_for_compat(aw, timeout)


async def wait_for_compat(aw: Awaitable[T], timeout: float) -> T:
    """:func:`wait_for` before Python 3.12. Public so that the tests run it on every Python."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: no "exception never retrieved" warning
        raise
    if not done:
        task.cancel()
        await asyncio.wait({task})
        if task.cancelled():
            raise TimeoutError(f"timed out after {timeout:g}s")
    return task.result()


async def to_thread_settled(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread`` that, when the caller is cancelled, waits for the thread to finish
    before raising ``CancelledError``. A cancelled ``to_thread`` returns at once while its thread
    goes on; for a step whose effects must be cleaned up (starting a process, making a
    workspace) the cleanup then races the step. Cancel again while waiting: still waits."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.wait({fut})
            except asyncio.CancelledError:
                continue
        if not fut.cancelled():
            fut.exception()  # the caller was cancelled; the step's own error is moot
        raise


__all__ = ["to_thread_settled", "wait_for", "wait_for_compat"]
