#!/usr/bin/env python
"""Time to Jupyter: API request -> the session's URL answering, against a bare `jupyter lab`.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/nexcompute .venv/bin/python \
        bench/time_to_jupyter.py [--runs 5] [--warm]

Run as root (sessions run as pool accounts in their sandbox; the accounts are created here
and removed after). It builds
its own database (``<name>_ttjbench``), starts daphne, a Celery worker and the real agent with
the `direct` tunnel, and alternates: (a) bare — `jupyter lab` started by hand as the session
user from the same session environment, timed from spawn until `/api/status` answers with the
token; (b) NexCompute — `POST /api/sessions`, then, as the dashboard does, waiting for the
session's push on `/ws/dashboard/` to read the URL, until that URL's `/api/status` answers.
Jupyter's status is polled every 20 ms in both. Prints each median and the ratio.
Loopback only, bounded, stops by itself.

With ``--warm``, after those runs the lab's warm pool is switched on and (c) is repeated with a
warm sandbox ready (docs/sandbox.md): each run waits until the machine reports one, then times
the same API request -> URL answering. It prints ``warm session median X.XX s`` beside the cold
and bare figures, and the idle warm sandbox's memory (USS of its processes) and CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from _common import ROOT, bench_database_url, browser_session, fresh_django

BIN = Path(sys.executable).parent
PREFIX = "nxs-bench-"
POOL = [f"{PREFIX}{i}" for i in (1, 2)]
USER = f"{PREFIX}bare"  # the bare run's account, outside the agent's pool
ENV_DIR = Path(os.environ.get("NEXCOMPUTE_SESSION_ENV", "/var/tmp/nexcompute-session-env"))
POLL = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_status(base: str, token: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                r = client.get(f"{base}/api/status", headers={"Authorization": f"token {token}"})
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(POLL)
    raise TimeoutError(f"{base} never answered")


def bare_run(workspace: Path) -> float:
    """`jupyter lab` by hand, as the session user, with what the agent passes it."""
    port = free_port()
    token = secrets.token_urlsafe(32)
    home = workspace / f"bare-{port}"
    home.mkdir(mode=0o700)
    user = pwd.getpwnam(USER)
    os.chown(home, user.pw_uid, user.pw_gid)
    env = {
        "PATH": f"{ENV_DIR / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
        "JUPYTER_TOKEN": token,
        "LANG": "C.UTF-8",
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            str(ENV_DIR / "bin" / "jupyter"),
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--ServerApp.root_dir={home}",
        ],
        env=env,
        user=user.pw_uid,
        group=user.pw_gid,
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_status(f"http://127.0.0.1:{port}", token)
        return time.monotonic() - started
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def nexcompute_run(port: int, api_token: str, session_key: str) -> float:
    """As the dashboard does it: the request, then pushes over /ws/dashboard/ (no polling
    load on the server while Jupyter starts), then the URL's own status endpoint."""
    from websockets.sync.client import connect

    with (
        httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {api_token}"},
            timeout=10,
        ) as client,
        connect(
            f"ws://127.0.0.1:{port}/ws/dashboard/",
            additional_headers={"Cookie": f"sessionid={session_key}"},
            origin=f"http://127.0.0.1:{port}",  # type: ignore[arg-type]
            open_timeout=10,
        ) as socket_,
    ):
        started = time.monotonic()
        created = client.post("/api/sessions", json={"duration_minutes": 30})
        created.raise_for_status()
        session_id = created.json()["id"]
        deadline = started + 120
        url = None
        while url is None:
            if time.monotonic() > deadline:
                raise TimeoutError("session never got a URL")
            try:
                push = json.loads(socket_.recv(timeout=max(0.1, deadline - time.monotonic())))
            except TimeoutError:
                continue
            if push.get("type") != "session" or push.get("session_id") != session_id:
                continue
            body = client.get(f"/api/sessions/{session_id}").json()
            if body["state"] in ("failed", "ended"):
                raise RuntimeError(f"session {session_id} {body['state']}")
            url = body["url"]
        base, _, query = url.partition("/lab?")
        wait_status(base, query.removeprefix("token="))
        elapsed = time.monotonic() - started
        client.delete(f"/api/sessions/{session_id}").raise_for_status()
        while True:
            body = client.get(f"/api/sessions/{session_id}").json()
            if body.get("state") == "ended":
                break
            if "state" not in body or time.monotonic() > deadline + 60:
                raise RuntimeError(f"session {session_id} did not end: {body}")
            time.sleep(0.1)
        return elapsed


def wait_warm(machine_model: type, timeout: float = 120) -> None:
    """Until the machine is free and its agent reports a warm sandbox ready."""
    deadline = time.monotonic() + timeout
    while not machine_model.objects.filter(status="available", warm_ready=True).exists():
        if time.monotonic() > deadline:
            sys.exit("no warm sandbox became ready")
        time.sleep(0.05)


def idle_cost(sample: float = 10.0) -> tuple[float, float]:
    """Memory (MB, unique set size) and CPU (% of one core over ``sample`` s) of every process
    of the pool accounts: the warm sandbox alone, as no session runs."""
    uids = {pwd.getpwnam(name).pw_uid for name in POOL}

    def procs() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["uids"]) if p.info["uids"].real in uids]

    def cpu(ps: list[psutil.Process]) -> float:
        total = 0.0
        for p in ps:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    time.sleep(2.0)  # past the start's own work
    ps = procs()
    before = cpu(ps)
    time.sleep(sample)
    used = cpu(ps) - before
    memory = 0
    for p in ps:
        try:
            memory += p.memory_full_info().uss
        except psutil.Error:
            pass
    return memory / 1e6, 100 * used / sample


def setup(url: str, cpu_weight: int | None) -> tuple[str, str]:
    fresh_django(url)
    from accounts.models import QuotaPolicy, User
    from accounts.services import api_token_create

    if cpu_weight is not None:  # the session's CPU weight against the owner's programs
        QuotaPolicy.objects.update_or_create(
            is_default=True, defaults={"name": "bench", "cpu_weight": cpu_weight}
        )
    user = User.objects.create_user("benchstudent", password=secrets.token_urlsafe(8))
    return api_token_create(user=user)[1], browser_session(user)  # the dashboard socket's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--log-dir", default="", help="keep the server processes' logs here")
    parser.add_argument(
        "--cpu-weight", type=int, default=None, help="the default policy's session CPU weight"
    )
    parser.add_argument(
        "--warm", action="store_true", help="also time sessions handed a warm sandbox"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: sessions run as an unprivileged user this script creates")
    if not 1 <= args.runs <= 50:
        sys.exit("--runs must be 1..50")
    url = bench_database_url("ttjbench")
    subprocess.run([str(ROOT / "scripts" / "make-session-env.sh"), str(ENV_DIR)], check=True)
    sys.path.insert(0, str(ROOT / "agent"))
    from nexcompute_agent.sessions.accounts import create_accounts, remove_accounts

    create_accounts([*POOL, USER])
    api_token, session_key = setup(url, args.cpu_weight)
    work = Path(tempfile.mkdtemp(prefix="nexcompute-ttj-", dir="/var/tmp"))
    work.chmod(0o711)
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "NEXCOMPUTE_CHANNEL_PREFIX": f"ttj{os.getpid()}",
        "LOG_LEVEL": "WARNING",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        # Cold runs first (the lab's warm pool off), then warm ones: the link looks at the
        # switch every second (heartbeats every 2 s) instead of every minute.
        "NEXCOMPUTE_WARM_POOLS": "1",
        "NEXCOMPUTE_WARM_CHECK_SECONDS": "1",
        "NEXCOMPUTE_HEARTBEAT_SECONDS": "2",
    }
    procs: list[subprocess.Popen[bytes]] = []

    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)

    def spawn(argv: list[str]) -> None:
        name = Path(argv[0]).name
        out = (log_dir / f"{name}.log").open("wb") if log_dir else subprocess.DEVNULL
        procs.append(
            subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT if log_dir else subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    try:
        spawn([str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port),
               "nexcompute.asgi:application"])  # fmt: skip
        spawn([str(BIN / "celery"), "-A", "nexcompute", "worker", "--pool=solo", "-l", "WARNING"])
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("daphne did not start")
                time.sleep(0.1)
        from machines.models import Lab
        from machines.services import enrollment_token_create, lab_get_or_create

        lab = lab_get_or_create(name="Bench")
        Lab.objects.filter(pk=lab.pk).update(warm_pool=False)
        _, join = enrollment_token_create(lab=lab)
        config = work / "agent.toml"
        subprocess.run(
            [str(BIN / "nexcompute-agent"), "enroll", "--server", f"http://127.0.0.1:{port}",
             f"--token={join}", "--config", str(config), "--workspace-root", str(work / "ws"),
             "--pool-prefix", PREFIX, "--pool-size", str(len(POOL))],
            check=True, env=env,
        )  # fmt: skip
        text = config.read_text().replace(
            'jupyter_command = ["jupyter", "lab"]',
            f'jupyter_command = ["{ENV_DIR}/bin/jupyter", "lab"]',
        )
        head, sep, tail = text.partition("\n[")
        config.write_text(f'{head}\nstate_dir = "{work / "state"}"\n{sep}{tail}')
        spawn([str(BIN / "nexcompute-agent"), "run", "--config", str(config)])
        from machines.models import Machine, MachineStatus

        deadline = time.monotonic() + 30
        while not Machine.objects.filter(status=MachineStatus.AVAILABLE).exists():
            if time.monotonic() > deadline:
                sys.exit("the agent did not come online")
            time.sleep(0.1)
        bare, ours = [], []
        bare_run(work)  # warm the page cache for both
        for i in range(args.runs):
            bare.append(bare_run(work))
            ours.append(nexcompute_run(port, api_token, session_key))
            while not Machine.objects.filter(status=MachineStatus.AVAILABLE).exists():
                time.sleep(0.05)
            print(f"run {i + 1}: bare {bare[-1]:.2f} s, NexCompute {ours[-1]:.2f} s", flush=True)
        mb, mo = statistics.median(bare), statistics.median(ours)
        warm: list[float] = []
        idle: tuple[float, float] | None = None
        if args.warm:
            Lab.objects.filter(pk=lab.pk).update(warm_pool=True)
            for i in range(args.runs):
                wait_warm(Machine)
                if idle is None:
                    idle = idle_cost()
                warm.append(nexcompute_run(port, api_token, session_key))
                print(f"warm run {i + 1}: {warm[-1]:.3f} s", flush=True)
        print(f"bare jupyter lab   median {mb:.2f} s over {args.runs} runs")
        print(f"NexCompute session median {mo:.2f} s (API request -> URL answers)")
        print(f"ratio              {mo / mb:.2f} (target <= 1.10)")
        if args.warm:
            mw = statistics.median(warm)
            print(f"warm session median {mw:.2f} s (API request -> URL answers; target <= 0.30)")
            print(f"warm vs cold       {mo / mw:.1f}x faster; warm vs bare {mb / mw:.1f}x")
            if idle is not None:
                print(f"idle warm sandbox  memory {idle[0]:.0f} MB (USS), CPU {idle[1]:.2f} % "
                      "of one core (10 s sample)")  # fmt: skip
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
        for name in (*POOL, USER):
            subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        remove_accounts([*POOL, USER])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
