"""``nexcompute-agent install`` and ``uninstall``, for real, as root: real OS accounts, a real
enrollment over HTTP (a stand-in Nexus), a unit file checked by ``systemd-analyze verify``, and
nothing left after uninstall.

The config, unit folder, workspace root and state directory are put under a temp folder (the
flags install takes), so the test cannot clobber the machine's own set-up; the accounts, the
deny files and /etc/passwd are the machine's, as on a lab computer.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import IS_ROOT

from nexcompute_agent.config import load_config
from nexcompute_agent.install import unit_text
from nexcompute_agent.sessions.accounts import create_accounts, remove_accounts

if TYPE_CHECKING:
    from collections.abc import Iterator

SECRET = "nxa_install_credential_XYZ"
JOIN = "-starts-with-a-dash"  # PITFALLS: tokens may begin with '-'
SYSTEM_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")
DENY = ("/etc/cron.deny", "/etc/at.deny")


class Nexus:
    """A stand-in Nexus: enrollment and the machine's ``/api/agents/me``."""

    def __init__(self) -> None:
        self.url = ""
        self.enrolled: list[dict[str, Any]] = []
        self.credential = SECRET
        self.date_offset = 0.0  # seconds added to the Date header (clock-skew tests)
        self.me_status = 200


@pytest.fixture
def nexus() -> Iterator[Nexus]:
    state = Nexus()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response_only(status)
            self.send_header("Date", formatdate(_now() + state.date_offset, usegmt=True))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            state.enrolled.append(json.loads(self.rfile.read(length)))
            if state.enrolled[-1]["token"] != JOIN:
                self._answer(400, {"detail": "unknown join token"})
                return
            self._answer(201, {"machine_id": 42, "name": "pc-42", "credential": SECRET})

        def do_GET(self) -> None:
            if self.path != "/api/agents/me":
                self._answer(404, {"detail": "not found"})
            elif self.headers.get("Authorization") != f"Bearer {state.credential}":
                self._answer(401, {"detail": "invalid machine credential"})
            else:
                self._answer(state.me_status, {"machine_id": 42, "name": "pc-42", "lab": "Physics"})

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def _now() -> float:
    import time

    return time.time()


def agent_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexcompute_agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def snapshot() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for path in (*SYSTEM_FILES, *DENY):
        out[path] = Path(path).read_text() if Path(path).exists() else None
    return out


@pytest.fixture
def session_env() -> Path:
    """The machine's built session environment (``make session-env``), given to install."""
    env = Path(os.environ.get("NEXCOMPUTE_SESSION_ENV", "/var/tmp/nexcompute-session-env"))
    script = Path(__file__).resolve().parents[2] / "scripts" / "make-session-env.sh"
    subprocess.run(["sh", str(script), str(env)], check=True, timeout=1800)
    return env


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"nxi{os.getpid() % 100000}-"
    yield name
    # Whatever a failing test left behind.
    remove_accounts([f"{name}{i}" for i in range(1, 4)])


def install_args(tmp: Path, url: str, prefix: str, env: Path) -> list[str]:
    return [
        "install",
        "--server",
        url,
        "--token",
        JOIN,
        "--pool-size",
        "3",
        "--pool-prefix",
        prefix,
        "--session-env",
        str(env),
        "--config",
        str(tmp / "etc" / "nexcompute" / "agent.toml"),
        "--unit-dir",
        str(tmp / "systemd"),
        "--workspace-root",
        str(tmp / "var" / "workspaces"),
        "--state-dir",
        str(tmp / "var" / "state"),
    ]


def test_install_then_uninstall_leaves_nothing(
    tmp_path: Path, nexus: Nexus, prefix: str, session_env: Path
) -> None:
    assert IS_ROOT, "install creates OS accounts: run this as root (CI does)"
    # One pool account exists before install: install reuses it and uninstall must keep it.
    create_accounts([f"{prefix}1"])
    before = snapshot()
    env_listing = sorted(p.name for p in session_env.iterdir())

    done = agent_cli(*install_args(tmp_path, nexus.url, prefix, session_env))
    assert done.returncode == 0, done.stderr + done.stdout
    assert [e["token"] for e in nexus.enrolled] == [JOIN]

    # Accounts: every pool member is a session account, denied cron and at.
    for i in (1, 2, 3):
        pw = pwd.getpwnam(f"{prefix}{i}")
        assert (pw.pw_dir, pw.pw_shell) == ("/nonexistent", "/usr/sbin/nologin")
        for deny in DENY:
            assert f"{prefix}{i}" in Path(deny).read_text().split()
    # Config: 0600, the credential, Jupyter from the session environment, the pool.
    config_path = tmp_path / "etc" / "nexcompute" / "agent.toml"
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    config = load_config(config_path)
    assert config.credential == SECRET and config.machine_id == 42
    assert config.jupyter_command == (str(session_env / "bin" / "jupyter"), "lab")
    assert (config.session_pool_prefix, config.session_pool_size) == (prefix, 3)
    record = tmp_path / "etc" / "nexcompute" / "install.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert SECRET not in record.read_text()
    assert json.loads(record.read_text())["accounts"] == [f"{prefix}2", f"{prefix}3"]
    workspaces = tmp_path / "var" / "workspaces"
    assert stat.S_IMODE(workspaces.stat().st_mode) == 0o711
    # The agent's state folder is install's too (recorded, so uninstall removes it even where
    # its parents existed before), private to root.
    assert stat.S_IMODE((tmp_path / "var" / "state").stat().st_mode) == 0o700
    assert json.loads((tmp_path / "etc/nexcompute/install.json").read_text())["state_dir"] == str(
        tmp_path / "var" / "state"
    )
    # The unit: written, verified by systemd's own parser, and not enabled (no systemd here).
    unit = tmp_path / "systemd" / "nexcompute-agent.service"
    text = unit.read_text()
    for line in ("Restart=always", "KillMode=process", "Delegate=yes", "NoNewPrivileges=yes"):
        assert line in text.splitlines()
    assert f"run --config {config_path}" in text
    assert "could not enable it: systemd is not running" in done.stdout
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stderr

    # Leave traces a real agent would: a running process of a session account, a workspace,
    # state. Uninstall must end and remove all of it.
    (workspaces / "17").mkdir()
    (workspaces / "17" / "notebook.ipynb").write_text("{}")
    (tmp_path / "var" / "state").mkdir(parents=True, exist_ok=True)
    (tmp_path / "var" / "state" / "sessions.json").write_text("{}")
    uid = pwd.getpwnam(f"{prefix}2").pw_uid
    sleeper = subprocess.Popen(["sleep", "600"], user=uid, group=uid, start_new_session=True)

    done = agent_cli("uninstall", "--config", str(config_path))
    assert done.returncode == 0, done.stderr + done.stdout
    assert sleeper.wait(10) == -9  # ended by uninstall
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    after = snapshot()
    with pytest.raises(KeyError):
        pwd.getpwnam(f"{prefix}2")
    # The account that was there before stays (it was not install's to remove) ...
    assert pwd.getpwnam(f"{prefix}1").pw_dir == "/nonexistent"
    # ... and otherwise the system files are exactly as before.
    assert after == before
    # The session environment was given, not built: it stays, untouched.
    assert sorted(p.name for p in session_env.iterdir()) == env_listing


def test_uninstall_keeps_an_account_that_is_no_longer_a_session_account(
    tmp_path: Path, nexus: Nexus, prefix: str, session_env: Path
) -> None:
    assert IS_ROOT, "install creates OS accounts: run this as root (CI does)"
    done = agent_cli(*install_args(tmp_path, nexus.url, prefix, session_env))
    assert done.returncode == 0, done.stderr + done.stdout
    # Someone turned nxi-3 into a person's account since: uninstall must not delete it.
    subprocess.run(["usermod", "--shell", "/bin/bash", f"{prefix}3"], check=True)
    done = agent_cli("uninstall", "--config", str(tmp_path / "etc/nexcompute/agent.toml"))
    assert done.returncode != 0 and f"kept account {prefix}3" in done.stderr
    assert pwd.getpwnam(f"{prefix}3").pw_shell == "/bin/bash"
    with pytest.raises(KeyError):
        pwd.getpwnam(f"{prefix}1")


def test_install_refuses_a_bad_session_env_before_spending_the_token(
    tmp_path: Path, nexus: Nexus, prefix: str
) -> None:
    done = agent_cli(*install_args(tmp_path, nexus.url, prefix, tmp_path / "no-env"))
    assert done.returncode == 2 and "is not a built session environment" in done.stderr
    assert nexus.enrolled == []
    with pytest.raises(KeyError):
        pwd.getpwnam(f"{prefix}1")
    done = agent_cli("uninstall", "--config", str(tmp_path / "etc/nexcompute/agent.toml"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_systemd_analyze_catches_a_broken_unit(tmp_path: Path) -> None:
    """The verify check above can fail: a misspelt key and a bad kill mode are reported."""
    bad = tmp_path / "nexcompute-agent.service"
    bad.write_text(
        unit_text(tmp_path / "agent.toml")
        .replace("Restart=always", "Restrat=always")
        .replace("KillMode=process", "KillMode=bogus")
    )
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert "Unknown key 'Restrat'" in verify.stderr and "kill mode" in verify.stderr


def test_the_session_env_recipe_ships_in_the_package() -> None:
    from nexcompute_agent import sessionenv

    recipe = sessionenv.recipe()
    assert recipe.is_file() and "jupyterlab==" in recipe.read_text()
    wrapper = Path(__file__).resolve().parents[2] / "scripts" / "make-session-env.sh"
    assert "agent/nexcompute_agent/data/make-session-env.sh" in wrapper.read_text()
    assert shutil.which("sh")
