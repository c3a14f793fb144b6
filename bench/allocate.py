#!/usr/bin/env python
"""Allocation benchmark: many students at once asking for few machines.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/nexcompute .venv/bin/python bench/allocate.py \
        [--requests 500] [--machines 50] [--threads 32]

It creates its own database (``<name>_allocbench``, dropped afterwards unless ``--keep``), so it
never touches dev data; migrates it; creates the machines and one user per request; then
``--threads`` threads, released together, send every request through ``session_request`` (the
service behind ``POST /api/sessions``), each on its own database connection. Prints requests/s,
p50/p99 latency, and how many requests got a machine (must be the machine count) and how many
were refused with 409 (the rest). Exits non-zero if a machine was double-booked or a request
failed any other way.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time

from _common import bench_database_url, drop_database, fresh_django


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def run(requests: int, machines: int, threads: int) -> int:
    from django.contrib.auth.hashers import make_password
    from django.db import connection
    from django.db.models import Count

    from accounts.models import User
    from accounts.services import default_policy
    from machines.models import Lab, Machine, MachineStatus
    from nexcompute.errors import Conflict
    from sessions.models import ComputeSession
    from sessions.services import session_request
    from sessions.states import LIVE

    t0 = time.perf_counter()
    default_policy()
    lab = Lab.objects.create(name="Bench lab")
    Machine.objects.bulk_create(
        [
            Machine(
                name=f"bench{i:04d}",
                lab=lab,
                status=MachineStatus.AVAILABLE,
                memory_bytes=16 * 1024**3,
                specs={"memory_bytes": 16 * 1024**3, "gpus": []},
            )
            for i in range(machines)
        ]
    )
    password = make_password(None)
    User.objects.bulk_create(
        [User(username=f"student{i:05d}", password=password) for i in range(requests)]
    )
    users = list(User.objects.order_by("username"))
    connection.close()
    print(f"setup: {time.perf_counter() - t0:.1f} s ({machines} machines, {requests} users)")

    work: queue.SimpleQueue[User] = queue.SimpleQueue()
    for user in users:
        work.put(user)
    latencies: list[float] = []
    outcomes: dict[str, int] = {"ok": 0, "conflict": 0, "error": 0}
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)

    def worker() -> None:
        barrier.wait()
        try:
            while True:
                try:
                    user = work.get_nowait()
                except queue.Empty:
                    return
                start = time.perf_counter()
                try:
                    session_request(user=user)
                    kind = "ok"
                except Conflict:
                    kind = "conflict"
                except Exception as exc:
                    kind = "error"
                    with lock:
                        errors.append(repr(exc))
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    outcomes[kind] += 1
        finally:
            connection.close()

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in pool:
        t.join()
    wall = time.perf_counter() - started

    doubled = list(
        ComputeSession.objects.filter(state__in=LIVE)
        .values("machine")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    sessions = ComputeSession.objects.count()
    connection.close()

    ms = sorted(x * 1000 for x in latencies)
    print(f"requests:   {len(latencies)} with {threads} threads against {machines} machines")
    print(f"wall:       {wall:.2f} s")
    print(f"throughput: {len(latencies) / wall:.0f} requests/s")
    print(
        f"latency:    p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms, "
        f"max {ms[-1]:.1f} ms, mean {statistics.fmean(ms):.1f} ms"
    )
    print(f"succeeded:  {outcomes['ok']} (sessions in the database: {sessions})")
    print(f"refused:    {outcomes['conflict']} (409 no free machine)")
    if errors:
        print(f"errors:     {outcomes['error']}, e.g. {errors[:3]}")
    if doubled:
        print(f"DOUBLE-BOOKED machines: {doubled}")
    expected_ok = min(machines, requests)
    good = (
        outcomes["ok"] == expected_ok == sessions
        and outcomes["conflict"] == requests - expected_ok
        and not errors
        and not doubled
    )
    print("result:     " + ("OK" if good else "FAILED"))
    return 0 if good else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--machines", type=int, default=50)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    args = parser.parse_args()
    if not (1 <= args.threads <= 80):
        sys.exit("--threads must be between 1 and 80 (each holds a PostgreSQL connection)")

    url = bench_database_url("allocbench")
    # "Each on its own database connection": a pool as large as the threads, opened before the
    # rush (Django's psycopg pool holds 20 by default and opens them on demand: the 21st thread
    # would wait for another's connection, and the first ones for connections being opened,
    # which a server under load has long had).
    os.environ["DATABASE_POOL_MAX"] = os.environ["DATABASE_POOL_MIN"] = str(args.threads)
    try:
        fresh_django(url)
        return run(args.requests, args.machines, args.threads)
    finally:
        if not args.keep:
            drop_database(url)


if __name__ == "__main__":
    sys.exit(main())
