"""The server extension: ``/nexcompute/api/…`` in the session's own Jupyter, behind Jupyter's
own authentication (the door's cookie or the session's token). Enabled by the agent's
``jupyter_server_config.json`` (``ServerApp.jpserver_extensions``), configured there too::

    {"NexComputeExtension": {"session_id": 42, "nexus_url": "https://nexus.example.edu",
                             "capability": "nxcap_42_…"}}

- ``GET lease``: the Nexus's view of this session (state, machine, ``expires_at``, warnings,
  the Extend choices allowed now), fetched with the session-scoped capability and cached a few
  seconds; plus ``stopping`` (the agent said the session is ending);
- ``POST extend`` ``{"minutes": n}``: extends this session at the Nexus (the policy decides);
- ``POST activity``: the Lab's user interacted (key press, click; the frontend throttles it
  and never sends it from polling); ``GET activity`` → ``{"last_interaction": ISO or null}``
  (the agent's idle check reads it with the session's token);
- ``POST stopping`` ``{"wait": s}`` (the agent, before it stops Jupyter): marks the session as
  stopping and waits up to ``wait`` seconds for the open Lab's ``POST saved`` (at once when no
  Lab tab polled lately); answers ``{"frontend": bool, "saved": bool}``;
- ``GET download``: the workspace as a zip (streamed; hidden files and links left out; refused
  past :attr:`NexComputeExtension.download_max_bytes`).

None of these counts as Jupyter API activity (``_track_activity`` off): an open tab's
polling must not keep a session "active".

A warm sandbox's Jupyter starts before its session exists (``handover_file`` set, no
capability): at hand-over the agent writes the session's id, Nexus URL and capability into that
file (0600, the session account's, the same file the door reads its token from), and the
extension takes them from it before the first request that follows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import stat
import time
import zipfile
from pathlib import Path
from typing import Any

from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Float, Int, Unicode
from traitlets.config import Configurable

API = "nexcompute/api"
MAX_EXTEND_MINUTES = 24 * 60
MAX_SAVE_WAIT = 60.0
ZIP_CHUNK = 1 << 20
MAX_FILES = 200_000

log = logging.getLogger(__name__)


class NexComputeExtension(Configurable):
    """This session, as the agent configured it (``jupyter_server_config.json``, 0600)."""

    session_id = Int(0, help="The NexCompute session this Jupyter belongs to").tag(config=True)
    nexus_url = Unicode("", help="The Nexus's public base URL").tag(config=True)
    capability = Unicode(
        "", help="The session-scoped capability: reads and extends this session only"
    ).tag(config=True)
    lease_cache_seconds = Float(5.0, help="How long a lease read from the Nexus is reused").tag(
        config=True
    )
    nexus_timeout = Float(10.0, help="Per request to the Nexus").tag(config=True)
    frontend_recent_seconds = Float(
        15.0, help="A Lab tab that polled this recently is asked to save before the stop"
    ).tag(config=True)
    download_max_bytes = Int(4 << 30, help="The largest workspace download (bytes)").tag(
        config=True
    )
    handover_file = Unicode(
        "",
        help="A warm sandbox's hand-over file: once the agent writes it, this session's id, "
        "Nexus URL and capability are taken from it",
    ).tag(config=True)


class State:
    """What the handlers share (one per server)."""

    def __init__(self, config: NexComputeExtension, root_dir: str) -> None:
        self.config = config
        self.root_dir = root_dir
        self.last_interaction: dt.datetime | None = None
        self.last_poll = 0.0  # monotonic; 0: no Lab tab polled yet
        self.stopping = False
        self.saved = asyncio.Event()
        self.lease: dict[str, Any] | None = None
        self.lease_at = 0.0
        self.lease_error = ""
        self.ended = False
        self.lock = asyncio.Lock()
        self.handed_over = not config.handover_file

    def check_handover(self) -> None:
        """Take the session's settings from the hand-over file once it exists (warm sandboxes;
        one failed ``stat`` while it does not). Whatever the warm sandbox saw before is
        forgotten: it was nobody's session."""
        if self.handed_over:
            return
        path = Path(self.config.handover_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:  # the door refuses everyone until it is rewritten
            log.error("nexcompute: hand-over file %s unreadable: %s", path, exc)
            return
        if not isinstance(data, dict) or not isinstance(data.get("token"), str):
            log.error("nexcompute: hand-over file %s has no token", path)  # as the door
            return
        try:
            session_id = int(data.get("session_id") or 0)
        except (TypeError, ValueError, OverflowError):
            session_id = 0
        self.config.session_id = session_id
        self.config.nexus_url = str(data.get("nexus_url") or "")
        self.config.capability = str(data.get("capability") or "")
        self.last_interaction = None
        self.last_poll = 0.0
        self.stopping = False
        self.saved = asyncio.Event()
        self.lease, self.lease_at, self.lease_error, self.ended = None, 0.0, "", False
        self.handed_over = True
        log.info(
            "nexcompute: warm sandbox handed over to session %d (capability %s)",
            session_id,
            "present" if self.config.capability else "absent",
        )

    @property
    def configured(self) -> bool:
        return bool(self.config.capability and self.config.nexus_url and self.config.session_id)

    def nexus(self, what: str) -> str:
        base = self.config.nexus_url.rstrip("/")
        return f"{base}/api/session-capability/sessions/{self.config.session_id}/{what}"

    async def call_nexus(self, method: str, what: str, body: Any = None) -> tuple[int, Any]:
        """``(status, JSON)`` from the Nexus; ``(502, {"detail": …})`` when it cannot be
        reached. The capability goes in the header, never in a URL."""
        req = HTTPRequest(
            self.nexus(what),
            method=method,
            headers={
                "Authorization": f"Bearer {self.config.capability}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            body=None if body is None else json.dumps(body),
            request_timeout=self.config.nexus_timeout,
            connect_timeout=self.config.nexus_timeout,
            follow_redirects=False,
        )
        try:
            resp = await AsyncHTTPClient().fetch(req, raise_error=False)
        except (TimeoutError, OSError, HTTPClientError) as exc:
            return 502, {"detail": f"the NexCompute server cannot be reached: {exc}"}
        try:
            data = json.loads(resp.body or b"null")
        except ValueError:
            data = None
        if resp.code == 599:
            return 502, {"detail": f"the NexCompute server cannot be reached: {resp.error}"}
        return resp.code, data

    def remember(self, status: int, data: Any) -> None:
        if status == 200 and isinstance(data, dict):
            self.lease, self.lease_error = data, ""
            if data.get("state") in ("ended", "failed"):
                self.ended = True
        elif status == 401:
            # The capability is refused: the session is over (it is revoked at the end).
            self.ended, self.lease_error = True, "this session has ended"
        else:
            detail = data.get("detail") if isinstance(data, dict) else None
            self.lease_error = str(detail or f"the NexCompute server answered {status}")
        self.lease_at = time.monotonic()

    async def lease_now(self) -> None:
        if not self.configured:
            self.lease_error = "this Jupyter was started without a NexCompute session capability"
            return
        async with self.lock:
            if self.lease_at and time.monotonic() - self.lease_at < self.config.lease_cache_seconds:
                return
            status, data = await self.call_nexus("GET", "lease")
            self.remember(status, data)


class _HandOver(JupyterHandler):
    async def prepare(self) -> None:
        self.settings["nexcompute_state"].check_handover()
        await super().prepare()


class _Base(_HandOver, APIHandler):
    # Neither the Lab's polling nor the agent's reads are the student's activity.
    _track_activity = False

    @property
    def state(self) -> State:
        return self.settings["nexcompute_state"]

    def bad(self, status: int, detail: str) -> None:
        self.set_status(status)
        self.finish(json.dumps({"detail": detail}))

    def body_json(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.request.body or b"{}")
        except (ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None


class LeaseHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        state = self.state
        state.last_poll = time.monotonic()
        await state.lease_now()
        self.set_header("Cache-Control", "no-store")
        self.finish(
            json.dumps(
                {
                    "session_id": state.config.session_id,
                    "lease": state.lease,
                    "error": state.lease_error or None,
                    "stopping": state.stopping,
                    "ended": state.ended,
                }
            )
        )


class ExtendHandler(_Base):
    @web.authenticated
    async def post(self) -> None:
        data = self.body_json()
        minutes = data.get("minutes") if data is not None else None
        if type(minutes) is not int or not 1 <= minutes <= MAX_EXTEND_MINUTES:
            self.bad(400, f"minutes must be a whole number from 1 to {MAX_EXTEND_MINUTES}")
            return
        state = self.state
        if not state.configured:
            self.bad(503, "this Jupyter was started without a NexCompute session capability")
            return
        status, answer = await state.call_nexus("POST", "extend", {"minutes": minutes})
        if status == 200:
            async with state.lock:
                state.remember(status, answer)
        self.set_status(status if status in (200, 400, 401, 404, 409) else 502)
        self.finish(json.dumps(answer if isinstance(answer, dict) else {"detail": "no answer"}))


class ActivityHandler(_Base):
    @web.authenticated
    def get(self) -> None:
        last = self.state.last_interaction
        text = last.isoformat().replace("+00:00", "Z") if last else None
        self.finish(json.dumps({"last_interaction": text}))

    @web.authenticated
    def post(self) -> None:
        self.state.last_interaction = dt.datetime.now(dt.UTC).replace(microsecond=0)
        self.set_status(204)
        self.finish()


class StoppingHandler(_Base):
    @web.authenticated
    async def post(self) -> None:
        data = self.body_json() or {}
        wait = data.get("wait", 10)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
            self.bad(400, "wait must be a number of seconds")
            return
        state = self.state
        first = not state.stopping
        state.stopping = True
        if first:
            state.saved.clear()
        recent = bool(state.last_poll) and (
            time.monotonic() - state.last_poll < state.config.frontend_recent_seconds
        )
        saved = False
        if recent:
            try:
                await asyncio.wait_for(state.saved.wait(), timeout=min(float(wait), MAX_SAVE_WAIT))
                saved = True
            except TimeoutError:
                saved = state.saved.is_set()
        self.log.info("nexcompute: stopping; Lab tab present=%s, saved=%s", recent, saved)
        self.finish(json.dumps({"frontend": recent, "saved": saved}))

    @web.authenticated
    def get(self) -> None:
        self.finish(json.dumps({"stopping": self.state.stopping}))


class SavedHandler(_Base):
    @web.authenticated
    def post(self) -> None:
        self.state.saved.set()
        self.set_status(204)
        self.finish()


class _Sink:
    """A write-only stream for :class:`zipfile.ZipFile` (no seek: it writes data
    descriptors), drained into the response in chunks."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.pending = 0
        self.pos = 0

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        self.pending += len(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        return

    def close(self) -> None:
        return

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks, self.pending = [], 0
        return out


def workspace_files(root: str, limit_files: int) -> list[tuple[str, str, int]]:
    """``(path, name in the zip, size)`` of the workspace's plain files: hidden entries
    (``.jupyter`` holds the session's token) and links are left out."""
    out: list[tuple[str, str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)  # noqa: PTH118 - os.walk's strings
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            out.append((path, os.path.relpath(path, root), st.st_size))
            if len(out) > limit_files:
                return out
    return out


class DownloadHandler(_HandOver):
    """Not an APIHandler: that one forces a JSON content type on every answer."""

    def bad(self, status: int, detail: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"detail": detail}))

    @web.authenticated
    async def get(self) -> None:
        state: State = self.settings["nexcompute_state"]
        files = await asyncio.to_thread(workspace_files, state.root_dir, MAX_FILES)
        total = sum(size for _, _, size in files)
        if len(files) > MAX_FILES or total > state.config.download_max_bytes:
            self.bad(
                413,
                f"the workspace is too large to download at once ({len(files)} files, "
                f"{total} bytes); download folders from the file browser instead",
            )
            return
        stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
        self.set_header("Content-Type", "application/zip")
        self.set_header(
            "Content-Disposition",
            f'attachment; filename="nexcompute-session-{state.config.session_id}-{stamp}.zip"',
        )
        self.set_header("Cache-Control", "no-store")
        sink = _Sink()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for path, arcname, _ in files:
                try:
                    src = Path(path).open("rb")  # noqa: ASYNC230, SIM115 - read in chunks below
                except OSError:
                    continue
                with src:
                    info = zipfile.ZipInfo.from_file(path, arcname)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with zf.open(info, "w", force_zip64=True) as dst:
                        while chunk := src.read(ZIP_CHUNK):
                            dst.write(chunk)
                            if sink.pending >= ZIP_CHUNK:
                                self.write(sink.take())
                                await self.flush()
        self.write(sink.take())
        await self.finish()


def load(serverapp: Any) -> None:
    config = NexComputeExtension(parent=serverapp)
    root = str(Path(serverapp.root_dir).expanduser().resolve())
    web_app = serverapp.web_app
    web_app.settings["nexcompute_state"] = State(config, root)
    base = web_app.settings["base_url"]
    handlers = [
        ("lease", LeaseHandler),
        ("extend", ExtendHandler),
        ("activity", ActivityHandler),
        ("stopping", StoppingHandler),
        ("saved", SavedHandler),
        ("download", DownloadHandler),
    ]
    web_app.add_handlers(".*$", [(url_path_join(base, API, name), h) for name, h in handlers])
    serverapp.log.info(
        "nexcompute: extension loaded for session %s (capability %s)",
        config.session_id,
        "present" if config.capability else "absent",
    )
