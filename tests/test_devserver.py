"""`make run`'s supervisor: everything comes up, the local agent appears, Ctrl-C ends it all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from machines.models import Machine, MachineStatus
from tests.procs import ROOT, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_make_run_starts_everything_and_ctrl_c_stops_it(
    live_env: dict[str, str], session_env: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **live_env,
        "PORT": str(port),
        "NEXCOMPUTE_VAR_DIR": str(tmp_path / "var"),
        # Nothing listens here, so the supervisor must start its own redis-server.
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "NEXCOMPUTE_SESSION_ENV": str(session_env),
        # The local .env make run writes (the checkout's own .env is never touched by tests).
        "NEXCOMPUTE_ENV_FILE": str(tmp_path / "dot.env"),
    }
    for key in ("DEBUG", "SECRET_KEY"):
        env.pop(key, None)
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "scripts/devserver.py"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        try:
            login = wait_for(
                lambda: httpx.get(f"http://127.0.0.1:{port}/accounts/login/", timeout=2),
                timeout=60,
                what="dashboard up",
            )
        except AssertionError as exc:  # say why: what make run printed
            tail = (tmp_path / "run.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"{exc}\n--- make run said ---\n{tail}") from None
        assert login.status_code == 200
        assert 'name="username"' in login.text
        wait_for(
            lambda: Machine.objects.filter(status=MachineStatus.AVAILABLE).exists(),
            timeout=60,
            what="local agent online",
        )
        output = wait_for(
            lambda: "NexCompute is up" in (text := (tmp_path / "run.log").read_text()) and text,
            what="the closing banner",
        )
        assert "demo accounts: admin / " in output
        assert "started redis" in output
        # The accounts again at the end of start-up, after the agent started.
        password = output.split("demo accounts: admin / ")[1].split()[0]
        assert output.index(f"log in as student / {password}") > output.index("started agent")

        # A second shell in the same checkout: nothing in its environment but the .env make
        # run wrote (before, a SystemCheckError about SECRET_KEY).
        dot_env = tmp_path / "dot.env"
        assert dot_env.stat().st_mode & 0o777 == 0o600
        second_shell = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "NEXCOMPUTE_ENV_FILE": str(dot_env),
        }
        made = subprocess.run(
            [sys.executable, "manage.py", "createapitoken", "student"],
            cwd=ROOT,
            env=second_shell,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip().splitlines()[-1]
        assert token.startswith("nxp_")
        me = httpx.get(
            f"http://127.0.0.1:{port}/api/sessions",
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        assert me.status_code == 200, me.text
        enroll = subprocess.run(
            [sys.executable, "manage.py", "createenrollmenttoken", "--lab", "Local lab"],
            cwd=ROOT,
            env=second_shell,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert enroll.returncode == 0, enroll.stderr
        assert f"--server http://127.0.0.1:{port} " in enroll.stdout
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        for needed in ("daphne", "worker", "beat", "nexcompute-agent", "redis-server"):
            assert needed in names, names
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        code = proc.wait(timeout=40)
        log.close()
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]
    leftovers = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == [], leftovers
