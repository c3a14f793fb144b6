"""The agent link's message loop: CPU per message, channels' loop against ours.

``--connections`` consumers each wait on two sources (the client's receive and the channel
layer's), as every agent websocket does; messages go to them round robin, so each connection's
waiting objects live until its next message, as between two heartbeats. Both loops run in the
same process, alternately, ``--rounds`` times each; the collector runs with the web process's
thresholds (nexcompute/asgi.py) and the paced collections of nexcompute/gc_pacer.py are
simulated by the clock (young every 0.5 s, middle every 2 s of this run's CPU).

    .venv/bin/python bench/dispatch.py --connections 10000 --messages 100000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def one_run(loop_fn: Any, connections: int, messages: int) -> float:
    """CPU µs per message, the collector's share included."""
    queues = [(asyncio.Queue[Any](), asyncio.Queue[Any]()) for _ in range(connections)]
    handled = [0]

    async def dispatch(message: Any) -> None:
        handled[0] += 1

    loops = [
        asyncio.ensure_future(loop_fn([client.get, layer.get], dispatch))
        for client, layer in queues
    ]
    for _ in range(5):  # every loop waits on both sources
        await asyncio.sleep(0)
    gc.collect()
    last = [time.process_time()] * 2
    t0 = time.process_time()
    sent = 0
    batch = 500
    while sent < messages:
        for k in range(batch):
            queues[(sent + k) % connections][0].put_nowait({"type": "websocket.receive"})
        sent += batch
        while handled[0] < sent:
            await asyncio.sleep(0)
        now = time.process_time()  # the pacer, by this run's CPU clock
        if now - last[1] >= 2.0:
            gc.collect(1)
            last[:] = [now, now]
        elif now - last[0] >= 0.5:
            gc.collect(0)
            last[0] = now
    cpu = time.process_time() - t0
    for task in loops:
        task.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    return cpu / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--messages", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from channels.utils import await_many_dispatch

    from nexcompute.consumer_dispatch import dispatch_in_turn

    gc.set_threshold(50_000, 2, 1000)  # as the web process (nexcompute/asgi.py)
    gc.freeze()
    results: dict[str, list[float]] = {"channels": [], "in turn": []}
    for _ in range(args.rounds):
        for name, fn in (("channels", await_many_dispatch), ("in turn", dispatch_in_turn)):
            us = asyncio.run(one_run(fn, args.connections, args.messages))
            results[name].append(us)
            print(f"  {name:8s} {us:6.1f} µs CPU per message", flush=True)
    a, b = statistics.median(results["channels"]), statistics.median(results["in turn"])
    print(
        f"{args.connections} connections, {args.messages} messages per round, "
        f"{args.rounds} rounds: channels' await_many_dispatch median {a:.1f} µs per message, "
        f"dispatch_in_turn median {b:.1f} µs ({a / b:.2f}x less)"
    )


if __name__ == "__main__":
    main()
