"""Real processes for integration tests: daphne, Celery, the agent. Each is tracked by pid and
ended by its id (process group) when the test ends; every wait has a timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the thing may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}: {last_exc}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Proc:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        # Whatever the leader left behind in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()
        return self.popen.returncode


class ProcessSet:
    """Starts and tracks the processes of one test; ``close()`` ends them all."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], **extra_env: str) -> Proc:
        proc = Proc(name, argv, {**self.env, **extra_env}, self.log_dir)
        self.procs.append(proc)
        return proc

    def daphne(self, port: int | None = None, name: str = "daphne") -> tuple[Proc, int]:
        port = port or free_port()
        proc = self.start(
            name,
            [
                str(VENV_BIN / "daphne"),
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "nexcompute.asgi:application",
            ],
        )
        wait_for(
            lambda: port_open(port) or (not proc.alive() and _raise(proc)),
            timeout=30,
            what=f"{name} on port {port}",
        )
        return proc, port

    def celery_worker(self, name: str = "celery", *args: str) -> Proc:
        proc = self.start(
            name,
            [
                str(VENV_BIN / "celery"),
                "-A",
                "nexcompute",
                "worker",
                "--pool=solo",
                "--loglevel=INFO",
                f"--hostname={name}@%h",
                *args,
            ],
        )
        wait_for(
            lambda: "ready." in proc.log() or (not proc.alive() and _raise(proc)),
            timeout=60,
            what=f"{name} ready",
        )
        return proc

    def celery_beat(self, schedule: Path, name: str = "beat", *args: str) -> Proc:
        """Celery beat with its schedule file in ``schedule`` (a tmp_path, never the repo)."""
        proc = self.start(
            name,
            [
                str(VENV_BIN / "celery"),
                "-A",
                "nexcompute",
                "beat",
                "--loglevel=INFO",
                f"--schedule={schedule}",
                "--max-interval=1",
                *args,
            ],
        )
        wait_for(
            lambda: "beat: Starting..." in proc.log() or (not proc.alive() and _raise(proc)),
            timeout=60,
            what=f"{name} started",
        )
        return proc

    def agent(self, config: Path, name: str = "agent", *args: str) -> Proc:
        return self.start(
            name, [str(VENV_BIN / "nexcompute-agent"), "run", "--config", str(config), *args]
        )

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def _raise(proc: Proc) -> Any:
    raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()[-3000:]}")


@contextlib.contextmanager
def process_set(env: dict[str, str], log_dir: Path) -> Iterator[ProcessSet]:
    procs = ProcessSet(env, log_dir)
    try:
        yield procs
    finally:
        procs.close()
