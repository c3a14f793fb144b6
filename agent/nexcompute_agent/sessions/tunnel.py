"""Tunnel providers: how a student's browser reaches the session's Jupyter.

One interface: :meth:`Tunnel.open` takes Jupyter's loopback port and returns the public base
URL (no path, no token); :meth:`Tunnel.close` ends it; :meth:`Tunnel.exited` reports a tunnel
process that died. The session URL is ``<base>/lab?token=<session token>``.

- ``direct``: no process; ``http://<tunnel.public_host>:<port>`` on loopback. A non-loopback
  public_host binds all interfaces and needs ``tunnel.tls_cert``/``tls_key``: Jupyter then
  serves ``https://<public_host>:<port>`` itself; without them the agent refuses.
- ``cloudflared-quick``: ``cloudflared tunnel --no-autoupdate --metrics 127.0.0.1:M
  --grace-period Ns --url http://127.0.0.1:PORT``; ready when the metrics server's ``/ready``
  answers 200 (registered, not merely "URL printed"); hostname from ``/quicktunnel``.
- ``cloudflared-named``: ``cloudflared tunnel --no-autoupdate --metrics 127.0.0.1:M
  --grace-period Ns run`` with the token in ``TUNNEL_TOKEN`` (not argv, so ps does not show it);
  URL ``https://<tunnel.hostname>``. Its ingress lives in Cloudflare (remotely managed):
  ``<tunnel.hostname>`` → ``http://127.0.0.1:<tunnel.origin_port>``, so Jupyter listens on that
  fixed port for this provider.
See shared/CLOUDFLARED.md for the contract these rely on.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import TYPE_CHECKING

import psutil

from nexcompute_agent.config import is_loopback
from nexcompute_agent.sessions.http import free_port, http_get
from nexcompute_agent.sessions.process import ManagedProcess, SessionError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from nexcompute_agent.config import AgentConfig
    from nexcompute_agent.sessions.state import ProcRecord


class Tunnel:
    kind = "direct"
    # Nothing to open or wait for (``direct``): the start reports no ``tunnel_opening`` step,
    # whose report the server would handle before the session's ``ready``.
    opens_at_once = True
    bind_host = "127.0.0.1"
    tls: tuple[str, str] | None = None  # (cert, key) Jupyter serves HTTPS with
    fixed_port: int | None = None
    process: ManagedProcess | None = None
    on_started: Callable[[ManagedProcess], None] | None = None  # e.g. record it in the state file

    async def open(self, port: int) -> str:
        raise NotImplementedError

    async def adopt(
        self, port: int, proc: ProcRecord | None, metrics_port: int | None
    ) -> str | None:
        """Take back the tunnel an earlier agent opened for ``port`` (after an agent restart):
        its base URL, or None when it is gone and must be opened again."""
        return await self.open(port)  # direct: no process, the same URL

    async def close(self, grace: float) -> str:
        if self.process is None:
            return "exited"
        return await self.process.stop(grace)

    def exited(self) -> str | None:
        """Why the tunnel is gone, or None while it runs (always None for ``direct``)."""
        if self.process is None or self.process.poll() is None:
            return None
        return _exit_text(self.process)


def listens_on(pid: int, port: int) -> bool:
    """Whether the TCP socket listening on loopback ``port`` belongs to ``pid`` (or one of its
    children). The metrics port is picked free and then bound by cloudflared: anything else on
    this host (another account, the person at the console) could bind it first and answer
    ``/ready`` and ``/quicktunnel`` itself, choosing the URL the owner is sent to with the
    one-time code. So an answer counts only from cloudflared's own socket."""
    try:
        family = {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid in family
            for c in psutil.net_connections(kind="tcp")
        )
    except psutil.Error:
        return False


def _exit_text(proc: ManagedProcess) -> str:
    tail = proc.tail(3)
    return f"cloudflared exited with code {proc.poll()}" + (f": {tail}" if tail else "")


class DirectTunnel(Tunnel):
    """Loopback by default. Off loopback only with TLS (Jupyter's own ``certfile``/``keyfile``):
    never plain HTTP with a token or a sign-in code off this machine."""

    def __init__(self, public_host: str, tls_cert: str = "", tls_key: str = "") -> None:
        self.public_host = public_host
        loopback = is_loopback(public_host)
        self.bind_host = "127.0.0.1" if loopback else "0.0.0.0"  # noqa: S104
        if tls_cert and tls_key:
            self.tls = (tls_cert, tls_key)
        elif not loopback:  # the config refuses this already; a second lock on the same door
            raise SessionError(
                f"tunnel.public_host {public_host!r} is not a loopback address and no "
                "tunnel.tls_cert/tls_key is set: refusing to serve Jupyter over plain HTTP"
            )

    async def open(self, port: int) -> str:
        host = f"[{self.public_host}]" if ":" in self.public_host else self.public_host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"


class CloudflaredTunnel(Tunnel):
    opens_at_once = False  # registers with Cloudflare's edge first (seconds)

    def __init__(self, config: AgentConfig, log_path: Path, grace: float) -> None:
        self.exe = config.tunnel.cloudflared
        self.timeout = config.tunnel_start_timeout
        self.log_path = log_path
        self.grace = grace
        self.metrics_port = 0

    def argv(self, exe: str, port: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        home = self.log_path.parent / "cloudflared-home"
        home.mkdir(mode=0o700, exist_ok=True)
        return {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8",
        }

    async def hostname(self) -> str:
        raise NotImplementedError

    async def adopt(
        self, port: int, proc: ProcRecord | None, metrics_port: int | None
    ) -> str | None:
        """The recorded cloudflared, if it still runs (pid and start time) and its metrics
        server says it is registered (``/ready`` 200); else None."""
        if proc is None or metrics_port is None:
            return None
        found = ManagedProcess.adopt("tunnel", proc.pid, proc.create_time, log_path=self.log_path)
        if found is None:
            return None
        try:
            status, _ = await http_get("127.0.0.1", metrics_port, "/ready", timeout=2.0)
        except (OSError, asyncio.TimeoutError, TimeoutError):
            return None
        if status != 200 or not await asyncio.to_thread(listens_on, proc.pid, metrics_port):
            return None
        self.process, self.metrics_port = found, metrics_port
        try:
            return f"https://{await self.hostname()}"
        except SessionError:
            return None

    async def open(self, port: int) -> str:
        exe = shutil.which(self.exe)
        if exe is None:
            raise SessionError(
                f"tunnel.cloudflared {self.exe!r} was not found on the agent's PATH; install "
                "cloudflared or set tunnel.cloudflared to its full path"
            )
        self.metrics_port = free_port()
        self.process = ManagedProcess(
            "tunnel", self.argv(exe, port), env=self.env(), log_path=self.log_path
        )
        try:
            self.process.start()
        except OSError as exc:
            raise SessionError(f"cannot start {exe}: {exc.strerror or exc}") from None
        if self.on_started is not None:
            self.on_started(self.process)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        last: str = "not answering"
        while True:
            if self.process.poll() is not None:
                raise SessionError(_exit_text(self.process) + " (before the tunnel was ready)")
            try:
                status, _ = await http_get("127.0.0.1", self.metrics_port, "/ready", timeout=1.0)
                if status == 200:
                    if await asyncio.to_thread(listens_on, self.process.pid, self.metrics_port):
                        break
                    raise SessionError(
                        f"another program answers on cloudflared's metrics port "
                        f"{self.metrics_port}: refusing to trust its tunnel URL"
                    )
                last = f"answered {status}"
            except (OSError, asyncio.TimeoutError, TimeoutError):
                pass
            if loop.time() >= deadline:
                raise SessionError(
                    f"cloudflared tunnel not ready within {self.timeout:g}s (/ready {last})"
                )
            await asyncio.sleep(0.1)
        return f"https://{await self.hostname()}"


class QuickTunnel(CloudflaredTunnel):
    kind = "cloudflared-quick"

    def argv(self, exe: str, port: int) -> list[str]:
        return [
            exe, "tunnel", "--no-autoupdate",
            "--metrics", f"127.0.0.1:{self.metrics_port}",
            "--grace-period", f"{max(1, int(self.grace))}s",
            "--url", f"http://127.0.0.1:{port}",
        ]  # fmt: skip

    async def hostname(self) -> str:
        try:
            status, body = await http_get(
                "127.0.0.1", self.metrics_port, "/quicktunnel", timeout=2.0
            )
            host = json.loads(body).get("hostname", "") if status == 200 else ""
        except (OSError, ValueError, asyncio.TimeoutError, TimeoutError):
            host = ""
        if not isinstance(host, str) or not host:
            raise SessionError("cloudflared is ready but /quicktunnel gave no hostname")
        return host


class NamedTunnel(CloudflaredTunnel):
    kind = "cloudflared-named"

    def __init__(self, config: AgentConfig, log_path: Path, grace: float) -> None:
        super().__init__(config, log_path, grace)
        self.token = config.tunnel.token
        self.public_hostname = config.tunnel.hostname
        self.fixed_port = config.tunnel.origin_port

    def argv(self, exe: str, port: int) -> list[str]:
        return [
            exe, "tunnel", "--no-autoupdate",
            "--metrics", f"127.0.0.1:{self.metrics_port}",
            "--grace-period", f"{max(1, int(self.grace))}s",
            "run",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {**super().env(), "TUNNEL_TOKEN": self.token}

    async def hostname(self) -> str:
        return self.public_hostname


def make_tunnel(config: AgentConfig, log_path: Path, grace: float) -> Tunnel:
    kind = config.tunnel.kind
    if kind == "cloudflared-quick":
        return QuickTunnel(config, log_path, grace)
    if kind == "cloudflared-named":
        return NamedTunnel(config, log_path, grace)
    return DirectTunnel(config.tunnel.public_host, config.tunnel.tls_cert, config.tunnel.tls_key)
