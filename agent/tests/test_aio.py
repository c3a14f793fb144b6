"""The agent's wait_for never loses a cancellation (asyncio.wait_for before 3.12 does: a stop
that lands as a poll finishes was swallowed, and the polling loop ran on until its deadline);
to_thread_settled does not let a cancelled caller go on while its thread still runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from nexcompute_agent.aio import to_thread_settled, wait_for, wait_for_compat

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


async def test_a_cancelled_caller_goes_on_only_after_its_thread_finished() -> None:
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    def step() -> int:  # e.g. starting Jupyter: the wipe must not run before it returns
        entered.set()
        release.wait(10)
        finished.set()
        return 1

    caller = asyncio.create_task(to_thread_settled(step))
    assert await asyncio.to_thread(entered.wait, 10)
    caller.cancel()
    done, _ = await asyncio.wait({caller}, timeout=0.2)
    assert not done  # asyncio.to_thread would have raised CancelledError at once
    caller.cancel()  # a second cancel does not cut the wait short either
    done, _ = await asyncio.wait({caller}, timeout=0.1)
    assert not done
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished.is_set()


async def test_to_thread_settled_returns_and_raises_like_to_thread() -> None:
    def fail() -> None:
        raise OSError("no such user")

    assert await to_thread_settled(lambda x: x + 1, 41) == 42
    with pytest.raises(OSError, match="no such user"):
        await to_thread_settled(fail)
