#!/usr/bin/env python
"""Fleet benchmark: N simulated agents speaking the real protocol against one daphne process.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/nexcompute .venv/bin/python bench/fleet.py \
        [--agents 2000] [--heartbeat 10] [--duration 40]

It creates its own database (``<name>_fleetbench``), enrols N machines directly, starts one
daphne, connects N agents (hello, then heartbeats every ``--heartbeat`` seconds, starts spread
over one interval) and one staff dashboard socket. Each heartbeat carries a unique metric value;
the dashboard records when that value arrives, which gives heartbeat-to-dashboard latency.
Prints connect time, latency p50/p99, delivery ratio, and daphne's CPU and RSS. Loopback only;
bounded in count and time; stops by itself.

``--restart``: the server-restart scenario instead. N agents connect (spread over ``--ramp``)
and beat; then daphne is killed (SIGKILL) and a new one started on the same port. Every agent
reconnects as the real one does (full-jitter exponential backoff from 1 s, cap 60 s, reset
after a welcome). The machines are marked offline at the kill (what the silent-offline sweep
does to a dead server's machines), and the bench prints how long until every agent has its
welcome from the new server and every machine is ``available`` again.

``--processes N``: the ladder (README, "Several web processes"): one daphne process and then N,
agents joining in ``--levels`` steps; the agents live in ``--clients`` processes (this one
holds the dashboard socket), and the bench prints where the host's CPU went in each step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from _common import ROOT, bench_database_url, browser_session, fresh_django

BIN = Path(sys.executable).parent
# Options every daphne this bench starts gets beside where it listens (--daphne-options).
DAPHNE_OPTIONS: list[str] = []


def setup_database(url: str, n: int) -> tuple[list[str], str]:
    """Fresh database with N machines and a staff user; returns credentials and a session id."""
    fresh_django(url)
    from accounts.models import User
    from machines.models import Lab, Machine
    from nexcompute.tokens import new_token

    lab = Lab.objects.create(name="Bench lab")
    creds, rows = [], []
    for i in range(n):
        tok = new_token("nxm")
        creds.append(tok.token)
        rows.append(
            Machine(
                name=f"bench{i:05d}",
                lab=lab,
                credential_lookup=tok.lookup,
                credential_digest=tok.digest,
            )
        )
    Machine.objects.bulk_create(rows, batch_size=1000)
    staff = User.objects.create_user("benchstaff", password="x", is_staff=True)
    return creds, browser_session(staff)


HELLO = {
    "type": "hello",
    "protocol_version": 4,  # welcome.reconnect_window_seconds; no capabilities
    "capabilities": [],
    "agent_version": "bench",
    "hostname": "bench",
    "specs": {
        "cpu_model": "Bench CPU",
        "cpu_count": 8,
        "memory_bytes": 16 * 1024**3,
        "disk_bytes": 256 * 1024**3,
        "os": "Linux",
        "gpus": [],
    },
    "sessions": [],
    "owner_present": False,
}


class Stats:
    def __init__(self) -> None:
        self.connect_times: list[float] = []
        self.connect_failures = 0
        self.sent: dict[tuple[int, float], float] = {}
        self.latencies: list[float] = []
        self.beats_sent = 0
        self.closed_early = 0
        self.errors: dict[str, int] = {}
        self.gave_up = 0
        self.expected = 0
        self.all_connected_at: float | None = None
        self.steady: list[float] = []
        # machine id -> [(sent at, cpu_percent)]: what GET /api/machines should show.
        self.beats: dict[int, list[tuple[float, float]]] = {}
        self.api_lags: list[float] = []
        self.api_times: list[float] = []


async def wait_port(port: int, timeout: float = 30) -> None:
    """Until something accepts connections on loopback ``port`` (exits the bench if not)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"nothing listens on port {port}")
            await asyncio.sleep(0.2)


async def open_agent_socket(
    url: str, cred: str, *, open_timeout: float, source: str | None = None
) -> Any:
    """One agent's websocket, as the real agent opens it (no pings, unbounded queue).
    ``source``: the loopback address to connect from (each has its own ~28,000 ports)."""
    import websockets

    extra: dict[str, Any] = {"local_addr": (source, 0)} if source else {}
    return await websockets.connect(
        url,
        additional_headers={"Authorization": f"Bearer {cred}"},
        open_timeout=open_timeout,
        ping_interval=None,
        max_queue=None,
        **extra,
    )


async def say_hello(ws: Any) -> dict[str, Any]:
    """Send hello; the server's welcome (raises if it answers anything else)."""
    await ws.send(json.dumps(HELLO))
    welcome: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 60))
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"no welcome: {welcome.get('type')}")
    return welcome


def count_error(errors: dict[str, int], exc: BaseException) -> None:
    key = type(exc).__name__ + ": " + str(exc)[:50]
    errors[key] = errors.get(key, 0) + 1


async def backoff(failures: int, window: float = 0.0) -> int:
    """The real agent's full-jitter backoff (from 1 s, cap 60 s); the next failure count.
    ``window``: after losing a connection that had its welcome, the server's reconnect window
    (``welcome.reconnect_window_seconds``), drawn from as the agent does."""
    delay = random.uniform(0, min(60.0, 2.0**failures))
    await asyncio.sleep(max(delay, random.uniform(0, window) if window > 0 else 0.0))
    return failures + 1


def reconnect_window(welcome: dict[str, Any]) -> float:
    return float(welcome.get("reconnect_window_seconds") or 0.0)


async def agent(
    i: int,
    cred: str,
    url: str,
    stats: Stats,
    beat: float,
    stop_at: float,
    ids: dict[int, int],
    ramp: float,
) -> None:
    import websockets

    await asyncio.sleep(random.uniform(0, ramp))  # arrivals spread over the ramp
    started = time.monotonic()
    delay = 1.0
    while True:
        try:
            ws = await websockets.connect(
                url,
                additional_headers={"Authorization": f"Bearer {cred}"},
                open_timeout=30,
                ping_interval=None,
                max_queue=None,
            )
            break
        except Exception as exc:
            # As the real agent does: retry with exponential backoff and full jitter.
            stats.connect_failures += 1
            key = type(exc).__name__ + ": " + str(exc)[:60]
            stats.errors[key] = stats.errors.get(key, 0) + 1
            if time.monotonic() + delay >= stop_at:
                stats.gave_up += 1
                return
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 30.0)
    try:
        await ws.send(json.dumps(HELLO))
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 60))
        stats.connect_times.append(time.monotonic() - started)
        if len(stats.connect_times) == stats.expected:
            stats.all_connected_at = time.monotonic()
        machine_id = welcome["machine_id"]
        ids[i] = machine_id
        seq = i  # unique values per machine so a dashboard update maps to one beat
        next_beat = time.monotonic() + random.uniform(0, beat)

        reader = asyncio.create_task(drain(ws))
        while time.monotonic() < stop_at:
            await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
            if time.monotonic() >= stop_at:
                break
            seq = (seq + 7919) % 10000
            value = seq / 100
            stats.sent[(machine_id, value)] = time.monotonic()
            stats.beats.setdefault(machine_id, []).append((time.monotonic(), value))
            await ws.send(
                json.dumps(
                    {
                        "type": "heartbeat",
                        "metrics": {"cpu_percent": value, "memory_percent": 50.0},
                        "owner_present": False,
                    }
                )
            )
            stats.beats_sent += 1
            next_beat += beat
        reader.cancel()
    except Exception:
        stats.closed_early += 1
    finally:
        await ws.close()


async def dashboard(
    url: str, session_key: str, origin: str, stats: Stats, stop_at: float, ready: asyncio.Event
) -> None:
    import websockets

    async with websockets.connect(
        url,
        additional_headers={"Cookie": f"sessionid={session_key}"},
        origin=origin,  # type: ignore[arg-type]
        max_size=None,
        max_queue=None,
        open_timeout=30,
    ) as ws:
        ready.set()
        while time.monotonic() < stop_at + 3:
            try:
                raw = await asyncio.wait_for(ws.recv(), 1)
            except TimeoutError:
                continue
            now = time.monotonic()
            msg = json.loads(raw)
            for m in msg.get("machines", []):
                value = (m.get("metrics") or {}).get("cpu_percent")
                sent = stats.sent.pop((m["id"], value), None)
                if sent is not None:
                    stats.latencies.append(now - sent)
                    if stats.all_connected_at is not None and sent >= stats.all_connected_at:
                        stats.steady.append(now - sent)


async def api_poller(
    base: str, session_key: str, stats: Stats, stop_at: float, every: float
) -> None:
    """Once every agent is connected, read GET /api/machines every ``every`` seconds and
    measure how far each machine's metrics lag behind its newest heartbeat: 0 when the API
    shows the newest figures sent before the request, else how long newer ones had existed."""
    import httpx

    async with httpx.AsyncClient(cookies={"sessionid": session_key}, timeout=30) as client:
        while time.monotonic() < stop_at - every:
            await asyncio.sleep(every)
            if stats.all_connected_at is None:
                continue
            asked = time.monotonic()
            response = await client.get(f"{base}/api/machines")
            stats.api_times.append(time.monotonic() - asked)
            response.raise_for_status()
            for m in response.json():
                shown = (m.get("metrics") or {}).get("cpu_percent")
                beats = [b for b in stats.beats.get(m["id"], []) if b[0] < asked]
                if not beats:
                    continue
                newer = [t for t, v in beats if v == shown]
                after = [t for t, _ in beats if newer and t > newer[-1]]
                if shown is None or not newer:
                    stats.api_lags.append(asked - beats[0][0])
                elif after:
                    stats.api_lags.append(asked - after[0])
                else:
                    stats.api_lags.append(0.0)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(args: argparse.Namespace, url: str, creds: list[str], session_key: str) -> None:
    import psutil

    port = args.port
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "NEXCOMPUTE_HEARTBEAT_SECONDS": str(args.heartbeat),
        "NEXCOMPUTE_CHANNEL_PREFIX": f"fleet{os.getpid()}",
        "NEXCOMPUTE_CHANNEL_LAYER": args.layer,
        "LOG_LEVEL": "WARNING",
    }
    # Opened once before the event loop's busy part; closed with the process.
    daphne_log = Path(args.daphne_log).open("wb") if args.daphne_log else subprocess.DEVNULL  # noqa: SIM115, ASYNC230
    daphne = spawn_daphne(["-b", "127.0.0.1", "-p", str(port)], env, daphne_log)
    try:
        proc = psutil.Process(daphne.pid)
        await wait_port(port)
        stats = Stats()
        stats.expected = len(creds)
        t0 = time.monotonic()
        stop_at = t0 + args.ramp + args.duration
        ids: dict[int, int] = {}
        ready = asyncio.Event()
        dash = asyncio.create_task(
            dashboard(
                f"ws://127.0.0.1:{port}/ws/dashboard/",
                session_key,
                f"http://127.0.0.1:{port}",
                stats,
                stop_at,
                ready,
            )
        )
        await asyncio.wait_for(ready.wait(), 30)  # the dashboard listens before agents come
        poller = (
            asyncio.create_task(
                api_poller(f"http://127.0.0.1:{port}", session_key, stats, stop_at, args.api_poll)
            )
            if args.api_poll > 0
            else None
        )
        cpu0 = proc.cpu_times()
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu0 = usage0.ru_utime + usage0.ru_stime
        rss_peak = 0

        async def sample() -> None:
            nonlocal rss_peak
            while time.monotonic() < stop_at:
                rss_peak = max(rss_peak, proc.memory_info().rss)
                await asyncio.sleep(1)

        sampler = asyncio.create_task(sample())
        # Connections are spread over the first heartbeat interval; latency is measured from
        # then on, with every agent beating every `heartbeat` seconds.
        tasks = [
            asyncio.create_task(
                agent(
                    i,
                    c,
                    f"ws://127.0.0.1:{port}/ws/agent/",
                    stats,
                    args.heartbeat,
                    stop_at,
                    ids,
                    args.ramp,
                )
            )
            for i, c in enumerate(creds)
        ]
        await asyncio.gather(*tasks)
        await dash
        if poller is not None:
            await poller
        sampler.cancel()
        wall = time.monotonic() - t0
        cpu1 = proc.cpu_times()
        cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        delivered = len(stats.latencies)
        print(f"agents            {args.agents} (heartbeat {args.heartbeat:g} s, {wall:.0f} s run)")
        print(
            f"connected         {len(stats.connect_times)} "
            f"(failed attempts retried {stats.connect_failures}, gave up {stats.gave_up}, "
            f"dropped {stats.closed_early})"
        )
        if stats.all_connected_at is not None:
            print(f"all connected     after {stats.all_connected_at - t0:.1f} s")
        for error, count in sorted(stats.errors.items(), key=lambda kv: -kv[1])[:3]:
            print(f"  connect error   {count} x {error}")
        print(
            f"connect time      p50 {pct(stats.connect_times, 0.5) * 1000:.0f} ms, "
            f"p99 {pct(stats.connect_times, 0.99) * 1000:.0f} ms"
        )
        print(
            f"beat->dashboard   p50 {pct(stats.latencies, 0.5) * 1000:.0f} ms, "
            f"p99 {pct(stats.latencies, 0.99) * 1000:.0f} ms, "
            f"delivered {delivered}/{stats.beats_sent} "
            f"({100 * delivered / max(1, stats.beats_sent):.1f}%)"
        )
        print(
            f"  steady state    p50 {pct(stats.steady, 0.5) * 1000:.0f} ms, "
            f"p99 {pct(stats.steady, 0.99) * 1000:.0f} ms over {len(stats.steady)} beats "
            f"sent after every agent was connected"
        )
        if stats.api_lags:
            fresh = sum(1 for lag in stats.api_lags if lag <= 5.0)
            print(
                f"API metrics lag   p50 {pct(stats.api_lags, 0.5):.2f} s, "
                f"p99 {pct(stats.api_lags, 0.99):.2f} s, max {max(stats.api_lags):.2f} s; "
                f"{100 * fresh / len(stats.api_lags):.1f}% within 5 s "
                f"({len(stats.api_times)} reads of GET /api/machines, "
                f"p50 {pct(stats.api_times, 0.5) * 1000:.0f} ms each)"
            )
        print(
            f"daphne            CPU {100 * cpu_s / wall:.0f}% of one core, "
            f"RSS peak {rss_peak / 2**20:.0f} MiB"
        )
        usage = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu = 100 * (usage.ru_utime + usage.ru_stime - client_cpu0) / wall
        print(
            f"bench client      CPU {client_cpu:.0f}% of one core, "
            f"max RSS {usage.ru_maxrss / 1024:.0f} MiB (shares the 2 cores with daphne)"
        )
    finally:
        os.killpg(daphne.pid, signal.SIGTERM)
        try:
            daphne.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(daphne.pid, signal.SIGKILL)


# --- the server-restart scenario (--restart) --------------------------------------------------


class RestartStats:
    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0  # 1 once the first daphne was killed
        self.welcomed: list[set[int]] = [set(), set()]  # agents with a welcome, per server
        self.back: list[float] = []  # seconds from the kill to each agent's new welcome
        self.killed_at = 0.0
        self.errors: dict[str, int] = {}
        self.attempts = [0, 0]


async def reconnecting_agent(
    i: int, cred: str, url: str, st: RestartStats, beat: float, stop_at: float, ramp: float
) -> None:
    """An agent that stays connected, beats, and reconnects like the real one."""

    await asyncio.sleep(random.uniform(0, ramp))
    failures = 0
    while time.monotonic() < stop_at:
        epoch = st.epoch
        st.attempts[epoch] += 1
        try:
            ws = await open_agent_socket(url, cred, open_timeout=10)
        except Exception as exc:
            count_error(st.errors, exc)
            failures = await backoff(failures)
            continue
        window = 0.0
        try:
            window = reconnect_window(await say_hello(ws))
            failures = 0
            if i not in st.welcomed[epoch]:
                st.welcomed[epoch].add(i)
                if epoch == 1:
                    st.back.append(time.monotonic() - st.killed_at)
            next_beat = time.monotonic() + random.uniform(0, beat)
            while time.monotonic() < stop_at:
                try:
                    await asyncio.wait_for(ws.recv(), max(0.0, next_beat - time.monotonic()))
                except TimeoutError:
                    beat_frame = {
                        "type": "heartbeat",
                        "metrics": {"cpu_percent": 1.0, "memory_percent": 50.0},
                        "owner_present": False,
                    }
                    await ws.send(json.dumps(beat_frame))
                    next_beat += beat
        except Exception as exc:
            key = "lost: " + type(exc).__name__
            st.errors[key] = st.errors.get(key, 0) + 1
        finally:
            await ws.close()
        if time.monotonic() < stop_at:
            failures = await backoff(failures, window)


def vacuum_machines(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) machines_machine")


def spawn_daphne(
    listen: list[str], env: dict[str, str], log: IO[bytes] | int, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    """One daphne process serving the project, in a process group of its own (ended by id);
    ``listen``: daphne's options saying where (``-b``/``-p``, or ``--fd``)."""
    return subprocess.Popen(
        [str(BIN / "daphne"), *listen, *DAPHNE_OPTIONS, "nexcompute.asgi:application"],
        cwd=ROOT,
        env=env,
        pass_fds=pass_fds,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )


def start_daphne(
    args: argparse.Namespace, env: dict[str, str], log: IO[bytes] | int
) -> subprocess.Popen[bytes]:
    return spawn_daphne(["-b", "127.0.0.1", "-p", str(args.port)], env, log)


async def run_restart(args: argparse.Namespace, url: str, creds: list[str]) -> None:
    from asgiref.sync import sync_to_async

    from machines.models import Machine, MachineStatus

    def available() -> int:
        return Machine.objects.filter(status=MachineStatus.AVAILABLE).count()

    count_available = sync_to_async(available, thread_sensitive=True)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "NEXCOMPUTE_HEARTBEAT_SECONDS": str(args.heartbeat),
        "NEXCOMPUTE_CHANNEL_PREFIX": f"fleet{os.getpid()}",
        "NEXCOMPUTE_CHANNEL_LAYER": args.layer,
        "LOG_LEVEL": "WARNING",
    }
    log = Path(args.daphne_log).open("ab") if args.daphne_log else subprocess.DEVNULL  # noqa: SIM115, ASYNC230
    n = len(creds)
    st = RestartStats(n)
    daphne = start_daphne(args, env, log)
    limit = args.ramp + args.duration + 600  # every wait below is bounded by this
    stop_at = time.monotonic() + limit
    tasks: list[asyncio.Task[None]] = []
    try:
        tasks = [
            asyncio.create_task(
                reconnecting_agent(
                    i, c, f"ws://127.0.0.1:{args.port}/ws/agent/", st, args.heartbeat,
                    stop_at, args.ramp,
                )
            )
            for i, c in enumerate(creds)
        ]  # fmt: skip
        t0 = time.monotonic()
        while len(st.welcomed[0]) < n or await count_available() < n:
            if time.monotonic() - t0 > args.ramp + 300:
                sys.exit(f"only {len(st.welcomed[0])}/{n} agents connected before the restart")
            await asyncio.sleep(0.5)
        print(
            f"before restart    {n} agents connected and available after "
            f"{time.monotonic() - t0:.1f} s; holding {args.duration:g} s",
            flush=True,
        )
        await asyncio.sleep(args.duration)
        # The restart: the server dies without closing anything, a new one comes up.
        os.killpg(daphne.pid, signal.SIGKILL)
        daphne.wait(timeout=15)
        st.killed_at = time.monotonic()
        st.epoch = 1
        await sync_to_async(
            lambda: Machine.objects.update(status=MachineStatus.OFFLINE), thread_sensitive=True
        )()
        daphne = start_daphne(args, env, log)
        all_welcomed = all_available = None
        while all_available is None:
            now = time.monotonic()
            if now - st.killed_at > 300:
                break
            if all_welcomed is None and len(st.welcomed[1]) == n:
                all_welcomed = now - st.killed_at
            if await count_available() == n:
                all_available = time.monotonic() - st.killed_at
            await asyncio.sleep(0.25)
        if all_welcomed is None and len(st.back) == n:  # the last welcome came meanwhile
            all_welcomed = max(st.back)
        print(f"agents            {n} (heartbeat {args.heartbeat:g} s)")
        print(
            "restart -> all back (welcome)   "
            + (
                f"{all_welcomed:.1f} s"
                if all_welcomed is not None
                else f"not within 300 s ({len(st.welcomed[1])}/{n})"
            )
        )
        print(
            "restart -> all available       "
            + (f"{all_available:.1f} s" if all_available is not None else "not within 300 s")
        )
        print(f"per agent back    p50 {pct(st.back, 0.5):.1f} s, p99 {pct(st.back, 0.99):.1f} s")
        print(f"attempts          {st.attempts[1]} after the restart for {n} agents")
        for error, count in sorted(st.errors.items(), key=lambda kv: -kv[1])[:4]:
            print(f"  error           {count} x {error}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daphne.pid, signal.SIGTERM)
        try:
            daphne.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(daphne.pid, signal.SIGKILL)


# --- several web processes (--processes N) ----------------------------------------------------


def haproxy_config(port: int, backends: list[int], maxconn: int) -> str:
    """deploy/haproxy.cfg itself, with the bench's ports and a ``maxconn`` this host's
    descriptor limit allows (as tests/test_web_processes.py does)."""
    import re

    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    text = re.sub(r"(?m)^\s*server web\d+ .*\n", "", text)
    text = re.sub(r"(?m)^(\s*)bind 127\.0\.0\.1:\d+", rf"\g<1>bind 127.0.0.1:{port}", text)
    text = re.sub(r"(?m)^(\s*)maxconn \d+", rf"\g<1>maxconn {maxconn}", text)
    servers = "".join(f"    server web{i + 1} 127.0.0.1:{p}\n" for i, p in enumerate(backends))
    return text.rstrip("\n") + "\n" + servers


def find_haproxy() -> str:
    for path in ("/usr/sbin/haproxy", "/usr/bin/haproxy"):
        if os.access(path, os.X_OK):
            return path
    sys.exit("--processes needs HAProxy: apt-get install -y haproxy")


class Web:
    """N daphne processes behind one HAProxy on ``port`` (``balancer="haproxy"``), or each on
    a listening socket of its own in one SO_REUSEPORT group on ``port`` (``"reuseport"``: the
    kernel spreads new connections over the group's sockets, and a killed process's socket
    leaves the group; no proxy, so no proxy descriptors either). Each process is tracked by
    pid and ended by it."""

    def __init__(
        self,
        n: int,
        port: int,
        env: dict[str, str],
        log: IO[bytes] | int,
        tmp: Path,
        balancer: str = "haproxy",
    ) -> None:
        self.balancer = balancer
        # Each process's share of the fleet for its reconnect window (docs/deploy.md).
        self.env = {**env, "NEXCOMPUTE_WEB_PROCESSES": str(n)}
        self.log = log
        self.proxy: subprocess.Popen[bytes] | None = None
        if balancer == "reuseport":
            with socket.socket() as probe:  # a stale process would silently join the group
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    sys.exit(f"something already listens on port {port}")
            self.ports = [port] * n
            self.daphnes: list[subprocess.Popen[bytes] | None] = []
            try:
                for _ in range(n):
                    self.daphnes.append(self._daphne_in_group(port))
            except BaseException:
                self.close()  # those already started, by their ids
                raise
            return
        self.ports = [port + 1 + i for i in range(n)]
        self.daphnes = [self._daphne(p) for p in self.ports]
        cfg = tmp / f"haproxy-{n}.cfg"
        # Two descriptors per connection, within this host's hard limit (20,000 here).
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        maxconn = max(100, (min(hard, 200000) - 200) // 2)
        cfg.write_text(haproxy_config(port, self.ports, maxconn))
        self.proxy = subprocess.Popen(
            [find_haproxy(), "-f", str(cfg), "-db"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )

    def _daphne(self, port: int) -> subprocess.Popen[bytes]:
        return spawn_daphne(["-b", "127.0.0.1", "-p", str(port)], self.env, self.log)

    def _daphne_in_group(self, port: int) -> subprocess.Popen[bytes]:
        """daphne on a listening socket of its own in the SO_REUSEPORT group on ``port``
        (``daphne --fd``); this process keeps no copy, so the socket dies with daphne."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(4096)
            fd = sock.fileno()
            return spawn_daphne(["--fd", str(fd)], self.env, self.log, pass_fds=(fd,))

    async def ready(self, port: int) -> None:
        if self.balancer == "reuseport":
            # The sockets listen from the start; wait until every process answers (each
            # connection lands on a socket the kernel picks): 20 answers in a row.
            deadline, answered = time.monotonic() + 60, 0
            while answered < 20:
                if time.monotonic() > deadline:
                    sys.exit(f"the daphne processes on port {port} did not all answer")
                try:
                    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
                    w.write(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    ok = b" 200 " in await asyncio.wait_for(r.readline(), 2)
                    w.close()
                except (OSError, TimeoutError):
                    ok = False
                answered = answered + 1 if ok else 0
                if not ok:
                    await asyncio.sleep(0.2)
            return
        for p in [*self.ports, port]:
            await wait_port(p)
        await asyncio.sleep(2.5)  # HAProxy marks the servers up (rise 2, inter 1 s)

    def cpu_rss(self) -> tuple[float, int]:
        import psutil

        cpu, rss = 0.0, 0
        for d in self.daphnes:
            if d is None:
                continue
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(d.pid)
                t = proc.cpu_times()
                cpu += t.user + t.system
                rss += proc.memory_info().rss
        return cpu, rss

    def kill9(self, index: int) -> None:
        d = self.daphnes[index]
        if d is not None:
            os.killpg(d.pid, signal.SIGKILL)
            d.wait(timeout=15)
            self.daphnes[index] = None

    def close(self) -> None:
        for proc in [*self.daphnes, self.proxy]:
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


class Ladder:
    """Shared by the agents of one ladder run."""

    def __init__(self) -> None:
        self.sent: dict[tuple[int, float], float] = {}
        self.received: dict[tuple[int, Any], float] = {}
        self.welcomed: set[int] = set()
        self.errors: dict[str, int] = {}
        self.killed_at: float | None = None
        self.lost: set[int] = set()  # agents whose socket the kill cut
        self.back: dict[int, float] = {}  # seconds from the kill to their next welcome
        self.stop_at = float("inf")
        self.lags: list[tuple[float, float]] = []  # (when, how late) of the client's own loop


class HostCpu:
    """Where this host's CPU went between two readings, in % of one core: all of it, the bench
    (this process and its client processes), and PostgreSQL and Redis. The bench shares the
    cores with the web processes, and its event loops' lateness adds to what it measures."""

    def __init__(self, clients: list[int]) -> None:
        import psutil

        self.psutil = psutil
        self.clients = [psutil.Process(), *(psutil.Process(pid) for pid in clients)]
        self.t, self.host, self.client, self.stores = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        psutil = self.psutil
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        client = 0.0
        for proc in self.clients:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                client += t.user + t.system
        stores = 0.0
        for proc in psutil.process_iter(["name", "cpu_times"]):
            name = proc.info["name"] or ""
            if name.startswith(("postgres", "redis")) and proc.info["cpu_times"]:
                stores += proc.info["cpu_times"].user + proc.info["cpu_times"].system
        return time.monotonic(), busy, client, stores

    def since(self) -> tuple[float, float, float]:
        """(host, client, PostgreSQL + Redis) % of one core since the last reading."""
        t, host, client, stores = self._read()
        span = max(1e-6, t - self.t)
        out = tuple(100 * (b - a) / span for a, b in
                    ((self.host, host), (self.client, client), (self.stores, stores)))  # fmt: skip
        self.t, self.host, self.client, self.stores = t, host, client, stores
        return out  # type: ignore[return-value]


def worst_lag(st: Ladder, since: float, until: float) -> float:
    """How late, at most, this process's event loop woke in [since, until)."""
    return max((late for when, late in st.lags if since <= when < until), default=0.0)


async def loop_lag(st: Ladder, every: float = 0.05) -> None:
    """How late this process's event loop wakes (it is the clock of every latency here)."""
    while time.monotonic() < st.stop_at:
        t = time.monotonic()
        await asyncio.sleep(every)
        st.lags.append((t, time.monotonic() - t - every))


async def drain(ws: Any) -> None:
    """Read (and drop) what the server sends, until the socket ends."""
    async for _ in ws:
        pass


async def beats(ws: Any, machine_id: int, seq: list[int], st: Ladder, beat: float) -> None:
    """Beat every ``beat`` s (the first at a random point of the period), each with a value
    this machine has not sent before (``seq``: the agent's seed, advanced here)."""
    next_beat = time.monotonic() + random.uniform(0, beat)
    while time.monotonic() < st.stop_at:
        await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
        seq[0] = (seq[0] + 7919) % 100000
        value = seq[0] / 1000
        st.sent[(machine_id, value)] = time.monotonic()
        frame = {
            "type": "heartbeat",
            "metrics": {"cpu_percent": value, "memory_percent": 50.0},
            "owner_present": False,
        }
        await ws.send(json.dumps(frame))
        next_beat += beat


async def ladder_agent(
    i: int, cred: str, url: str, st: Ladder, beat: float, start_in: float, source: str | None
) -> None:
    """Connect, hello, beat with unique values; reconnect like the real agent (full-jitter
    exponential backoff from 1 s, cap 60 s, reset after a welcome)."""

    await asyncio.sleep(start_in)
    failures = 0
    seq = [i]  # the last value's seed, kept over reconnects: every beat's value is new
    while time.monotonic() < st.stop_at:
        try:
            ws = await open_agent_socket(url, cred, open_timeout=30, source=source)
        except Exception as exc:
            count_error(st.errors, exc)
            failures = await backoff(failures)
            continue
        window = 0.0
        try:
            welcome = await say_hello(ws)
            window = reconnect_window(welcome)
            failures = 0
            machine_id = welcome["machine_id"]
            st.welcomed.add(i)
            if i in st.lost and i not in st.back and st.killed_at is not None:
                st.back[i] = time.monotonic() - st.killed_at
            # One reader (idle until the server speaks or the socket ends) and one beater (a
            # timer per beat): no task made and cancelled per beat, as a wait_for(recv()) per
            # beat was (on this host the clients' CPU is taken from the daphnes).
            beater = asyncio.create_task(beats(ws, machine_id, seq, st, beat))
            reader = asyncio.create_task(drain(ws))
            try:
                done, _ = await asyncio.wait({beater, reader}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the run ends (this task cancelled)
                for task in (beater, reader):
                    task.cancel()
                await asyncio.gather(beater, reader, return_exceptions=True)
            if time.monotonic() < st.stop_at:  # the socket ended, or a send failed: lost
                for task in done:
                    task.result()  # raises what ended it, if anything did
                raise ConnectionError("closed by the server")
        except Exception as exc:
            key = "lost: " + type(exc).__name__
            st.errors[key] = st.errors.get(key, 0) + 1
            st.welcomed.discard(i)
            if st.killed_at is not None and i not in st.back:
                st.lost.add(i)
        finally:
            await ws.close()
        if time.monotonic() < st.stop_at:
            failures = await backoff(failures, window)


async def ladder_dashboard(url: str, session_key: str, origin: str, st: Ladder) -> None:
    import websockets

    while time.monotonic() < st.stop_at:
        try:
            async with websockets.connect(
                url,
                additional_headers={"Cookie": f"sessionid={session_key}"},
                origin=origin,  # type: ignore[arg-type]
                max_size=None,
                max_queue=None,
                open_timeout=30,
            ) as ws:
                async for raw in ws:
                    now = time.monotonic()
                    for m in json.loads(raw).get("machines", []):
                        value = (m.get("metrics") or {}).get("cpu_percent")
                        st.received.setdefault((m["id"], value), now)
        except Exception as exc:  # its process was the one killed: reconnect to another
            key = "dashboard lost: " + type(exc).__name__
            st.errors[key] = st.errors.get(key, 0) + 1
            await asyncio.sleep(0.5)


def client_main(conn: Any, source: str) -> None:
    """One bench client process (``--clients``): holds its share of the agents, connecting from
    loopback address ``source``, and answers the ladder's questions over ``conn``. Each client
    has a descriptor limit of its own, so the fleet is not capped by one process's 20,000."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gc.disable()  # collected between steps, when the ladder says so (run_processes)
    asyncio.run(_client_loop(conn, source))


async def _client_loop(conn: Any, source: str) -> None:
    st = Ladder()
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(loop_lag(st))]
    loop = asyncio.get_running_loop()
    while True:
        cmd, *arg = await loop.run_in_executor(None, conn.recv)
        reply: Any = None
        if cmd == "add":  # [(index, credential)], url, beat, ramp
            agents, url, beat, ramp = arg
            for i, cred in agents:
                start_in = random.uniform(0, ramp)
                tasks.append(
                    asyncio.create_task(ladder_agent(i, cred, url, st, beat, start_in, source))
                )
        elif cmd == "welcomed":
            reply = len(st.welcomed)
        elif cmd == "window":  # the beats sent in [since, until), and the loop's worst lag
            since, until = arg
            sent = [(k, t) for k, t in st.sent.items() if since <= t < until]
            reply = (sent, worst_lag(st, since, until))
        elif cmd == "collect":
            gc.collect()
        elif cmd == "kill":  # the time of the kill: who is cut from now on, and when back
            st.lost.clear()
            st.back.clear()
            st.killed_at = arg[0]
        elif cmd == "back":
            reply = (len(st.lost), list(st.back.values()))
        elif cmd == "errors":
            reply = dict(st.errors)
        elif cmd == "stop":
            st.stop_at = 0
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            conn.send(None)
            return
        conn.send(reply)


class Clients:
    """``k`` bench client processes (client_main), each from its own loopback address, agents
    dealt out round-robin; each tracked by its id and ended by it."""

    def __init__(self, k: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for j in range(k):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_main, args=(child, f"127.0.0.{10 + j}"), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    async def _exchange(self, cmds: list[tuple[Any, ...]]) -> list[Any]:
        """Send the j-th command to the j-th client; their answers."""
        loop = asyncio.get_running_loop()
        for conn, cmd in zip(self.conns, cmds, strict=True):
            conn.send(cmd)
        return list(await asyncio.gather(*(loop.run_in_executor(None, c.recv) for c in self.conns)))

    async def ask(self, *cmd: Any) -> list[Any]:
        """Send ``cmd`` to every client; their answers."""
        return await self._exchange([cmd] * len(self.conns))

    async def add(self, agents: list[tuple[int, str]], url: str, beat: float, ramp: float) -> None:
        k = len(self.conns)
        await self._exchange([("add", agents[j::k], url, beat, ramp) for j in range(k)])

    async def welcomed(self) -> int:
        return sum(await self.ask("welcomed"))

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid]

    async def close(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            await asyncio.wait_for(self.ask("stop"), 30)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


async def measure(
    st: Ladder, clients: Clients, since: float, until: float
) -> tuple[int, int, float, float]:
    """Beats sent in [since, until): (sent, delivered, p99 latency in s, the clients' worst
    event-loop lag in s)."""
    answers = await clients.ask("window", since, until)
    window = [item for sent, _ in answers for item in sent]
    lat = [st.received[k] - t for k, t in window if k in st.received]
    return len(window), len(lat), pct(lat, 0.99), max(lag for _, lag in answers)


async def run_ladder(
    args: argparse.Namespace,
    n_proc: int,
    url: str,
    creds: list[str],
    session_key: str,
    levels: list[int],
    tmp: Path,
) -> tuple[int, dict[str, float]]:
    """Agents join in steps (``levels``); each step is held for ``--window`` seconds and passes
    if every agent is connected, every beat reached the dashboard and p99 < 1 s. Returns the
    largest passing step and, with ``--kill``, the kill figures. The agents live in
    ``--clients`` processes; this one holds the dashboard socket (the clock of the receipts)."""
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "NEXCOMPUTE_HEARTBEAT_SECONDS": str(args.heartbeat),
        "NEXCOMPUTE_CHANNEL_PREFIX": f"fleet{os.getpid()}n{n_proc}",
        "NEXCOMPUTE_CHANNEL_LAYER": args.layer,
        "LOG_LEVEL": "WARNING",
    }
    log = Path(args.daphne_log).open("ab") if args.daphne_log else subprocess.DEVNULL  # noqa: SIM115, ASYNC230
    port = args.port
    web = Web(n_proc, port, env, log, tmp, args.balancer)
    clients = Clients(args.clients)
    st = Ladder()  # this process: the dashboard's receipts and its own loop's lag
    tasks: list[asyncio.Task[None]] = []
    held = 0
    kill: dict[str, float] = {}
    front = "HAProxy" if args.balancer == "haproxy" else "one SO_REUSEPORT port"
    print(
        f"--- {n_proc} daphne process(es) behind {front}, layer {args.layer}, "
        f"{args.clients} client process(es)",
        flush=True,
    )
    try:
        await web.ready(port)
        dash = asyncio.create_task(
            ladder_dashboard(
                f"ws://127.0.0.1:{port}/ws/dashboard/", session_key,
                f"http://127.0.0.1:{port}", st,
            )
        )  # fmt: skip
        tasks.append(dash)
        tasks.append(asyncio.create_task(loop_lag(st)))
        await asyncio.sleep(1)
        started = 0
        _, prev_rss = web.cpu_rss()
        prev_connected = 0
        agent_url = f"ws://127.0.0.1:{port}/ws/agent/"
        for level in levels:
            t_step = time.monotonic()
            agents = [(i, creds[i]) for i in range(started, level)]
            await clients.add(agents, agent_url, args.heartbeat, args.step_ramp)
            started = level
            deadline = t_step + args.step_ramp + 60
            while (connected := await clients.welcomed()) < level:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
            joined = time.monotonic() - t_step
            await asyncio.sleep(2)
            cpu0, _ = web.cpu_rss()
            host = HostCpu(clients.pids())
            w0 = time.monotonic()
            await asyncio.sleep(args.window)
            w1 = time.monotonic()
            cpu1, rss = web.cpu_rss()
            host_cpu, client_cpu, stores_cpu = host.since()
            await asyncio.sleep(3)  # the last beats of the window reach the dashboard
            sent, got, p99, client_lag = await measure(st, clients, w0, w1)
            lag = max(client_lag, worst_lag(st, w0, w1))
            per_agent = (rss - prev_rss) / max(1, connected - prev_connected) / 1024
            prev_rss, prev_connected = rss, connected
            ok = connected == level and sent > 0 and got == sent and p99 < 1.0
            print(
                f"{level:6d} agents: connected {connected} in {joined:.0f} s, "
                f"beat->dashboard p99 {p99 * 1000:.0f} ms, delivered {got}/{sent}, "
                f"daphne CPU {100 * (cpu1 - cpu0) / (w1 - w0):.0f}% of one core, "
                f"RSS {rss / 2**20:.0f} MiB (+{per_agent:.0f} KiB per agent added) "
                + ("ok" if ok else "MISSED"),
                flush=True,
            )
            print(
                f"{'':14s}host CPU {host_cpu:.0f}% (of {100 * (os.cpu_count() or 1)}%): bench "
                f"clients {client_cpu:.0f}% (their loops at most {lag * 1000:.0f} ms late), "
                f"PostgreSQL + Redis {stores_cpu:.0f}%",
                flush=True,
            )
            if not ok:
                break
            held = level
            # The clients' full collections between steps, not in a window (run_processes).
            await clients.ask("collect")
            gc.collect()
            # What autovacuum does in production: every flush of last_seen and metrics
            # rewrites machine rows, and this machine's PostgreSQL runs with autovacuum off
            # (after a ladder to 36,500: 135,503 dead rows beside 36,500 live).
            await asyncio.to_thread(vacuum_machines, url)
        if args.kill and n_proc > 1 and held:
            # kill -9 one process: its agents come back (through HAProxy, or the kernel's
            # group) on the others.
            killed_at = time.monotonic()
            await clients.ask("kill", killed_at)
            web.kill9(0)
            deadline = killed_at + 90
            await asyncio.sleep(2)
            while time.monotonic() < deadline:
                answers = await clients.ask("back")
                if sum(len(b) for _, b in answers) >= sum(n for n, _ in answers):
                    break
                await asyncio.sleep(0.25)
            answers = await clients.ask("back")
            lost = sum(n for n, _ in answers)
            back = sorted(t for _, b in answers for t in b)
            kill = {
                "lost": lost,
                "back": len(back),
                "all_back_s": back[-1] if back and len(back) == lost else float("nan"),
                "p50_s": pct(back, 0.5),
            }
            print(
                f"kill -9 of one process: {lost} agents cut, {len(back)} back "
                f"(p50 {kill['p50_s']:.1f} s, all back after {kill['all_back_s']:.1f} s)",
                flush=True,
            )
        errors = dict(st.errors)
        for answer in await clients.ask("errors"):
            for key, count in answer.items():
                errors[key] = errors.get(key, 0) + count
        for error, count in sorted(errors.items(), key=lambda kv: -kv[1])[:4]:
            print(f"  error         {count} x {error}")
    finally:
        st.stop_at = 0
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await clients.close()
        web.close()
    return held, kill


async def run_processes(
    args: argparse.Namespace, url: str, creds: list[str], session_key: str
) -> None:
    import tempfile

    levels = [int(x) for x in args.levels.split(",")]
    # The bench's processes are the clock of every latency they measure. When one process
    # held every agent socket, its cyclic collector ran a full collection every few seconds once
    # thousands of sockets and the beats' bookkeeping had piled up (0.5-2.2 s each at 12,000
    # agents on this host, nearly all finding nothing), each stalling the dashboard's receipts
    # by that much: the bench's pause, not the server's, measured as beat -> dashboard latency.
    # So this process and the clients (client_main) collect only between steps (run_ladder);
    # the web processes keep their defaults.
    gc.disable()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for n in sorted({1, args.processes}):
            results[n], _ = await run_ladder(args, n, url, creds, session_key, levels, Path(tmp))
            # Every machine offline again before the next ladder (its agents are gone).
            from asgiref.sync import sync_to_async

            from machines.models import Machine, MachineStatus

            await sync_to_async(
                lambda: Machine.objects.update(status=MachineStatus.OFFLINE),
                thread_sensitive=True,
            )()
    one, many = results[1], results[args.processes]
    print(
        f"held at p99 < 1 s, 100% delivery: 1 process {one} agents, "
        f"{args.processes} processes {many} agents "
        f"({many / one if one else float('nan'):.2f}x), heartbeat {args.heartbeat:g} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--heartbeat", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds after connecting")
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument(
        "--api-poll",
        type=float,
        default=10.0,
        help="read GET /api/machines this often in steady state (0: never)",
    )
    parser.add_argument(
        "--ramp",
        type=float,
        default=60.0,
        help="spread arrivals over this many seconds (lab machines powering on over a "
        "minute); --ramp 10 is a whole fleet reconnecting at once after a server restart",
    )
    parser.add_argument("--daphne-log", default="", help="write daphne's stderr here")
    parser.add_argument(
        "--daphne-options",
        default="",
        help="more options for every daphne process, as one string (e.g. '--ping-interval 60')",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="server-restart scenario: connect, kill daphne, start a new one, time the return "
        "(--duration: seconds connected before the kill)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="ladder mode: N daphne processes behind HAProxy against 1 in the same run; agents "
        "join in --levels steps, each held --window s (p99 < 1 s, 100%% delivery to pass)",
    )
    parser.add_argument("--levels", default="2000,3000,4000,5000,6000,7000,8000,9000,10000")
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--step-ramp", type=float, default=10.0)
    parser.add_argument("--kill", action="store_true", help="ladder mode: then kill -9 one process")
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="ladder mode: bench client processes holding the agents (each from its own "
        "loopback address, at most 19,000 agents each: one process's descriptor limit here)",
    )
    parser.add_argument(
        "--layer", choices=["redis", "pubsub"], default="redis", help="channel layer"
    )
    parser.add_argument(
        "--balancer",
        choices=["haproxy", "reuseport"],
        default="haproxy",
        help="ladder mode: HAProxy in front (deploy/haproxy.cfg, two descriptors per agent), "
        "or the kernel's SO_REUSEPORT group over the processes' own sockets (none)",
    )
    args = parser.parse_args()
    DAPHNE_OPTIONS.extend(shlex.split(args.daphne_options))
    # A SIGTERM (timeout(1), a lock's limit) unwinds like Ctrl-C, so the daphne processes and
    # HAProxy this bench started are ended by their ids, not left listening on its ports.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not 1 <= args.agents <= 20000 or args.duration > 600:
        sys.exit("--agents must be 1..20000 and --duration at most 600")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    if args.processes:
        args.agents = max(int(x) for x in args.levels.split(","))
        per_client = min(19000, hard - 1000)
        if not 1 <= args.clients <= 8 or args.agents > per_client * args.clients:
            sys.exit(f"--clients must be 1..8, with at most {per_client} agents each")
    url = bench_database_url("fleetbench")
    print(f"setting up {args.agents} machines in {urlsplit(url).path.lstrip('/')} ...", flush=True)
    creds, session_key = setup_database(url, args.agents)
    if args.restart:
        asyncio.run(run_restart(args, url, creds))
        return
    if args.processes:
        asyncio.run(run_processes(args, url, creds, session_key))
        return
    asyncio.run(run(args, url, creds, session_key))


if __name__ == "__main__":
    main()
