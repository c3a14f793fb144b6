"""``nexcompute-agent doctor`` on a good host, and on a host broken in one way at a time.

Real parts: a stand-in Nexus over HTTP (``test_install.Nexus``: enrollment, ``/api/agents/me``
with the machine credential, a ``Date`` header that a test can skew), real session accounts, the
real session environment and a real ``jupyter lab`` started as a session account, the
cloudflared stand-in. Two checks need a host this machine is not: a missing bubblewrap (the
real ``detect()`` result with ``bwrap`` taken away) and systemd as PID 1 without logind.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import IS_ROOT, write_config_file
from test_install import SECRET, Nexus, nexus, prefix, session_env  # noqa: F401

from nexcompute_agent import doctor, install
from nexcompute_agent.sessions import sandbox
from nexcompute_agent.sessions.accounts import create_accounts, remove_accounts

if TYPE_CHECKING:
    from collections.abc import Iterator

CLOUDFLARED = Path(__file__).resolve().parents[2] / "tests" / "standins" / "cloudflared"


@pytest.fixture
def pool(prefix: str) -> Iterator[str]:  # noqa: F811
    assert IS_ROOT, "doctor tries the session accounts: run this as root (CI does)"
    create_accounts([f"{prefix}1", f"{prefix}2"])
    yield prefix
    remove_accounts([f"{prefix}1", f"{prefix}2"])


@pytest.fixture
def good(tmp_path: Path, nexus: Nexus, pool: str, session_env: Path) -> Any:  # noqa: F811
    def write(**overrides: Any) -> Path:
        data: dict[str, Any] = {
            "credential": SECRET,
            "session_pool_prefix": pool,
            "session_pool_size": 2,
            "jupyter_command": [str(session_env / "bin" / "jupyter"), "lab"],
        }
        server = overrides.pop("server", nexus.url)
        data.update(overrides)
        path = tmp_path / "agent.toml"
        write_config_file(path, server, **data)
        return path

    return write


def doctor_lines(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str]]:
    rc = doctor.run_doctor(config)
    out = capsys.readouterr().out
    lines = {}
    for line in out.splitlines():
        status, _, rest = line.partition(" ")
        check = rest.strip().split(":", 1)[0]
        lines.setdefault(check, status)
        assert status in ("ok", "FAIL"), line
        if status == "FAIL":
            assert " -- fix: " in line, line  # every failure says what to do
    return rc, lines


EVERY_CHECK = [
    "config",
    "server",
    "credential",
    "clock",
    "accounts",
    "session env",
    "jupyter",
    "sandbox",
    "cloudflared",
    "presence",
]


def test_a_good_host_passes_every_check(good: Any, capsys: pytest.CaptureFixture[str]) -> None:
    config = good(tunnel={"kind": "cloudflared-quick", "cloudflared": str(CLOUDFLARED)})
    rc, lines = doctor_lines(config, capsys)
    assert lines == dict.fromkeys(EVERY_CHECK, "ok") and rc == 0


def test_the_command_line_prints_and_exits(good: Any) -> None:
    config = good()
    done = subprocess.run(
        [sys.executable, "-m", "nexcompute_agent", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok   jupyter: started as" in done.stdout
    assert "ok   cloudflared: not needed (tunnel direct)" in done.stdout


def unreadable_env(tmp_path: Path) -> list[str]:
    """A Jupyter in a folder only root can enter (the pyenv-under-/root trap)."""
    private = tmp_path / "root-only"
    (private / "bin").mkdir(parents=True)
    private.chmod(0o700)
    exe = private / "bin" / "jupyter"
    exe.write_text("#!/bin/sh\necho 4.6.6\n")
    exe.chmod(0o755)
    return [str(exe), "lab"]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder every user can enter (pytest's own temp folders are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="nxc-doctor-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def never_serves(folder: Path) -> list[str]:
    """A Jupyter that answers --version but exits instead of serving."""
    exe = folder / "jupyter"
    exe.write_text(
        '#!/bin/sh\nfor a; do [ "$a" = --version ] && echo 4.6.6 && exit 0; done\n'
        "echo 'ModuleNotFoundError: jupyterlab' >&2; exit 1\n"
    )
    exe.chmod(0o755)
    return [str(exe), "lab"]


@pytest.mark.parametrize(
    "broken",
    [
        "config",
        "server",
        "credential",
        "clock",
        "accounts",
        "session env",
        "jupyter",
        "sandbox",
        "cloudflared",
        "presence",
    ],
)
def test_each_check_fails_on_a_host_broken_that_way(
    broken: str,
    good: Any,
    nexus: Nexus,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    public_dir: Path,
) -> None:
    config = good()
    if broken == "config":
        config.chmod(0o644)  # a credential readable by everyone
    elif broken == "server":
        config = good(server="http://127.0.0.1:9")  # discard port: nothing listens
    elif broken == "credential":
        nexus.credential = "nxm_another_machine"  # ours was revoked
    elif broken == "clock":
        nexus.date_offset = -600  # the server's clock says ten minutes earlier
    elif broken == "accounts":
        config = good(session_pool_size=3)  # <prefix>3 was never created
    elif broken == "session env":
        config = good(jupyter_command=unreadable_env(tmp_path))
    elif broken == "jupyter":
        config = good(jupyter_command=never_serves(public_dir))
    elif broken == "sandbox":
        real = sandbox.detect()
        assert real.problem is None  # this host can sandbox; take bubblewrap away
        monkeypatch.setattr(sandbox, "detect", lambda: dataclasses.replace(real, bwrap=None))
    elif broken == "cloudflared":
        config = good(tunnel={"kind": "cloudflared-quick", "cloudflared": "/nonexistent/cf"})
    elif broken == "presence":
        # systemd as PID 1 (a lab PC) while logind does not answer: utmp alone misses GDM.
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
        monkeypatch.setattr(install, "systemd_running", lambda: True)
    rc, lines = doctor_lines(config, capsys)
    assert rc == 1
    assert lines[broken] == "FAIL", lines
    # The other checks are unaffected (except the ones that depend on the broken one).
    depends = {
        "server": {"credential", "clock"},
        "session env": {"jupyter"},
        "accounts": set(),
    }.get(broken, set())
    if broken != "config":  # a config that cannot be read stops the doctor at once
        others = {k: v for k, v in lines.items() if k not in {broken, *depends}}
        assert set(others.values()) == {"ok"}, lines
