"""``nexcompute-agent doctor``: check this host and its enrollment, one line per check.

Each line is ``ok   <check>: <what was found>`` or ``FAIL <check>: <what is wrong> -- fix:
<what to do>``. The exit code is 0 only when every check passed.

Checks, in order: the config; the server is reachable and the credential valid
(``GET /api/agents/me``); the clock against the server's HTTP ``Date``; the session accounts;
the session environment, run by a session account; Jupyter starting as a session account and
answering HTTP; cloudflared (when the tunnel needs it) and its version; the sandbox and the
limits this host can enforce; the presence source.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nexcompute_agent import __version__, install
from nexcompute_agent.config import ConfigError, default_config_path, load_config
from nexcompute_agent.hostos import sessions_unsupported

if TYPE_CHECKING:
    from nexcompute_agent.config import AgentConfig

ME_PATH = "/api/agents/me"
HTTP_TIMEOUT = 10.0
MAX_SKEW_SECONDS = 30.0
JUPYTER_START_TIMEOUT = 60.0


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failed: int = 0

    def ok(self, check: str, found: str) -> None:
        self.lines.append(f"ok   {check}: {found}")
        print(self.lines[-1], flush=True)

    def fail(self, check: str, wrong: str, fix: str) -> None:
        self.failed += 1
        self.lines.append(f"FAIL {check}: {wrong} -- fix: {fix}")
        print(self.lines[-1], flush=True)


def run_doctor(config_path: Path | None) -> int:
    report = Report()
    path = config_path or default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        report.fail("config", str(exc).splitlines()[0], _config_fix(str(exc)))
        return 1
    report.ok("config", f"{path} (mode 0600, machine {config.machine_id})")
    server_date = check_server(report, config)
    check_clock(report, server_date)
    if (why := sessions_unsupported()) is not None:
        report.fail("sessions", why, "lend only Linux computers")
    else:
        account = check_accounts(report, config)
        argv = check_session_env(report, config, account)
        if account is not None and argv is not None:
            check_jupyter_starts(report, argv, account)
        else:
            report.fail(
                "jupyter", "not tried (no session account or environment)", "fix the above first"
            )
        check_sandbox(report)
    check_cloudflared(report, config)
    check_presence(report, config)
    return 1 if report.failed else 0


def _config_fix(text: str) -> str:
    if "chmod" in text:
        return text.splitlines()[-1]
    return "run `nexcompute-agent install` (or `enroll`) to write it, or correct the key named"


# --- server and clock ---------------------------------------------------------------------------


def check_server(report: Report, config: AgentConfig) -> float | None:
    """Reachability and credential in one request; returns the server's Date (epoch) if any."""
    url = config.server.rstrip("/") + ME_PATH
    request = urllib.request.Request(
        url,
        headers={
            "Authorization": f"Bearer {config.credential}",
            "Accept": "application/json",
            "User-Agent": f"nexcompute-agent/{__version__} doctor",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            date = response.headers.get("Date")
            body: Any = json.loads(response.read(65536))
    except urllib.error.HTTPError as exc:
        date = exc.headers.get("Date") if exc.headers else None
        report.ok("server", f"{config.server} reachable (HTTP {exc.code})")
        if exc.code in (401, 403):
            report.fail(
                "credential",
                "the server does not accept this machine's credential (revoked, or the machine "
                "was deleted)",
                "ask staff for a join token and run `nexcompute-agent enroll` again",
            )
        else:
            report.fail(
                "credential",
                f"the server answered HTTP {exc.code} at {ME_PATH}",
                "check that `server` is the Nexus base URL and the Nexus is up to date",
            )
        return _parse_date(date)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        report.fail(
            "server",
            f"cannot reach {config.server}: {reason}",
            "check the network, a proxy or firewall, and the `server` URL in the config",
        )
        report.fail("credential", "not checked (server unreachable)", "fix the server check")
        return None
    report.ok("server", f"{config.server} reachable")
    name = body.get("name") if isinstance(body, dict) else None
    lab = body.get("lab") if isinstance(body, dict) else None
    report.ok("credential", f"valid: machine {name} in lab {lab}")
    return _parse_date(date)


def _parse_date(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(TypeError, ValueError):
        return email.utils.parsedate_to_datetime(value).timestamp()
    return None


def check_clock(report: Report, server_date: float | None) -> None:
    if server_date is None:
        report.fail(
            "clock", "no Date from the server to compare with", "fix the server check first"
        )
        return
    # Date has whole seconds and was stamped before our read: allow that second.
    skew = time.time() - server_date
    if abs(skew) > MAX_SKEW_SECONDS:
        report.fail(
            "clock",
            f"this computer's clock is {skew:+.0f} s off the server's (more than "
            f"{MAX_SKEW_SECONDS:.0f} s: lease times and warnings go wrong)",
            "turn on time sync: timedatectl set-ntp true (or install chrony)",
        )
    else:
        report.ok("clock", f"{skew:+.0f} s from the server's")


# --- accounts, session environment, Jupyter -----------------------------------------------------


def check_accounts(report: Report, config: AgentConfig) -> Any:
    from nexcompute_agent.sessions.accounts import PoolError, lookup, pool_names

    names = pool_names(config.session_pool_prefix, config.session_pool_size, config.session_user)
    found, problems = [], []
    for name in names:
        try:
            found.append(lookup(name))
        except PoolError as exc:
            problems.append(str(exc))
    if problems:
        report.fail(
            "accounts",
            f"{len(problems)} of {len(names)} session accounts unusable: {problems[0]}",
            "run `nexcompute-agent install` (it creates the pool), or create them as the "
            "message says",
        )
        return found[0] if found else None
    report.ok("accounts", f"{', '.join(names)} are session accounts")
    return found[0]


def check_session_env(report: Report, config: AgentConfig, account: Any) -> list[str] | None:
    from nexcompute_agent.sessionenv import DEFAULT_DIR, recipe

    cmd = list(config.jupyter_command)
    exe = shutil.which(cmd[0])
    fix = (
        f"build it with `sh {recipe()} {DEFAULT_DIR}` and set jupyter_command = "
        f'["{DEFAULT_DIR}/bin/jupyter", "lab"]'
    )
    if exe is None:
        report.fail("session env", f"jupyter_command {cmd[0]!r} not found", fix)
        return None
    argv = [os.path.abspath(exe), *cmd[1:]]
    if account is None:
        report.fail("session env", "no session account to try it as", "fix the accounts check")
        return None
    done = _run_as(account, [*argv, "--version"], timeout=60)
    if done is None or done.returncode != 0:
        why = "no answer" if done is None else (done.stderr or done.stdout).strip()[-200:]
        report.fail(
            "session env",
            f"session account {account.name} cannot run `{' '.join(argv)} --version` ({why}); "
            "the environment must be readable by every user (not a pyenv Python under /root)",
            fix,
        )
        return None
    report.ok("session env", f"{argv[0]} runs as {account.name} ({done.stdout.strip()})")
    return argv


def _run_as(account: Any, argv: list[str], timeout: float) -> Any:
    try:
        return subprocess.run(  # noqa: S603
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
            user=account.uid,
            group=account.gid,
            extra_groups=[],
            env={
                "PATH": f"{os.path.dirname(argv[0])}:/usr/bin:/bin",
                "HOME": "/nonexistent",
                "LANG": "C.UTF-8",
            },  # fmt: skip
        )
    except (OSError, subprocess.SubprocessError):
        return None


def check_jupyter_starts(report: Report, argv: list[str], account: Any) -> None:
    """Start Jupyter as the account in a throw-away folder, wait until it answers HTTP."""
    from nexcompute_agent.sessions.http import free_port

    home = Path(tempfile.mkdtemp(prefix="nexcompute-doctor-"))
    proc: subprocess.Popen[bytes] | None = None
    log = home / "jupyter.log"
    try:
        os.chown(home, account.uid, account.gid)
        port = free_port()
        env = {
            "PATH": f"{os.path.dirname(argv[0])}:/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "JUPYTER_TOKEN": secrets.token_urlsafe(24),
            "JUPYTER_PLATFORM_DIRS": "1",
            "JUPYTER_RUNTIME_DIR": str(home / ".run"),
        }
        with log.open("wb") as out:
            os.fchown(out.fileno(), account.uid, account.gid)
            proc = subprocess.Popen(  # noqa: S603
                [
                    *argv,
                    "--no-browser",
                    "--ip=127.0.0.1",
                    f"--port={port}",
                    "--port-retries=0",
                    f"--ServerApp.root_dir={home}",
                ],  # fmt: skip
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                user=account.uid,
                group=account.gid,
                extra_groups=[],
                start_new_session=True,
            )
        started = time.monotonic()
        while time.monotonic() - started < JUPYTER_START_TIMEOUT:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip()[-300:]
                report.fail(
                    "jupyter",
                    f"Jupyter exited ({proc.returncode}) as {account.name} before answering: "
                    f"{tail}",
                    "run the session environment's jupyter lab by hand as that account and "
                    "rebuild the environment if it fails",
                )
                return
            if _answers(port):
                report.ok(
                    "jupyter",
                    f"started as {account.name} and answered in {time.monotonic() - started:.1f} s",
                )
                return
            time.sleep(0.2)
        report.fail(
            "jupyter",
            f"no answer within {JUPYTER_START_TIMEOUT:.0f} s",
            "check the machine's load and the session environment",
        )
    except OSError as exc:
        report.fail("jupyter", f"cannot start it: {exc}", "run doctor as root")
    finally:
        if proc is not None:
            _end(proc)
        shutil.rmtree(home, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it serves
    except (urllib.error.URLError, OSError):
        return False


def _end(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- cloudflared, sandbox, presence -------------------------------------------------------------


def check_cloudflared(report: Report, config: AgentConfig) -> None:
    kind = config.tunnel.kind
    if not kind.startswith("cloudflared"):
        report.ok("cloudflared", f"not needed (tunnel {kind})")
        return
    exe = shutil.which(config.tunnel.cloudflared)
    fix = (
        "install cloudflared from Cloudflare's package repository (pkg.cloudflare.com) or set "
        "tunnel.cloudflared to its full path"
    )
    if exe is None:
        report.fail("cloudflared", f"{config.tunnel.cloudflared!r} not found", fix)
        return
    try:
        done = subprocess.run(  # noqa: S603
            [exe, "--version"], capture_output=True, text=True, timeout=15, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        report.fail("cloudflared", f"{exe} does not run: {exc}", fix)
        return
    version = (done.stdout or done.stderr).strip().splitlines()
    if done.returncode != 0 or not version:
        report.fail("cloudflared", f"{exe} --version exited {done.returncode}", fix)
        return
    report.ok("cloudflared", f"{exe}: {version[0]}")


def check_sandbox(report: Report) -> None:
    from nexcompute_agent.sessions import sandbox

    support = sandbox.detect()
    if not support.root:
        report.fail(
            "sandbox",
            "not root: sessions would run unsandboxed as the agent's user",
            "run the agent (and doctor) as root",
        )
        return
    if support.problem is not None:
        report.fail("sandbox", support.problem, "install the missing package")
        return
    report.ok("sandbox", "; ".join(support.lines()))


def check_presence(report: Report, config: AgentConfig) -> None:
    from nexcompute_agent.presence import make_detector

    sample = make_detector(config).sample()
    state = "someone at the keyboard" if sample.owner_present else "nobody at the keyboard"
    if sample.source == "utmp" and install.systemd_running():
        report.fail(
            "presence",
            "systemd runs but logind does not answer on the system bus; utmp misses graphical "
            "(GDM) logins",
            "start systemd-logind (and install the agent with its jeepney dependency)",
        )
        return
    extra = ""
    if sample.idle_seconds is not None:
        extra = f", idle {sample.idle_seconds:.0f} s"
    if sample.locked:
        extra += ", screen locked"
    report.ok("presence", f"{sample.source}: {state}{extra}")
