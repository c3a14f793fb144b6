"""The agent's wait_for never loses a cancellation (asyncio.wait_for before 3.12 does: a stop
that lands as a poll finishes was swallowed, and the polling loop ran on until its deadline)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from nexcompute_agent.aio import wait_for, wait_for_compat

WaitFor = Callable[[Awaitable[Any], float], Awaitable[Any]]
IMPLEMENTATIONS = [
    pytest.param(wait_for, id="wait_for"),
    pytest.param(wait_for_compat, id="compat"),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("outcome", ["result", "error"])
async def test_a_cancel_that_lands_as_the_operation_finishes_is_not_lost(
    impl: WaitFor, outcome: str
) -> None:
    inner: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    caller = asyncio.create_task(impl(inner, 10))
    while not inner._callbacks:  # the caller is waiting on it
        await asyncio.sleep(0)
    # Same loop iteration: the operation finishes, then the caller is cancelled.
    if outcome == "result":
        inner.set_result(1)
    else:
        inner.set_exception(OSError("connection refused"))
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_it_returns_the_result_and_raises_the_error(impl: WaitFor) -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> int:
        await asyncio.sleep(0)
        raise OSError("refused")

    assert await impl(answer(), 5) == 42
    with pytest.raises(OSError, match="refused"):
        await impl(fail(), 5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_it_times_out_with_the_builtin_error_and_cancels_the_operation(
    impl: WaitFor,
) -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    with pytest.raises(TimeoutError):
        await impl(forever(), 0.01)
    assert cancelled.is_set()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_cancelling_the_caller_cancels_the_operation(impl: WaitFor) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    caller = asyncio.create_task(impl(forever(), 10))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert cancelled.is_set()
