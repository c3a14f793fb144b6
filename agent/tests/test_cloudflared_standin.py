"""The cloudflared stand-in keeps the contract in shared/CLOUDFLARED.md, so the agent tested
against it behaves the same against the real binary."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from nexcompute_agent.sessions.http import free_port

STANDIN = Path(__file__).resolve().parents[2] / "tests" / "standins" / "cloudflared"
BOX_RE = r"https://[a-z0-9-]+\.trycloudflare\.com"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met")


def spawn(*args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(STANDIN), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def test_quick_tunnel_prints_the_box_and_turns_ready(tmp_path: Path) -> None:
    import re

    port = free_port()
    pidfile = tmp_path / "cf.pid"
    proc = spawn(
        "tunnel", "--no-autoupdate", "--metrics", f"127.0.0.1:{port}", "--pidfile", str(pidfile),
        "--url", "http://127.0.0.1:9", CLOUDFLARED_STANDIN_REGISTER_DELAY="0.6",
    )  # fmt: skip
    try:
        wait_for(lambda: get(port, "/healthcheck") == (200, "OK\n"))
        status, body = get(port, "/ready")
        assert status == 503 and json.loads(body)["readyConnections"] == 0
        assert not pidfile.exists()  # written only once registered
        host = json.loads(get(port, "/quicktunnel")[1])["hostname"]
        assert host.endswith(".trycloudflare.com") and "://" not in host
        wait_for(lambda: get(port, "/ready")[0] == 200)
        body = get(port, "/ready")[1]
        assert body.startswith('{"status":200,"readyConnections":1,"connectorId":"')
        assert pidfile.read_text() == str(proc.pid)
        assert f'userHostname="https://{host}"' in get(port, "/metrics")[1]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out == ""  # nothing on stdout, ever
    lines = err.splitlines()
    box = [ln.split(" INF ", 1)[1] for ln in lines if " INF +" in ln or " INF |" in ln]
    assert box[0] == "+" + "-" * 92 + "+" and len(box) == 4
    assert re.search(BOX_RE, box[2])
    assert any("Registered tunnel connection connIndex=0" in ln for ln in lines)
    assert any("Initiating graceful shutdown due to signal terminated" in ln for ln in lines)


def test_a_second_signal_kills_at_once() -> None:
    port = free_port()
    proc = spawn(
        "tunnel", "--metrics", f"127.0.0.1:{port}", "--grace-period", "30s",
        "--url", "http://127.0.0.1:9",
    )  # fmt: skip
    try:
        wait_for(lambda: get(port, "/ready")[0] == 200)
        # Make the graceful exit slow enough to land a second signal: stop it first.
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)
    finally:
        proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM)


def test_a_busy_metrics_port_fails_with_exit_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = spawn("tunnel", "--metrics", f"127.0.0.1:{port}", "--url", "http://127.0.0.1:9")
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert f"failed to bind to address (127.0.0.1:{port})" in err


@pytest.mark.parametrize(
    ("args", "env", "code", "text"),
    [
        (["--url", "http://127.0.0.1:9"], {"CLOUDFLARED_STANDIN_FAULT": "no-network"}, 1,
         "failed to request quick Tunnel"),
        (["run", "--token", "garbage"], {}, 255, "Provided Tunnel token is not valid."),
    ],
)  # fmt: skip
def test_faults_exit_with_cloudflareds_codes(
    args: list[str], env: dict[str, str], code: int, text: str
) -> None:
    proc = spawn("tunnel", "--no-autoupdate", *args, **env)
    out, err = proc.communicate(timeout=10)
    assert (proc.returncode, out) == (code, "")
    assert text in err


def test_a_wrong_secret_runs_on_with_ready_503() -> None:
    import base64

    token = base64.b64encode(b'{"a":"x","s":"d3Jvbmc=","t":"u"}').decode()
    port = free_port()
    proc = spawn(
        "tunnel", "--metrics", f"127.0.0.1:{port}", "run",
        TUNNEL_TOKEN=token, CLOUDFLARED_STANDIN_FAULT="wrong-secret",
        CLOUDFLARED_STANDIN_REGISTER_DELAY="0.1",
    )  # fmt: skip
    try:
        wait_for(lambda: get(port, "/healthcheck")[0] == 200)
        time.sleep(0.4)
        assert get(port, "/ready")[0] == 503
        assert json.loads(get(port, "/quicktunnel")[1]) == {"hostname": ""}
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.communicate(timeout=5)
