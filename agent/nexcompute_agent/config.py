"""Agent configuration: a TOML file written by ``enroll`` and editable by a person.

The keys listed in CONTRACT.md are fixed; the rest are optional tuning knobs with defaults.
Unknown keys are ignored (with a warning) so that a newer config does not break an older agent.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import stat
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast, get_args
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

log = logging.getLogger(__name__)

TunnelKind = Literal["direct", "cloudflared-quick", "cloudflared-named"]
TUNNEL_KINDS: tuple[str, ...] = get_args(TunnelKind)


class ConfigError(Exception):
    """The config file is missing, unreadable, malformed or unsafe. The CLI exits 2."""


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_config_path() -> Path:
    """``/etc/nexcompute/agent.toml`` for root, else ``~/.config/nexcompute/agent.toml``."""
    if _is_root():
        return Path("/etc/nexcompute/agent.toml")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nexcompute" / "agent.toml"


def default_state_dir() -> str:
    if _is_root():
        return "/var/lib/nexcompute/agent"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "nexcompute")


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (where plain HTTP never leaves the machine)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TunnelConfig:
    kind: TunnelKind = "direct"
    public_host: str = "127.0.0.1"
    cloudflared: str = "cloudflared"
    token: str = ""
    hostname: str = ""
    # cloudflared-named: the local port its (remotely managed) ingress points at.
    origin_port: int = 8888
    # direct off loopback: the certificate (chain) and key Jupyter serves HTTPS with (PEM).
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(frozen=True)
class AgentConfig:
    server: str
    credential: str = ""
    machine_id: int | None = None
    workspace_root: str = "/var/lib/nexcompute/workspaces"
    session_user: str = "nexsession"
    # The pool of per-session accounts <prefix>1..<prefix>N; size 0: the single session_user
    # (a pool of one, the old form).
    session_pool_prefix: str = "nxs-"
    session_pool_size: int = 0
    heartbeat_seconds: float = 10.0
    jupyter_command: tuple[str, ...] = ("jupyter", "lab")
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    # Tuning knobs (not written by enroll unless asked; tests set them small).
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    presence_poll_seconds: float = 1.0
    presence_ignore_users: tuple[str, ...] = ()
    state_dir: str = field(default_factory=default_state_dir)
    nvidia_smi: str = "nvidia-smi"
    # Sessions (see nexcompute_agent/sessions/).
    jupyter_start_timeout: float = 60.0
    tunnel_start_timeout: float = 60.0
    session_stop_grace: float = 5.0
    # Before the stop ladder: how long to wait for the Lab's "all saved" (0: do not ask).
    session_save_wait: float = 10.0
    session_max_processes: int = 512
    session_cpus: float = 0.0  # cgroup cpu.max in CPUs; 0 = no limit
    session_cgroup: str = "auto"  # "auto": cgroup v2 when usable, else rlimits; "off": rlimits
    # The folder the sessions' cgroups are made in (one agent per host: leave it).
    session_cgroup_parent: str = "nexcompute"
    activity_seconds: float = 60.0  # how often a running session's activity is reported
    # The idle rule's CPU part (docs/policy.md): the session's processes count as working when
    # they use at least this percent of one core, averaged over the last window.
    idle_cpu_percent: float = 10.0
    idle_cpu_window_seconds: float = 300.0
    idle_gpu_percent: float = 10.0  # a session process on a GPU at least this busy is working
    # On SIGTERM/SIGINT, leave running sessions running for the next agent to take back (an
    # upgrade or `systemctl restart`)? "auto": yes under systemd (INVOCATION_ID set), no
    # otherwise (`make run`'s Ctrl-C leaves no process behind). A crash or kill -9 always does.
    keep_sessions_on_stop: str = "auto"
    # Defaults for limits the server does not send (see docs/sandbox.md).
    session_workspace_gb: float = 20.0  # 0: no size cap (a plain folder)
    # The owner's ceiling on the workspace the server's policy may ask for (reserved on this
    # machine's disk for the session's life); 0: no ceiling.
    session_workspace_max_gb: float = 0.0
    session_memory_percent: float = 75.0  # of the machine's RAM; 0: no memory limit
    # Where this config was read from; not a TOML key.
    path: Path | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        # Keep the credential and tunnel token out of logs and tracebacks.
        return (
            f"AgentConfig(server={self.server!r}, machine_id={self.machine_id!r}, "
            f"path={self.path!s})"
        )

    @property
    def websocket_url(self) -> str:
        """``server`` with http→ws / https→wss and ``/ws/agent/`` appended to its path."""
        parts = urlsplit(self.server)
        scheme = {"http": "ws", "https": "wss"}[parts.scheme]
        path = parts.path.rstrip("/")
        return f"{scheme}://{parts.netloc}{path}/ws/agent/"

    def to_toml_dict(self) -> dict[str, Any]:
        """The keys ``enroll`` writes, in file order (``machine_id`` only when known)."""
        out: dict[str, Any] = {"server": self.server, "credential": self.credential}
        if self.machine_id is not None:
            out["machine_id"] = self.machine_id
        out.update(
            workspace_root=self.workspace_root,
            session_user=self.session_user,
            session_pool_prefix=self.session_pool_prefix,
            session_pool_size=self.session_pool_size,
            heartbeat_seconds=self.heartbeat_seconds,
            jupyter_command=list(self.jupyter_command),
            tunnel=asdict(self.tunnel),
        )
        return out


def validate_server_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"server must be an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ConfigError("server must not have a query or fragment")
    return value.rstrip("/")


# --- value readers ------------------------------------------------------------------------------


def _str(d: dict[str, Any], key: str, default: str, where: str) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}{key} must be a string")
    return value


def _number(
    d: dict[str, Any], key: str, default: float, lo: float, hi: float, where: str = ""
) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}{key} must be a number")
    value = float(value)
    if not math.isfinite(value) or not lo < value <= hi:
        raise ConfigError(f"{where}{key} must be > {lo:g} and <= {hi:g}, got {value:g}")
    return value


def _str_list(d: dict[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = d.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of strings")
    return tuple(value)


def config_from_dict(data: dict[str, Any], path: Path | None = None) -> AgentConfig:
    """Validate a parsed TOML document. Raises :class:`ConfigError` naming the bad key."""
    known = {f.name for f in fields(AgentConfig)} - {"path"}
    for key in sorted(set(data) - known):
        log.warning("config: ignoring unknown key %r", key)
    if "server" not in data:
        raise ConfigError("server is missing (run `nexcompute-agent enroll` first)")
    server = validate_server_url(_str(data, "server", "", ""))

    raw_tunnel = data.get("tunnel", {})
    if not isinstance(raw_tunnel, dict):
        raise ConfigError("[tunnel] must be a table")
    kind = _str(raw_tunnel, "kind", "direct", "tunnel.")
    if kind not in TUNNEL_KINDS:
        raise ConfigError(f"tunnel.kind must be one of {', '.join(TUNNEL_KINDS)}, got {kind!r}")
    tunnel = TunnelConfig(
        kind=cast("TunnelKind", kind),
        public_host=_str(raw_tunnel, "public_host", "127.0.0.1", "tunnel."),
        cloudflared=_str(raw_tunnel, "cloudflared", "cloudflared", "tunnel."),
        token=_str(raw_tunnel, "token", "", "tunnel."),
        hostname=_str(raw_tunnel, "hostname", "", "tunnel."),
        origin_port=int(_number(raw_tunnel, "origin_port", 8888, 0, 65535, "tunnel.")),
        tls_cert=_str(raw_tunnel, "tls_cert", "", "tunnel."),
        tls_key=_str(raw_tunnel, "tls_key", "", "tunnel."),
    )
    if bool(tunnel.tls_cert) != bool(tunnel.tls_key):
        raise ConfigError("tunnel.tls_cert and tunnel.tls_key go together")
    if kind == "direct" and not is_loopback(tunnel.public_host) and not tunnel.tls_cert:
        raise ConfigError(
            f"tunnel.public_host {tunnel.public_host!r} is not a loopback address: a direct "
            "tunnel off loopback serves Jupyter over HTTPS only. Set tunnel.tls_cert and "
            "tunnel.tls_key (PEM files for that host name), or use a cloudflared tunnel, or "
            'public_host = "127.0.0.1"'
        )
    if kind == "cloudflared-named" and not (tunnel.token and tunnel.hostname):
        raise ConfigError("tunnel.kind cloudflared-named needs tunnel.token and tunnel.hostname")

    machine_id = data.get("machine_id")
    if machine_id is not None and (isinstance(machine_id, bool) or not isinstance(machine_id, int)):
        raise ConfigError("machine_id must be an integer")
    session_user = _str(data, "session_user", "nexsession", "")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", session_user):
        raise ConfigError(f"session_user is not a valid user name: {session_user!r}")
    pool_prefix = _str(data, "session_pool_prefix", "nxs-", "")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,24}", pool_prefix):
        raise ConfigError(f"session_pool_prefix is not a valid user name prefix: {pool_prefix!r}")
    pool_size = data.get("session_pool_size", 0)
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or not 0 <= pool_size <= 64:
        raise ConfigError("session_pool_size must be an integer from 0 to 64")
    jupyter_command = _str_list(data, "jupyter_command", ("jupyter", "lab"))
    if not jupyter_command:
        raise ConfigError("jupyter_command must not be empty")
    backoff_initial = _number(data, "backoff_initial", 1.0, 0, 3600)
    backoff_max = _number(data, "backoff_max", 60.0, 0, 86400)
    if backoff_max < backoff_initial:
        raise ConfigError("backoff_max must be >= backoff_initial")
    return AgentConfig(
        server=server,
        credential=_str(data, "credential", "", ""),
        machine_id=machine_id,
        workspace_root=_str(data, "workspace_root", "/var/lib/nexcompute/workspaces", ""),
        session_user=session_user,
        session_pool_prefix=pool_prefix,
        session_pool_size=pool_size,
        heartbeat_seconds=_number(data, "heartbeat_seconds", 10.0, 0, 3600),
        jupyter_command=jupyter_command,
        tunnel=tunnel,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        presence_poll_seconds=_number(data, "presence_poll_seconds", 1.0, 0, 3600),
        presence_ignore_users=_str_list(data, "presence_ignore_users", ()),
        state_dir=_str(data, "state_dir", default_state_dir(), ""),
        nvidia_smi=_str(data, "nvidia_smi", "nvidia-smi", ""),
        jupyter_start_timeout=_number(data, "jupyter_start_timeout", 60.0, 0, 3600),
        tunnel_start_timeout=_number(data, "tunnel_start_timeout", 60.0, 0, 3600),
        session_stop_grace=_number(data, "session_stop_grace", 5.0, 0, 600),
        session_save_wait=_number(data, "session_save_wait", 10.0, 0, 120),
        session_max_processes=int(_number(data, "session_max_processes", 512, 7, 1 << 22)),
        session_cpus=_session_cpus(data),
        session_cgroup=_session_cgroup(data),
        session_cgroup_parent=_session_cgroup_parent(data),
        activity_seconds=_number(data, "activity_seconds", 60.0, 0, 86400),
        idle_cpu_percent=_number(data, "idle_cpu_percent", 10.0, 0, 6_553_600),
        idle_cpu_window_seconds=_number(data, "idle_cpu_window_seconds", 300.0, 0, 86400),
        idle_gpu_percent=_number(data, "idle_gpu_percent", 10.0, 0, 100),
        keep_sessions_on_stop=_keep_sessions(data),
        session_workspace_gb=_optional_number(data, "session_workspace_gb", 20.0, 1 << 20),
        session_workspace_max_gb=_optional_number(data, "session_workspace_max_gb", 0.0, 1 << 20),
        session_memory_percent=_optional_number(data, "session_memory_percent", 75.0, 100),
        path=path,
    )


def _optional_number(data: dict[str, Any], key: str, default: float, hi: float) -> float:
    """A number > 0 and <= hi, or 0 for "off"."""
    if data.get(key, default) == 0:
        return 0.0
    return _number(data, key, default, 0, hi)


def _keep_sessions(data: dict[str, Any]) -> str:
    value = data.get("keep_sessions_on_stop", "auto")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value != "auto":
        raise ConfigError('keep_sessions_on_stop must be true, false or "auto"')
    return "auto"


def keeps_sessions_on_stop(config: AgentConfig) -> bool:
    """Whether a stopping agent leaves its running sessions for the next one."""
    if config.keep_sessions_on_stop == "auto":
        return bool(os.environ.get("INVOCATION_ID"))  # set by systemd for a service
    return config.keep_sessions_on_stop == "yes"


def _session_cpus(data: dict[str, Any]) -> float:
    if data.get("session_cpus", 0) == 0:
        return 0.0
    return _number(data, "session_cpus", 0.0, 0, 4096)


def _session_cgroup(data: dict[str, Any]) -> str:
    value = _str(data, "session_cgroup", "auto", "")
    if value not in ("auto", "off"):
        raise ConfigError(f"session_cgroup must be auto or off, got {value!r}")
    return value


def _session_cgroup_parent(data: dict[str, Any]) -> str:
    value = _str(data, "session_cgroup_parent", "nexcompute", "")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", value):
        raise ConfigError(f"session_cgroup_parent is not a plain folder name: {value!r}")
    return value


def check_permissions(path: Path, data: dict[str, Any]) -> None:
    """Refuse a config that holds a secret and is readable by group or others."""
    if os.name != "posix" or not (data.get("credential") or _tunnel_token(data)):
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{path} holds a credential but has mode {mode:04o}; other users could read it.\n"
            f"Fix it with: chmod 600 {path}"
        )


def _tunnel_token(data: dict[str, Any]) -> bool:
    tunnel = data.get("tunnel")
    return isinstance(tunnel, dict) and bool(tunnel.get("token"))


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found (run `nexcompute-agent enroll` first)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_config(path: Path | None = None, *, require_credential: bool = True) -> AgentConfig:
    """Read, check and validate the config file.

    With ``require_credential`` (``run``), a missing credential or an unsafe file mode is an
    error; without it (``probe``), only the values are checked.
    """
    path = path or default_config_path()
    data = read_toml(path)
    if require_credential:
        check_permissions(path, data)
    config = config_from_dict(data, path)
    if require_credential and not config.credential:
        raise ConfigError(f"{path} has no credential (run `nexcompute-agent enroll` first)")
    return config


# --- writing ------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_string(value: str) -> str:
    """A TOML basic string. Control characters are escaped; lone surrogates are refused."""
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            raise ValueError("strings with lone surrogates cannot be written to TOML")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(toml_string(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps_toml(data: dict[str, Any]) -> str:
    """Serialize scalars, lists of strings and one level of tables (written last)."""
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if key not in tables:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for name, table in tables.items():
        lines.append("")
        lines.append(f"[{_toml_key(name)}]")
        for key, value in table.items():
            if isinstance(value, dict):
                raise TypeError("nested tables are not supported")
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (parent made 0700 if missing).

    The temp file is created with 0600 from the start, so the secret is never readable by others,
    not even for a moment; ``os.replace`` makes the switch atomic.
    """
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
    tmp = parent / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o600)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_config(path: Path, config: AgentConfig) -> None:
    write_private_file(path, dumps_toml(config.to_toml_dict()))
