"""The state file: a small JSON record of live sessions, kept so that an agent that restarted
(upgrade, crash, ``kill -9``) takes its running sessions back, and one that cannot (or a
machine that rebooted) finds and wipes what the sessions left (see :mod:`.manager`).

It holds each running session's Jupyter token (to check and poll the Jupyter it takes back):
the file is the agent's alone (mode 0600, in ``state_dir``, which every sandbox hides)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nexcompute_agent.config import write_private_file
from nexcompute_agent.protocol import SessionReceipt

log = logging.getLogger(__name__)


@dataclass
class ProcRecord:
    """A process we started. ``create_time`` (psutil's) tells a recycled pid from ours."""

    pid: int
    create_time: float
    role: str  # "jupyter" | "sandbox" | "tunnel"


@dataclass
class SessionRecord:
    session_id: int
    workspace: str
    user: str | None  # the session user; None when the agent runs unprivileged
    uid: int | None
    started_at: float  # time.time()
    state: str = "starting"  # starting | running | stopping
    procs: list[ProcRecord] = field(default_factory=list)
    # The sandbox's init (bwrap inside the PID namespace): ending it ends the session's
    # processes. Found again by pid *and* start time, never by pid alone.
    init_pid: int | None = None
    init_create_time: float | None = None
    sandboxed: bool = False
    # Something of the account was found before the start: the receipt can never be verified.
    poisoned: str = ""
    # What a restarted agent needs to take a running session back (JupyterHub's spawner
    # get_state/load_state): Jupyter's port and token, the URL given out, the tunnel's
    # metrics port, the limits in force.
    port: int | None = None
    token: str = ""
    url: str = ""
    tunnel_kind: str = ""
    tunnel_metrics_port: int | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    # Jupyter serves TLS itself (direct tunnel off loopback): its certificate and key files.
    certfile: str | None = None
    keyfile: str | None = None
    # Warm sandboxes (:mod:`.warm`): ``warm`` while it waits for a session (its session_id is
    # then a warm id); the id its cgroup and workspace were made under, kept after hand-over.
    warm: bool = False
    cgroup_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SessionRecord:
        procs = [ProcRecord(**p) for p in d.get("procs", [])]
        return cls(
            session_id=int(d["session_id"]),
            workspace=str(d["workspace"]),
            user=d.get("user"),
            uid=d.get("uid"),
            started_at=float(d.get("started_at", 0.0)),
            state=str(d.get("state", "starting")),
            procs=procs,
            init_pid=d.get("init_pid"),
            init_create_time=d.get("init_create_time"),
            sandboxed=bool(d.get("sandboxed", False)),
            poisoned=str(d.get("poisoned", "")),
            port=d.get("port"),
            token=str(d.get("token", "")),
            url=str(d.get("url", "")),
            tunnel_kind=str(d.get("tunnel_kind", "")),
            tunnel_metrics_port=d.get("tunnel_metrics_port"),
            limits=dict(d.get("limits") or {}),
            certfile=d.get("certfile"),
            keyfile=d.get("keyfile"),
            warm=bool(d.get("warm", False)),
            cgroup_id=d.get("cgroup_id"),
        )


class StateFile:
    """``<state_dir>/sessions.json``, mode 0600, rewritten atomically on every change."""

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / "sessions.json"

    def load_all(self) -> tuple[dict[int, SessionRecord], list[SessionReceipt]]:
        """Live sessions and receipts not yet delivered."""
        sessions, receipts, _ = self.load_everything()
        return sessions, receipts

    def load_everything(
        self,
    ) -> tuple[dict[int, SessionRecord], list[SessionReceipt], dict[str, Any]]:
        """Live sessions, receipts not yet delivered, and the account pool's bookkeeping."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            sessions = {
                int(k): SessionRecord.from_dict(v) for k, v in data.get("sessions", {}).items()
            }
            receipts = [SessionReceipt.model_validate(r) for r in data.get("receipts", [])]
            pool = data.get("pool", {})
            return sessions, receipts, pool if isinstance(pool, dict) else {}
        except FileNotFoundError:
            return {}, [], {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            # A corrupt file must not stop the agent; the start-up sweep of the workspace root,
            # the cgroups and the session accounts still finds the leftovers.
            log.error("state file %s is unreadable (%s); ignoring it", self.path, exc)
            return {}, [], {}

    def load(self) -> dict[int, SessionRecord]:
        return self.load_all()[0]

    def save(
        self,
        sessions: dict[int, SessionRecord],
        receipts: list[SessionReceipt] | None = None,
        pool: dict[str, Any] | None = None,
    ) -> None:
        data = {
            "sessions": {str(k): asdict(v) for k, v in sorted(sessions.items())},
            "receipts": [r.model_dump(mode="json") for r in receipts or []],
            "pool": pool or {},
        }
        write_private_file(self.path, json.dumps(data, indent=1) + "\n")
