"""``nexcompute-agent enroll`` against a real local HTTP server."""

from __future__ import annotations

import json
import socket
import stat
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

import pytest

from nexcompute_agent import __version__
from nexcompute_agent.cli import main
from nexcompute_agent.config import load_config
from nexcompute_agent.enroll import enroll, machine_key

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

SECRET = "nxa_machine_credential_XYZ"


class StandIn:
    def __init__(self) -> None:
        self.status = 201
        self.body: Any = {"machine_id": 42, "name": "lab-42", "credential": SECRET}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.url = ""
        self.answer: Any = None  # body -> (status, answer), instead of status and body


@pytest.fixture
def server() -> Iterator[StandIn]:
    state = StandIn()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            state.requests.append((self.path, body))
            status, answer = state.answer(body) if state.answer else (state.status, state.body)
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def no_session_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host without a built session environment."""
    from nexcompute_agent import sessionenv

    monkeypatch.setenv("NEXCOMPUTE_SESSION_ENV", str(tmp_path / "no-env"))
    monkeypatch.setattr(sessionenv, "DEFAULT_DIR", tmp_path / "no-default-env")


def built_env(folder: Path) -> Path:
    for exe in ("jupyter", "jupyter-lab"):
        (folder / "bin").mkdir(parents=True, exist_ok=True)
        (folder / "bin" / exe).write_text("#!/bin/sh\n")
        (folder / "bin" / exe).chmod(0o755)
    return folder


@pytest.mark.usefixtures("no_session_env")
def test_it_enrolls_and_writes_a_private_config(
    server: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "etc" / "agent.toml"
    code = main(
        [
            "enroll",
            "--server",
            server.url + "/",
            "--token",
            "join-123",
            "--config",
            str(path),
            "--workspace-root",
            "/srv/ws",
            "--session-user",
            "labuser",
            "--tunnel",
            "cloudflared-quick",
        ]
    )
    assert code == 0
    assert server.requests == [
        (
            "/api/agents/enroll",
            {
                "token": "join-123",
                "hostname": socket.gethostname(),
                "agent_version": __version__,
                **({"machine_key": key} if (key := machine_key()) else {}),
            },
        )
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    data = tomllib.loads(path.read_text())
    assert data == {
        "server": server.url,
        "credential": SECRET,
        "machine_id": 42,
        "workspace_root": "/srv/ws",
        "session_user": "labuser",
        "session_pool_prefix": "nxs-",
        "session_pool_size": 0,  # --session-user: a pool of that one account
        "heartbeat_seconds": 10.0,
        "jupyter_command": ["jupyter", "lab"],
        "tunnel": {
            "kind": "cloudflared-quick",
            "public_host": "127.0.0.1",
            "cloudflared": "cloudflared",
            "token": "",
            "hostname": "",
            "origin_port": 8888,
            "tls_cert": "",
            "tls_key": "",
        },
    }
    config = load_config(path)
    assert config.credential == SECRET and config.machine_id == 42
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert "lab-42" in out.out
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    # No session environment on this host: said plainly, with how to build one.
    assert "no session environment found" in out.out and "make-session-env.sh" in out.out


@pytest.mark.parametrize("argv", [["--token=-abc"], ["--token", "-abc"]])
def test_tokens_may_begin_with_a_dash(server: StandIn, tmp_path: Path, argv: list[str]) -> None:
    path = tmp_path / "agent.toml"
    assert main(["enroll", "--server", server.url, *argv, "--config", str(path)]) == 0
    assert server.requests[0][1]["token"] == "-abc"


def test_a_refused_token_exits_3(
    server: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.status, server.body = 403, {"detail": "join token expired"}
    path = tmp_path / "agent.toml"
    assert main(["enroll", "--server", server.url, "--token", "t", "--config", str(path)]) == 3
    assert "enrollment refused: join token expired" in capsys.readouterr().err
    assert not path.exists()


def test_an_unreachable_server_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = tmp_path / "agent.toml"
    url = f"http://127.0.0.1:{port}"
    assert main(["enroll", "--server", url, "--token", "t", "--config", str(path)]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert not path.exists()


def test_a_garbled_answer_exits_1(server: StandIn, tmp_path: Path) -> None:
    server.body = {"machine_id": "x"}
    path = tmp_path / "agent.toml"
    assert main(["enroll", "--server", server.url, "--token", "t", "--config", str(path)]) == 1


def test_a_bad_server_url_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    assert main(["enroll", "--server", "ftp://x", "--token", "t", "--config", str(path)]) == 2


@pytest.mark.usefixtures("no_session_env")
def test_enroll_points_jupyter_command_at_the_session_env_it_finds_or_is_given(
    server: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = built_env(tmp_path / "found-env")
    monkeypatch.setenv("NEXCOMPUTE_SESSION_ENV", str(found))
    path = tmp_path / "a.toml"
    assert main(["enroll", "--server", server.url, "--token=t1", "--config", str(path)]) == 0
    assert load_config(path).jupyter_command == (str(found / "bin" / "jupyter"), "lab")

    given = built_env(tmp_path / "given-env")
    path = tmp_path / "b.toml"
    args = ["enroll", "--server", server.url, "--token=t2", "--config", str(path)]
    assert main([*args, "--session-env", str(given)]) == 0
    assert load_config(path).jupyter_command == (str(given / "bin" / "jupyter"), "lab")


def test_enroll_refuses_a_session_env_that_is_not_built(
    server: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    args = ["enroll", "--server", server.url, "--token=t3", "--config", str(path)]
    assert main([*args, "--session-env", str(tmp_path / "empty")]) == 2
    assert "not a built session environment" in capsys.readouterr().err
    assert server.requests == [] and not path.exists()  # the token was not spent


def test_the_machine_key_is_a_hash_of_the_machine_id_never_the_id(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    key = machine_key((str(tmp_path / "missing"), str(machine_id)))
    assert len(key) == 64 and int(key, 16) >= 0
    assert "0123456789abcdef" not in key
    assert key == machine_key((str(machine_id),)), "stable: the same host, the same key"
    machine_id.write_text("fedcba9876543210fedcba9876543210\n")
    assert machine_key((str(machine_id),)) != key
    assert machine_key((str(tmp_path / "missing"),)) == ""


def test_an_older_server_that_does_not_know_the_machine_key_still_enrolls(
    server: StandIn,
) -> None:
    """A server older than the agent refuses the unknown field: the agent enrolls without it
    (a new machine record, as before)."""
    calls = []

    def answer(body: dict[str, Any]) -> tuple[int, Any]:
        calls.append(body)
        if "machine_key" in body:
            return 400, {"detail": "machine_key: Extra inputs are not permitted"}
        return 201, {"machine_id": 7, "name": "pc7", "credential": SECRET}

    server.answer = answer
    result = enroll(server.url, "join-1", key="ab" * 32)
    assert result.machine_id == 7
    assert [("machine_key" in c) for c in calls] == [True, False]
