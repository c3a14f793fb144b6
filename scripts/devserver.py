#!/usr/bin/env python
"""`make run`: everything a newcomer needs, in one terminal; Ctrl-C ends all of it.

Migrates, creates the demo accounts, makes sure Redis is reachable (starting `redis-server`
from PATH on a free port if not), enrolls one local agent with the `direct` tunnel, then
supervises daphne, a Celery worker, Celery beat and the agent. Each child runs in its own
process group and is ended by that id; if one dies, the rest are stopped too.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VAR = Path(os.environ.get("NEXCOMPUTE_VAR_DIR", ROOT / "var")).resolve()
# The same file nexcompute/settings.py reads.
ENV_FILE = Path(os.environ.get("NEXCOMPUTE_ENV_FILE") or ROOT / ".env")
ENV_MARK = "# Written by `make run`"


def say(msg: str) -> None:
    print(f"[make run] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_env_file(env: dict[str, str], values: dict[str, str]) -> None:
    """Write the local .env on the first run (mode 0600: it holds SECRET_KEY), so that every
    `manage.py` command in a second shell of this checkout sees what make run's processes see.
    A file make run wrote is kept up to date (REDIS_URL and the public URL may change from run
    to run); a file a person wrote is never touched."""
    if not ENV_FILE.exists():
        lines = [
            f"{ENV_MARK} for local development; edit freely, or delete it to start over.",
            "# Production settings: .env.example and README, Deploy.",
            "DEBUG=1",
            f"SECRET_KEY={secrets.token_urlsafe(50)}",
        ]
        fd = os.open(ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        say(f"wrote {ENV_FILE} (DEBUG on, a random SECRET_KEY, this run's URLs)")
    text = ENV_FILE.read_text()
    if not text.startswith(ENV_MARK):
        return
    for key, value in values.items():
        lines = text.splitlines()
        mine = [i for i, line in enumerate(lines) if line.startswith(f"{key}=")]
        if mine:
            lines[mine[0]] = f"{key}={value}"
        else:
            lines.append(f"{key}={value}")
        text = "\n".join(lines) + "\n"
    ENV_FILE.write_text(text)


def read_env_file() -> dict[str, str]:
    from dotenv import dotenv_values

    if not ENV_FILE.exists():
        return {}
    return {k: v for k, v in dotenv_values(ENV_FILE).items() if v is not None}


def redis_reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Supervisor:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = False

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, start_new_session=True)
        self.children.append((name, proc))
        say(f"started {name} (pid {proc.pid})")
        return proc

    def stop_all(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                say(f"stopping {name} (pid {proc.pid})")
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for _name, proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _name, proc in self.children:
            try:  # whatever is left in each group, leader or not
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(timeout=5)

    def watch(self) -> int:
        while True:
            for name, proc in self.children:
                code = proc.poll()
                if code is not None:
                    say(f"{name} exited with {code}; stopping everything")
                    return 1
            time.sleep(0.5)


def manage(env: dict[str, str], *args: str, capture: bool = False) -> str:
    out = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        check=True,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    return out.stdout or ""


def enroll_agent(env: dict[str, str], server: str) -> Path:
    """The local agent's config: reused while it points at this server and its credential is
    still known here (a reset database or another PORT means enrolling again)."""
    config = VAR / "agent" / "agent.toml"
    jupyter = session_environment()  # first: a failed build must not leave a half config
    if config.exists():
        text = config.read_text()
        cred = re.search(r'(?m)^credential = "(.*)"$', text)
        known = cred is not None and (
            manage(
                {**env, "NEXCOMPUTE_CHECK_CREDENTIAL": cred.group(1)},  # not in argv (ps)
                "shell",
                "-c",
                AGENT_KNOWN,
                capture=True,
            )
            .strip()
            .endswith("yes")
        )
        if f'server = "{server}"' in text and known:
            say(f"agent already enrolled ({config})")
            return config
        say("the local agent's enrollment is stale (other server or database): enrolling again")
        config.unlink()
    config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = manage(env, "createenrollmenttoken", "--lab", "Local lab", "--create-lab", capture=True)
    join = token.strip().splitlines()[-1]
    # As root, sessions run as the session user, who must reach the workspace: not under a
    # checkout that may sit in /root (0700).
    workspaces = "/var/lib/nexcompute/workspaces" if os.geteuid() == 0 else VAR / "workspaces"
    argv = [
        str(BIN / "nexcompute-agent"),
        "enroll",
        "--server",
        server,
        f"--token={join}",
        "--config",
        str(config),
        "--workspace-root",
        str(workspaces),
        "--tunnel",
        "direct",
    ]
    if os.geteuid() == 0:
        argv.append("--create-accounts")  # the session accounts nxs-1 … nxs-4
    subprocess.run(argv, cwd=ROOT, env=env, check=True)
    text = config.read_text()
    text = re.sub(
        r"(?m)^jupyter_command = .*$",
        f'jupyter_command = ["{jupyter}/bin/jupyter", "lab"]',
        text,
    )
    # Top-level keys go before the first [table], or TOML files them under it.
    head, sep, tail = text.partition("\n[")
    text = f'{head}\nstate_dir = "{VAR / "agent" / "state"}"\n{sep}{tail}'
    config.write_text(text)  # the file keeps its 0600 mode
    return config


AGENT_KNOWN = (
    "import os; from machines.services import machine_authenticate;"
    "print('yes' if machine_authenticate(os.environ['NEXCOMPUTE_CHECK_CREDENTIAL']) else 'no')"
)


def session_environment() -> Path:
    """The Python environment Jupyter sessions run from; it must be usable by the session
    user, so it lives outside /root and is built from Debian's Python (PITFALLS)."""
    target = Path(os.environ.get("NEXCOMPUTE_SESSION_ENV", "/var/tmp/nexcompute-session-env"))
    subprocess.run([str(ROOT / "scripts" / "make-session-env.sh"), str(target)], check=True)
    return target


def check_sandbox() -> None:
    """As root, each session runs as a fresh pool account in a bubblewrap sandbox; say what is
    missing rather than let every session fail."""
    if os.geteuid() != 0:
        say("not root: the local agent runs sessions as this user, without a sandbox (a demo)")
        return
    if shutil.which("bwrap") is None:
        say("warning: bubblewrap is missing, so sessions cannot start: apt-get install bubblewrap")


def banner(port: int, password: str) -> None:
    say("-" * 68)
    say(f"NexCompute is up: http://127.0.0.1:{port}")
    say(f"  log in as student / {password}   (staff: admin / {password})")
    say(f"  API docs: http://127.0.0.1:{port}/api/docs")
    say("  an API token: .venv/bin/python manage.py createapitoken student")
    say("Ctrl-C stops everything.")
    say("-" * 68)


def main() -> int:
    # The real environment wins over the local .env (as in settings.py).
    env = {**read_env_file(), **os.environ}
    port = int(env.get("PORT", "8000"))
    env["PATH"] = f"{BIN}:{os.environ.get('PATH', '')}"
    # The public URL follows PORT unless the real environment says otherwise: the printed
    # enroll command (createenrollmenttoken) must name the server that actually runs.
    env["NEXCOMPUTE_PUBLIC_URL"] = (
        os.environ.get("NEXCOMPUTE_PUBLIC_URL") or f"http://127.0.0.1:{port}"
    )
    env.setdefault("DEBUG", "1")
    env.setdefault("NEXCOMPUTE_METRICS_ALLOWED_NETWORKS", "127.0.0.1/32,::1/128")
    env["PYTHONUNBUFFERED"] = "1"
    VAR.mkdir(exist_ok=True)
    (VAR / "static").mkdir(exist_ok=True)
    # Prometheus multi-process mode: daphne, the worker and beat add up in /metrics. Samples of
    # a previous run are stale.
    metrics_dir = VAR / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir()
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    sup = Supervisor(env)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        redis_url = env.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        if not redis_reachable(redis_url):
            server = shutil.which("redis-server")
            if server is None:
                say(
                    f"Redis is not reachable at {redis_url} and redis-server is not on PATH. "
                    "Install it (Debian: apt-get install redis-server) or set REDIS_URL."
                )
                return 2
            rport = free_port()
            sup.start(
                "redis",
                [
                    server,
                    "--port",
                    str(rport),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
            )
            env["REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
            deadline = time.monotonic() + 10
            while not redis_reachable(env["REDIS_URL"]):
                if time.monotonic() > deadline:
                    say("redis-server did not come up")
                    return 2
                time.sleep(0.1)
        local_env_file(
            env,
            {
                "DATABASE_URL": env.get("DATABASE_URL") or f"sqlite:///{ROOT / 'db.sqlite3'}",
                "REDIS_URL": env.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                "NEXCOMPUTE_PUBLIC_URL": env["NEXCOMPUTE_PUBLIC_URL"],
                "PORT": str(port),
            },
        )
        env.update({k: v for k, v in read_env_file().items() if k not in os.environ})
        manage(env, "migrate", "--noinput")
        pw_file = VAR / "demo-password"
        if not pw_file.exists():
            fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(9))
        password = pw_file.read_text().strip()
        manage(env, "createdemoaccounts", "--password", password, "--reset")
        say(f"demo accounts: admin / {password} (staff), student / {password}")
        sup.start(
            "web",
            [
                str(BIN / "daphne"),
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "nexcompute.asgi:application",
            ],
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    say("the web server did not start")
                    return 1
                time.sleep(0.2)
        sup.start(
            "worker",
            [
                str(BIN / "celery"),
                "-A",
                "nexcompute",
                "worker",
                "--loglevel=INFO",
                "--concurrency=2",
            ],
        )
        sup.start(
            "beat",
            [
                str(BIN / "celery"),
                "-A",
                "nexcompute",
                "beat",
                "--loglevel=INFO",
                "--schedule",
                str(VAR / "celerybeat-schedule"),
            ],
        )
        check_sandbox()
        config = enroll_agent(env, f"http://127.0.0.1:{port}")
        sup.start("agent", [str(BIN / "nexcompute-agent"), "run", "--config", str(config)])
        # Again at the end of start-up, where a person looks (the first lines have scrolled).
        banner(port, password)
        return sup.watch()
    except KeyboardInterrupt:
        return 0
    finally:
        sup.stop_all()
        say("all stopped")


if __name__ == "__main__":
    sys.exit(main())
