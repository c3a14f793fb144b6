"""``nexcompute-agent install`` and ``uninstall``: set a lab computer up end to end, and take
all of it away again.

``install`` (root, Linux) creates, in this order, and records each thing it *created* (not what
was there before) in ``install.json`` beside the config (mode 0600):

1. the session accounts ``<prefix>1..K`` (``sessions.accounts.create_accounts``; the deny
   files ``/etc/cron.deny`` and ``/etc/at.deny`` if it had to make them),
2. the workspace root,
3. the session environment (built with the packaged recipe, see ``sessionenv``) unless
   ``--session-env`` names a built one,
4. the enrollment (the join token is spent only after every check above passed),
5. the config file (0600) with ``jupyter_command`` pointing into the session environment,
6. the systemd unit ``nexcompute-agent.service``, enabled and started where systemd runs.

``uninstall`` reads that record and removes exactly what it lists: it stops the unit, ends
every process of the session accounts, unmounts what sessions left mounted under the workspace
root, deletes the accounts only if they still look like session accounts (no home, no login
shell: ``accounts.lookup``), then the workspace root, the session environment (only if install
built it), the state directory, the config, the record and the folders install made for them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nexcompute_agent import sessionenv
from nexcompute_agent.config import AgentConfig, write_private_file

UNIT_NAME = "nexcompute-agent.service"
UNIT_DIR = Path("/etc/systemd/system")
RECORD_NAME = "install.json"
SYSTEMCTL_TIMEOUT = 60.0


class InstallError(Exception):
    """Install or uninstall cannot go on; the text says why and what to do."""


def systemd_running() -> bool:
    """systemd is PID 1 (``sd_booted()``'s test)."""
    return Path("/run/systemd/system").is_dir()


def unit_text(config_path: Path, python: str = sys.executable) -> str:
    """The unit: the agent runs as root with what the sandbox needs, and no more.

    Why each hardening directive is, or is not, here (systemd.exec(5)):

    * No directive that gives the service its own mount namespace: ``ProtectSystem``,
      ``ProtectHome``, ``PrivateTmp``, ``PrivateDevices``, ``ReadWritePaths``,
      ``ProtectKernelTunables``, ``ProtectKernelModules``, ``ProtectKernelLogs``,
      ``ProtectControlGroups``, ``ProtectProc``, ``ProtectHostname``. The agent loop-mounts each
      session's workspace and its sessions outlive an agent restart (``KillMode=process``); in
      a private namespace those mounts would be invisible to the next agent, which could then
      neither re-adopt nor wipe them. They also hide ``/sys/fs/cgroup`` (cgroup limits) and
      ``/dev/loop*`` (workspace size caps) that the sandbox needs.
    * No ``DevicePolicy``/``DeviceAllow``/``ProtectClock`` (which implies a device policy): the
      workspaces need ``/dev/loop-control`` and whatever loop device the kernel hands out.
    * No ``RestrictNamespaces``/``PrivateUsers``/``PrivateNetwork``: bubblewrap builds every
      sandbox from user, mount, PID, IPC and UTS namespaces, and Jupyter must be reachable.
    * No ``MemoryDenyWriteExecute``: it is inherited by sessions and breaks JITs (numba, V8).
    * No ``CapabilityBoundingSet``: mounting, chown, setuid to the session accounts, cgroup
      writes and killing any process of a session account need most of root's capabilities.
    * Kept: ``NoNewPrivileges`` (nothing in a session gains privileges through a setuid file;
      the agent is root already and bubblewrap runs unprivileged-mode-free as root),
      ``RestrictSUIDSGID`` (no session can make a setuid file), ``LockPersonality``,
      ``RestrictRealtime``, ``SystemCallArchitectures=native``, ``RestrictAddressFamilies``
      (IP, Unix and netlink; bubblewrap sets up loopback over netlink), ``UMask=0077``.
    * ``Delegate=yes``: the agent makes a cgroup per session under its own (``v2_parent``).
    * ``KillMode=process``: a stop or restart ends the agent only; live sessions (bubblewrap,
      Jupyter, tunnels) keep running for the next agent to re-adopt or wipe.
    * ``Restart=always``: an agent that crashes or exits (e.g. a revoked credential, exit 3)
      comes back; ``RestartSec`` keeps a crash loop slow.
    """
    exec_start = shlex.join([python, "-m", "nexcompute_agent", "run", "--config", str(config_path)])
    return f"""\
# Written by `nexcompute-agent install`; `nexcompute-agent uninstall` removes it.
# Why these directives and not others: nexcompute_agent/install.py, unit_text().
[Unit]
Description=NexCompute lab agent (lends this computer's idle time as Jupyter sessions)
Documentation=https://github.com/nexcompute/nexcompute/blob/main/agent/README.md
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
ExecStart={exec_start}
Environment=PYTHONUNBUFFERED=1
Restart=always
RestartSec=5
KillMode=process
KillSignal=SIGTERM
TimeoutStopSec=30
Delegate=yes
UMask=0077
NoNewPrivileges=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictRealtime=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK

[Install]
WantedBy=multi-user.target
"""


@dataclass
class InstallRecord:
    """What install created (and so what uninstall may remove)."""

    config: str
    unit: str
    accounts: list[str] = field(default_factory=list)
    deny_files: list[str] = field(default_factory=list)  # made by install
    workspace_root: str | None = None  # made by install
    session_env: str | None = None  # built by install
    state_dir: str | None = None
    dirs: list[str] = field(default_factory=list)  # parents made by install, deepest first

    @classmethod
    def load(cls, path: Path) -> InstallRecord:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            raise InstallError(
                f"{path} not found: nothing was installed with this config (or it is gone); "
                "pass the --config that install used"
            ) from None
        except (OSError, ValueError, TypeError) as exc:
            raise InstallError(f"cannot read {path}: {exc}") from None

    def save(self, path: Path) -> None:
        write_private_file(path, json.dumps(asdict(self), indent=2) + "\n")


def record_path(config_path: Path) -> Path:
    return config_path.parent / RECORD_NAME


def require_root() -> None:
    if not sys.platform.startswith("linux"):
        raise InstallError("install and uninstall set up Linux lab computers only")
    if os.geteuid() != 0:
        raise InstallError("run this as root (sudo nexcompute-agent ...)")


def make_dirs(path: Path, mode: int, made: list[str]) -> bool:
    """mkdir -p, noting each folder made (deepest first in ``made``). True if ``path`` is new."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=mode)
        d.chmod(mode)  # the umask must not narrow it
        made.insert(0, str(d))
    return bool(missing)


def systemctl(*args: str) -> tuple[bool, str]:
    try:
        done = subprocess.run(  # noqa: S603
            ["systemctl", *args],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return done.returncode == 0, (done.stderr or done.stdout).strip()


def install_unit(record: InstallRecord, config_path: Path, unit_dir: Path) -> str:
    """Write the unit; enable and start it where systemd runs. Returns what happened."""
    unit = unit_dir / UNIT_NAME
    make_dirs(unit_dir, 0o755, record.dirs)
    tmp = unit.with_suffix(".tmp")
    tmp.write_text(unit_text(config_path))
    tmp.chmod(0o644)
    tmp.replace(unit)
    record.unit = str(unit)
    if not systemd_running():
        return (
            f"wrote {unit}, but could not enable it: systemd is not running here (PID 1 is "
            f"{_pid1()}). Start the agent another way: nexcompute-agent run --config {config_path}"
        )
    ok, why = systemctl("daemon-reload")
    if ok:
        ok, why = systemctl("enable", "--now", UNIT_NAME)
    if not ok:
        return f"wrote {unit}, but `systemctl enable --now {UNIT_NAME}` failed: {why}"
    return f"installed and started {UNIT_NAME} ({unit})"


def _pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip()
    except OSError:
        return "unknown"


def prepare_host(
    record: InstallRecord,
    config: AgentConfig,
    *,
    session_env: str | None,
    say: Any = print,
) -> Path:
    """Steps 1-3: accounts, workspace root, session environment. Returns the environment."""
    from nexcompute_agent.sessions.accounts import DENY_FILES, create_accounts, pool_names

    if session_env is not None:
        env = sessionenv.find(session_env)
        if env is None:
            raise InstallError(
                f"--session-env {session_env} is not a built session environment (no "
                f"bin/jupyter and bin/jupyter-lab); build one with: sh {sessionenv.recipe()} DIR"
            )
    else:
        env = sessionenv.DEFAULT_DIR
        if not sessionenv.looks_usable(env):
            say(f"building the session environment in {env} (a few minutes)")
            made_env = not env.exists()
            try:
                sessionenv.build(env)
            except (OSError, subprocess.SubprocessError) as exc:
                raise InstallError(f"cannot build the session environment {env}: {exc}") from None
            if made_env:
                record.session_env = str(env)

    import pwd

    names = pool_names(config.session_pool_prefix, config.session_pool_size, config.session_user)
    new = []
    for name in names:
        try:
            pwd.getpwnam(name)
        except KeyError:
            new.append(name)
    deny_missing = [p for p in DENY_FILES if not Path(p).exists()]
    try:
        create_accounts(names)
    except (OSError, subprocess.SubprocessError) as exc:
        raise InstallError(f"cannot create the session accounts: {exc}") from None
    finally:
        record.accounts = new  # made even if a later one failed: uninstall removes them
        record.deny_files = [p for p in deny_missing if Path(p).exists()]
    say(f"session accounts ready: {', '.join(names)}" + (f" (created {len(new)})" if new else ""))

    root = Path(config.workspace_root)
    if make_dirs(root, 0o711, record.dirs):
        record.workspace_root = str(root)
        record.dirs.remove(str(root))
    # The agent's state (sessions.json with Jupyter tokens and receipts, session logs): made
    # here so that uninstall knows it is ours to remove.
    state = Path(config.state_dir)
    if make_dirs(state, 0o700, record.dirs):
        record.state_dir = str(state)
        record.dirs.remove(str(state))
    _check_env_usable(env, names[0])
    return env


def _check_env_usable(env: Path, account: str) -> None:
    """The session account can run the environment's Jupyter (PITFALLS: pyenv under /root)."""
    import pwd

    pw = pwd.getpwnam(account)
    try:
        done = subprocess.run(  # noqa: S603
            [str(env / "bin" / "jupyter-lab"), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            user=pw.pw_uid,
            group=pw.pw_gid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"},
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise InstallError(
            f"session account {account} cannot run {env}/bin/jupyter-lab: {exc}"
        ) from None
    if done.returncode != 0:
        raise InstallError(
            f"session account {account} cannot run {env}/bin/jupyter-lab (exit "
            f"{done.returncode}: {done.stderr.strip()[-300:]}); the environment must be "
            f"readable by every user: rebuild it with sh {sessionenv.recipe()} {env}"
        )


# --- uninstall ----------------------------------------------------------------------------------


def uninstall(config_path: Path, *, say: Any = print) -> list[str]:
    """Remove what the record lists. Returns problems (empty: everything is gone)."""
    from nexcompute_agent.sessions import cleanup
    from nexcompute_agent.sessions.accounts import PoolError, lookup, remove_accounts

    rpath = record_path(config_path)
    record = InstallRecord.load(rpath)
    problems: list[str] = []
    unit = Path(record.unit) if record.unit else None
    if unit is not None and systemd_running():
        ok, why = systemctl("disable", "--now", UNIT_NAME)
        if not ok and unit.exists():
            problems.append(f"systemctl disable --now {UNIT_NAME}: {why}")
    _stop_agent(config_path)
    if unit is not None and unit.is_file():
        unit.unlink()
        say(f"removed {unit}")
        if systemd_running():
            systemctl("daemon-reload")

    ours = []
    for name in record.accounts:
        try:
            ours.append(lookup(name))
        except PoolError as exc:
            problems.append(f"kept account {name}: {exc}")
    for account in ours:
        survivors = cleanup.kill_all(functools.partial(cleanup.user_processes, account.uid), set())
        if survivors:
            problems.append(f"processes of {account.name} would not die: {survivors}")
    if record.workspace_root:
        _unmount_under(Path(record.workspace_root), problems)
    remove_accounts([a.name for a in ours])
    say(f"removed session accounts: {', '.join(a.name for a in ours) or 'none'}")
    for path in record.deny_files:
        with contextlib.suppress(OSError):
            if not Path(path).read_text().strip():
                Path(path).unlink()

    for folder in (record.workspace_root, record.session_env, record.state_dir):
        if folder and Path(folder).exists():
            shutil.rmtree(folder, ignore_errors=True)
            if Path(folder).exists():
                problems.append(f"could not remove {folder}")
            else:
                say(f"removed {folder}")
    for file in (Path(record.config), rpath):
        file.unlink(missing_ok=True)
    say(f"removed {record.config}")
    for folder in record.dirs:
        with contextlib.suppress(OSError):
            Path(folder).rmdir()  # only if empty: something else may live there now
    return problems


def _stop_agent(config_path: Path) -> None:
    """End an agent still running with this config outside systemd (``run --config``)."""
    import psutil

    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if (
            proc.info["pid"] != me
            and "run" in cmd
            and str(config_path) in cmd
            and any("nexcompute" in c for c in cmd)
        ):
            with contextlib.suppress(psutil.Error):
                proc.terminate()
                proc.wait(10)


def _unmount_under(root: Path, problems: list[str]) -> None:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(root).rstrip("/") + "/"
    points = [
        p.encode().decode("unicode_escape")
        for p in (line.split()[1] for line in lines if len(line.split()) > 1)
    ]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        done = subprocess.run(  # noqa: S603
            ["umount", "--lazy", point],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            problems.append(f"could not unmount {point}: {done.stderr.strip()}")
