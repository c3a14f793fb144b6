"""Shared fixtures: a real stand-in Nexus (websockets server on 127.0.0.1), config files with
tiny timings, and a file-based presence detector a test can flip."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from nexcompute_agent.agent import Agent
from nexcompute_agent.config import AgentConfig, config_from_dict, dumps_toml, write_private_file
from nexcompute_agent.presence import PresenceSample
from nexcompute_agent.protocol import AgentMessage, Hello, Welcome, dump, parse_agent_message

if TYPE_CHECKING:
    from websockets.http11 import Request, Response

CREDENTIAL = "nxa_test_S3cr3t-credential"


def _others_can_reach(path: Path) -> bool:
    """Others may run ``path``: every directory above lets them in, and the file is r-x."""
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in path.parents) and (
        path.stat().st_mode & 0o005 == 0o005
    )


def _runnable_bin() -> Path:
    """The stand-in programs (fake-jupyter, ...) where a session account can run them.

    Sessions run as unprivileged pool accounts. From a checkout inside a folder only root can
    enter (a clone under /root, a `mktemp -d` folder: mode 0700) they cannot run
    agent/tests/bin/fake-jupyter in place, so the suite copies the folder, world-readable, to
    /var/tmp (one copy per checkout, refreshed each run)."""
    here = Path(__file__).resolve().parent / "bin"
    if _others_can_reach(here / "fake-jupyter"):
        return here
    import hashlib

    # <root>/bin/fake-jupyter, like a real environment: the sandbox shows the environment root
    # read-only (…/bin/jupyter → …) inside its private /var/tmp, which stays writable.
    root = Path(f"/var/tmp/nexcompute-test-bin-{hashlib.sha256(bytes(here)).hexdigest()[:12]}")
    target = root / "bin"
    target.mkdir(mode=0o755, parents=True, exist_ok=True)
    for folder in (root, target):
        folder.chmod(0o755)
    for source in here.iterdir():
        staging = target / f".{source.name}.{os.getpid()}"
        shutil.copy2(source, staging)
        staging.chmod(0o755)
        staging.replace(target / source.name)  # atomic: concurrent runs see a whole file
    assert _others_can_reach(target / "fake-jupyter"), f"{target} is not reachable by others"
    return target


TEST_BIN = _runnable_bin()
FAKE_JUPYTER = TEST_BIN / "fake-jupyter"
WAIT = 20.0  # upper bound for any single wait-for-condition (generous: CI shares 2 cores)


HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Work the same whether pytest reads agent/pyproject.toml or a root config. A conftest's
    # hook sees every collected item of the run, so touch only this directory's.
    for item in items:
        if not item.path.resolve().is_relative_to(HERE):
            continue
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.add_marker(pytest.mark.asyncio)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(30))


class FilePresence:
    """Owner present while the file contains "1"."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.write_text("0")

    def set(self, present: bool) -> None:
        self.path.write_text("1" if present else "0")

    def sample(self) -> PresenceSample:
        present = self.path.read_text().strip() == "1"
        return PresenceSample(present, ["owner"] if present else [], 3.0 if present else None)


@dataclass
class Conn:
    """One accepted agent connection, seen from the server side."""

    ws: ServerConnection
    hello: Hello
    frames: asyncio.Queue[AgentMessage] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None

    async def next_frame(self, pred: Callable[[AgentMessage], bool] = lambda m: True) -> Any:
        async def find() -> AgentMessage:
            while True:
                msg = await self.frames.get()
                if pred(msg):
                    return msg

        return await asyncio.wait_for(find(), WAIT)


class FakeNexus:
    """A real websockets server speaking the server side of the protocol."""

    def __init__(self) -> None:
        self.port = 0
        self.reject: list[int] = []  # HTTP statuses for the next handshakes, in order
        self.attempts: list[float] = []  # monotonic time of each handshake
        self.auth_headers: list[str | None] = []
        self.send_welcome = True
        self.reconnect_window: float | None = None  # welcome.reconnect_window_seconds
        self.heartbeat_seconds = 0.2
        # What GET /api/agents/me answers (the agent confirms a refused handshake there).
        self.me_status = 200
        self.me_checks = 0
        self.connections: asyncio.Queue[Conn] = asyncio.Queue()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/api/agents/me":
            self.me_checks += 1
            return connection.respond(self.me_status, "{}\n")
        self.attempts.append(time.monotonic())
        self.auth_headers.append(request.headers.get("Authorization"))
        if request.path != "/ws/agent/":
            return connection.respond(404, "not found\n")
        if self.reject:
            return connection.respond(self.reject.pop(0), "rejected by test\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        hello = parse_agent_message(await ws.recv())
        assert isinstance(hello, Hello)
        conn = Conn(ws=ws, hello=hello)
        if self.send_welcome:
            await ws.send(
                dump(
                    Welcome(
                        machine_id=7,
                        name="lab-7",
                        heartbeat_seconds=self.heartbeat_seconds,
                        server_time=datetime.now(timezone.utc),
                        reconnect_window_seconds=self.reconnect_window,
                    )
                )
            )
        self.connections.put_nowait(conn)
        try:
            async for raw in ws:
                conn.frames.put_nowait(parse_agent_message(raw))
        except ConnectionClosed:
            pass
        finally:
            conn.close_code = ws.close_code
            conn.closed.set()

    async def next_connection(self) -> Conn:
        return await asyncio.wait_for(self.connections.get(), WAIT)


@pytest.fixture(autouse=True)
def _not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test run started by a systemd unit would make stopping agents keep their sessions
    (keep_sessions_on_stop = "auto"); tests that want that set it."""
    monkeypatch.delenv("INVOCATION_ID", raising=False)


@pytest.fixture
async def nexus() -> AsyncIterator[FakeNexus]:
    fake = FakeNexus()
    async with serve(fake.handler, "127.0.0.1", 0, process_request=fake.process_request) as srv:
        fake.port = srv.sockets[0].getsockname()[1]
        yield fake


def write_config_file(path: Path, server: str, **overrides: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "server": server,
        "credential": CREDENTIAL,
        "machine_id": 7,
        "workspace_root": str(path.parent / "workspaces"),
        "heartbeat_seconds": 0.2,
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
        "presence_poll_seconds": 0.05,
        "state_dir": str(path.parent / "state"),
        # Never a real user: an agent running as root kills every process of its session user
        # at start-up when it finds leftovers.
        "session_user": "nexcompute-no-such-user",
        "jupyter_command": ["no-such-jupyter-command", "lab"],
    }
    data.update(overrides)
    write_private_file(path, dumps_toml(data))
    return config_from_dict(data, path)


@pytest.fixture
def presence(tmp_path: Path) -> FilePresence:
    return FilePresence(tmp_path / "presence")


@pytest.fixture
def agent_config(tmp_path: Path, nexus: FakeNexus) -> AgentConfig:
    return write_config_file(tmp_path / "agent.toml", nexus.url)


AgentStarter = Callable[..., Awaitable[tuple[Agent, "asyncio.Task[int]"]]]


@pytest.fixture
async def start_agent(
    agent_config: AgentConfig, presence: FilePresence
) -> AsyncIterator[AgentStarter]:
    started: list[tuple[Agent, asyncio.Task[int]]] = []

    async def start(config: AgentConfig | None = None, **kwargs: Any) -> tuple[Agent, Any]:
        kwargs.setdefault("presence", presence)
        agent = Agent(config or agent_config, **kwargs)
        task = asyncio.create_task(agent.run())
        started.append((agent, task))
        return agent, task

    yield start
    for agent, task in started:
        agent.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, WAIT)


@pytest.fixture
def tests_dir() -> Iterator[Path]:
    yield Path(__file__).parent


# --- sessions -----------------------------------------------------------------------------------

# One user per test run: two runs on one machine must not kill each other's processes.
TEST_SESSION_USER = f"nexsess-t{os.getpid() % 100000}"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def require_root() -> None:
    """Tests that switch to a session user run as root (as CI does); elsewhere they fail loudly
    rather than pass without checking anything."""
    if not IS_ROOT:
        pytest.fail("this test switches to a session user: run it as root (CI does)")


needs_root = pytest.mark.usefixtures("require_root")


def _end_processes_of(uid: int) -> None:
    procs = [
        p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid
    ]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=3)


@pytest.fixture(scope="session")
def session_user() -> Iterator[str]:
    """A real session account (a pool of one), made as the install step makes them, for this
    test run, and removed after it."""
    from nexcompute_agent.sessions.accounts import create_accounts, remove_accounts

    if not IS_ROOT:
        pytest.fail("these tests create a session user: run them as root (CI does)")
    [account] = create_accounts([TEST_SESSION_USER])
    yield TEST_SESSION_USER
    # Nothing of the user may outlive the tests, whatever a failing test left.
    _end_processes_of(account.uid)
    remove_accounts([TEST_SESSION_USER])


POOL_PREFIX = f"nxs-t{os.getpid() % 100000}-"


@pytest.fixture(scope="session")
def session_pool() -> Iterator[tuple[str, int]]:
    """A pool of two real session accounts (prefix, size) for this test run."""
    from nexcompute_agent.sessions.accounts import create_accounts, remove_accounts

    if not IS_ROOT:
        pytest.fail("these tests create session accounts: run them as root (CI does)")
    names = [f"{POOL_PREFIX}{i}" for i in (1, 2)]
    accounts = create_accounts(names)
    yield POOL_PREFIX, len(names)
    for account in accounts:
        _end_processes_of(account.uid)
    remove_accounts(names)


@pytest.fixture
def workspace_root() -> Iterator[Path]:
    """Outside pytest's 0700 tmp dirs, so the session user can reach its workspace."""
    root = Path(tempfile.mkdtemp(prefix="nexcompute-ws-", dir="/var/tmp"))  # noqa: S108
    root.chmod(0o711)
    yield root
    # A failed test may leave a session's workspace image mounted: detach it first.
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith(f"{root}/"):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


class Sent:
    """Collects what the session manager sends; a test waits for messages by type."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.connected = True
        self._event = asyncio.Event()

    def __call__(self, msg: Any) -> bool:
        if not self.connected:
            return False
        self.messages.append(msg)
        self._event.set()
        return True

    def of(self, msg_type: str) -> list[Any]:
        return [m for m in self.messages if m.type == msg_type]

    async def wait(self, msg_type: str, count: int = 1, timeout: float = 15.0) -> Any:
        async def go() -> Any:
            while len(self.of(msg_type)) < count:
                self._event.clear()
                await self._event.wait()
            return self.of(msg_type)[count - 1]

        return await asyncio.wait_for(go(), timeout)


ENV_DIR = Path(os.environ.get("NEXCOMPUTE_SESSION_ENV", "/var/tmp/nexcompute-session-env"))


@pytest.fixture(scope="session")
def session_env() -> Path:
    """The real Jupyter environment sessions run (built once by scripts/make-session-env.sh)."""
    script = HERE.parents[1] / "scripts" / "make-session-env.sh"
    proc = subprocess.run([str(script), str(ENV_DIR)], capture_output=True, text=True, timeout=580)
    if proc.returncode != 0:
        pytest.fail(f"cannot build the session environment: {proc.stderr[-500:]}")
    return ENV_DIR


def session_config(tmp_path: Path, workspace_root: Path, user: str, **overrides: Any) -> Any:
    data: dict[str, Any] = {
        "server": "http://127.0.0.1:1",
        "credential": CREDENTIAL,
        "workspace_root": str(workspace_root),
        "session_user": user,
        "state_dir": str(tmp_path / "state"),
        "jupyter_command": [str(FAKE_JUPYTER), "lab"],
        "jupyter_start_timeout": 10,
        "tunnel_start_timeout": 10,
        "session_stop_grace": 0.5,
        "session_max_processes": 64,
        "session_cgroup": "off",
        "session_workspace_gb": 0.25,
    }
    data.update(overrides)
    return config_from_dict(data)
