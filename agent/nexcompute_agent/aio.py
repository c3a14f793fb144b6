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
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float) -> T:
    """Await ``aw`` for at most ``timeout`` seconds; raise the built-in ``TimeoutError`` when it
    runs out (``aw`` is cancelled then). A cancellation of the caller always propagates as
    ``CancelledError``, even when ``aw`` finished at the same moment."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await aw
    return await wait_for_compat(aw, timeout)  # pragma: no cover - Python 3.10


async def wait_for_compat(aw: Awaitable[T], timeout: float) -> T:
    """:func:`wait_for` for Python 3.10, which has no ``asyncio.timeout``. Public so that the
    tests run it on every Python."""
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


__all__ = ["wait_for", "wait_for_compat"]
