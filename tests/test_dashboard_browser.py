"""The student dashboard in Debian's Chromium against a real daphne, Redis and PostgreSQL.

A fake agent (a ``websockets`` client speaking the agent protocol with a real machine
credential) plays the lab computer, and a tiny local HTTP server plays Jupyter Lab. Every step
is seen in the page without reloading it; each page is photographed at desktop and phone width
into ``artifacts/screenshots/``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import json
import re
import threading
import time
import urllib.parse
import zoneinfo
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.db import connection

from accounts.models import User
from machines.services import enrollment_token_create, lab_get_or_create, machine_enroll
from nexcompute_agent import protocol
from sessions.models import ComputeSession, SessionEvent
from sessions.services import session_event
from sessions.states import PROGRESS_SENTENCES, SessionState
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.live import ARTIFACTS
from tests.procs import ProcessSet, free_port

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

T = TypeVar("T")
SHOTS = ARTIFACTS / "screenshots"
VIEWPORTS = {"desktop": (1280, 800), "phone": (390, 844)}
# What a real agent says at each step (`tunnel_opening` from a cloudflared tunnel): its own
# words, with internals a student must not see.
PROGRESS = [
    ("allocated", "session allocated on phys-pc-01.lab.internal"),
    ("workspace_ready", "workspace /var/lib/nexcompute/workspaces/s1 ready"),
    ("jupyter_starting", "starting Jupyter Lab on port 8888"),
    ("tunnel_opening", "opening the cloudflared-quick tunnel"),
]
INTERNALS = ["lab.internal", "/var/lib", "8888", "cloudflared-quick tunnel"]
# Records each browser notification the page shows, then shows it with the real API.
NOTIFICATION_SPY = """
(() => {
  const Real = window.Notification;
  const seen = [];
  window.__notes = seen;
  function Spy(title, options) {
    seen.push({ title: title, body: (options && options.body) || "" });
    try { return new Real(title, options); } catch (e) { return { close() {} }; }
  }
  Object.defineProperty(Spy, "permission", { get: () => Real.permission });
  Spy.requestPermission = (...args) => Real.requestPermission(...args);
  window.Notification = Spy;
})();
"""
SPECS = {
    "cpu_model": "Intel Core i7-12700",
    "cpu_count": 12,
    "memory_bytes": 32 * 1024**3,
    "disk_bytes": 512 * 1024**3,
    "os": "Linux 6.1",
    "gpus": [],
}


class FakeJupyter:
    """A local HTTP server whose every page is titled JupyterLab; ``POST /login`` takes the
    Nexus's one-time code as the real door does (its form is checked here) and redirects."""

    def __init__(self) -> None:
        codes: list[str] = []
        self.codes = codes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                codes.append(form["code"][0])
                self.send_response(302)
                self.send_header("Location", form["next"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                body = b"<!doctype html><title>JupyterLab</title><h1>JupyterLab</h1>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeAgent:
    """Speaks the agent protocol from a thread: hello, heartbeats, start progress and ready,
    and a wipe receipt after each stop. ``stop()`` closes the socket like a dying agent."""

    def __init__(self, port: int, credential: str, jupyter_port: int) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws/agent/"
        self.credential = credential
        self.jupyter_port = jupyter_port
        self.welcomed = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.closing: asyncio.Event | None = None
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.welcomed.wait(15), f"fake agent not welcomed: {self.errors}"

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by the test through self.errors
            self.errors.append(exc)
            self.welcomed.set()

    async def _main(self) -> None:
        import websockets

        self.closing = asyncio.Event()
        async with websockets.connect(
            self.url, additional_headers={"Authorization": f"Bearer {self.credential}"}
        ) as ws:
            hello = {
                "type": "hello",
                "protocol_version": protocol.PROTOCOL_VERSION,
                "agent_version": "0.1.0-fake",
                "hostname": "fake-pc",
                "specs": SPECS,
                "sessions": [],
                "owner_present": False,
            }
            await ws.send(json.dumps(hello))
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome", welcome
            self.welcomed.set()
            tasks = [
                asyncio.ensure_future(self._beat(ws, welcome["heartbeat_seconds"])),
                asyncio.ensure_future(self._read(ws)),
                asyncio.ensure_future(self.closing.wait()),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()

    async def _beat(self, ws: Any, every: float) -> None:
        n = 0
        while True:
            n += 1
            beat = {
                "type": "heartbeat",
                "metrics": {"cpu_percent": 20.0 + n % 50, "memory_percent": 41.0},
                "owner_present": False,
            }
            await ws.send(json.dumps(beat))
            await asyncio.sleep(min(every, 0.5))

    async def _read(self, ws: Any) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            if msg.get("msgid"):
                await ws.send(json.dumps({"type": "reply", "msgid": msg["msgid"], "ok": True}))
            if msg["type"] == "session.start":
                asyncio.ensure_future(self._start(ws, msg))
            elif msg["type"] == "session.stop":
                asyncio.ensure_future(self._stop(ws, msg))

    async def _start(self, ws: Any, msg: dict[str, Any]) -> None:
        sid = msg["session_id"]
        for step, text in PROGRESS:
            await asyncio.sleep(0.6)
            await ws.send(
                json.dumps(
                    {"type": "session.progress", "session_id": sid, "step": step, "message": text}
                )
            )
        await asyncio.sleep(0.6)
        url = f"http://127.0.0.1:{self.jupyter_port}/lab?token={msg['token']}"
        await ws.send(json.dumps({"type": "session.ready", "session_id": sid, "url": url}))

    async def _stop(self, ws: Any, msg: dict[str, Any]) -> None:
        await asyncio.sleep(0.5)
        receipt = {
            "type": "session.receipt",
            "session_id": msg["session_id"],
            "verified": True,
            "files_removed": 7,
            "bytes_removed": 20480,
            "processes_killed": 1,
            "duration_seconds": 0.4,
            "details": [],
        }
        await ws.send(json.dumps(receipt))

    def stop(self) -> None:
        if self.thread.is_alive() and self.closing is not None:
            self.loop.call_soon_threadsafe(self.closing.set)
        self.thread.join(10)


@pytest.fixture
def jupyter() -> Iterator[FakeJupyter]:
    server = FakeJupyter()
    yield server
    server.close()


def off_loop(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a plain thread: the services' after-commit pushes use async_to_sync,
    which refuses the thread where Playwright's event loop runs."""

    def call() -> T:
        try:
            return fn()
        finally:
            connection.close()  # this thread's own connection; the test DB must drop at the end

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result(timeout=30)


def make_user(username: str, password: str) -> User:
    # The server process checks passwords with the real hashers, not the tests' MD5 one.
    hasher = PBKDF2PasswordHasher()
    encoded = hasher.encode(password, hasher.salt(), iterations=1000)
    return User.objects.create(username=username, password=encoded)


def shoot(page: Any, name: str) -> None:
    """``<name>-desktop.png`` and ``<name>-phone.png``, then back to the desktop size."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for label, (width, height) in VIEWPORTS.items():
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(150)  # let the layout settle
        page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})


def log_in(page: Any, site: str, username: str, password: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{site}/")
    expect(page).to_have_url(f"{site}/accounts/login/?next=/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{site}/")
    expect(page.locator("#live-status")).to_have_attribute("data-live", "on")


def test_a_student_uses_the_dashboard_end_to_end(
    procs: ProcessSet, tmp_path: Path, jupyter: FakeJupyter, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path(CHROMIUM).exists():
        raise AssertionError(f"{CHROMIUM} missing: apt-get install -y chromium (make install)")
    from playwright.sync_api import expect, sync_playwright

    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls are
    # plain blocking calls between browser steps, which Django would otherwise refuse.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")
    port = free_port()
    site = f"http://127.0.0.1:{port}"
    procs.daphne(port=port)
    make_user("alice", "alice-pw-1")
    make_user("bob", "bob-pw-1")
    agents: list[FakeAgent] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            # Alice's browser is in Tokyo: every time on her pages is Tokyo time.
            alice_ctx = browser.new_context(
                viewport={"width": 1280, "height": 800}, locale="en-GB", timezone_id="Asia/Tokyo"
            )
            alice_ctx.add_init_script(NOTIFICATION_SPY)
            alice_ctx.grant_permissions(["notifications"], origin=site)
            page = alice_ctx.new_page()
            page.set_default_timeout(15_000)
            page.goto(f"{site}/")
            shoot(page, "login")
            log_in(page, site, "alice", "alice-pw-1")
            expect(page.get_by_text("No lab machines yet.")).to_be_visible()
            expect(page.get_by_role("button", name="Log out")).to_be_visible()
            shoot(page, "dashboard-empty")

            # Browser notifications: off until she turns them on.
            toggle = page.get_by_role("button", name="Turn on browser notifications")
            expect(toggle).to_have_attribute("aria-pressed", "false")
            toggle.click()
            expect(
                page.get_by_role("button", name="Turn off browser notifications")
            ).to_have_attribute("aria-pressed", "true")

            # 409 with no machine at all: no GPU anywhere, and waiting would not help.
            page.get_by_label("Needs a GPU").check()
            page.get_by_role("button", name="Connect to any machine that fits").click()
            expect(page.locator("#notice")).to_contain_text(
                "No machine can take this request: no machine in your labs has a GPU."
            )
            expect(page.locator("#notice")).not_to_contain_text("few minutes")
            page.get_by_role("button", name="Dismiss message").click()
            page.get_by_label("Needs a GPU").uncheck()

            # A lab computer enrolls and its agent connects: the card appears, then goes online.
            _, token = enrollment_token_create(lab=lab_get_or_create(name="Physics Lab"))
            machine, credential = off_loop(
                lambda: machine_enroll(token=token, hostname="phys-pc-01")
            )
            card = page.locator(f'[data-machine-id="{machine.pk}"]')
            expect(card).to_have_attribute("data-status", "offline")
            agents.append(FakeAgent(port, credential, jupyter.port))
            expect(card).to_have_attribute("data-status", "available")
            expect(card).to_contain_text("Intel Core i7-12700 · 12 cores")
            # Live load from the heartbeats.
            expect(card.locator('[data-metric="cpu_percent"] .bar')).to_have_attribute(
                "aria-valuenow", re.compile(r"^\d+$")
            )

            # The agent dies: the page shows it offline, with a reason, without reloading.
            began = time.monotonic()
            agents.pop().stop()
            expect(card).to_have_attribute("data-status", "offline")
            offline_after = time.monotonic() - began
            expect(card).to_contain_text("The computer is off or its agent is not running.")
            expect(card.get_by_role("button", name="Connect")).to_be_disabled()
            # Its specs stay, with when it was last seen, instead of empty load bars.
            expect(card).to_contain_text("Last seen")
            expect(card.locator('[data-field="load"]')).to_be_hidden()
            expect(card).to_contain_text("Intel Core i7-12700 · 12 cores")
            assert offline_after < 3, f"offline shown after {offline_after:.1f}s"
            agents.append(FakeAgent(port, credential, jupyter.port))
            expect(card).to_have_attribute("data-status", "available")
            shoot(page, "dashboard")

            # Filters run in the page.
            page.get_by_label("GPU only").check()
            expect(card).to_be_hidden()
            expect(page.get_by_text("No machine matches these filters.")).to_be_visible()
            page.get_by_role("button", name="Clear filters").click()
            expect(card).to_be_visible()

            # Connect: the session card follows the start progress to running.
            card.get_by_role("button", name="Connect").click()
            session_card = page.locator("[data-session-id]")
            expect(session_card).to_have_attribute("data-state", "starting")
            expect(session_card).to_contain_text("Starting Jupyter Lab — this usually takes")
            shoot(page, "session-starting")
            expect(session_card).to_have_attribute("data-state", "running", timeout=20_000)
            timeline = session_card.locator(".timeline")
            for text in PROGRESS_SENTENCES.values():
                expect(timeline).to_contain_text(text)
            expect(timeline.get_by_text("Jupyter Lab is ready.")).to_have_count(1)
            for internal in INTERNALS:
                expect(timeline).not_to_contain_text(internal)
            page.wait_for_function("window.__notes.some(n => n.title.endsWith('is ready'))")
            expect(card).to_contain_text("Your session")
            session = ComputeSession.objects.get()
            assert session_card.get_attribute("data-session-id") == str(session.pk)
            expect(session_card.locator('[data-s="time-left"]')).to_have_text(
                re.compile(r"^(\d+:)?\d+:\d\d$")
            )

            # Open Jupyter Lab in a new tab and find it loaded.
            with page.expect_popup() as popup_info:
                page.get_by_role("link", name="Open Jupyter Lab").click()
            lab = popup_info.value
            lab.wait_for_load_state()
            expect(lab).to_have_title("JupyterLab")
            # Through the Nexus's door: a one-time code POSTed, no token in the address.
            lab.wait_for_url(f"http://127.0.0.1:{jupyter.port}/lab")
            assert len(jupyter.codes) == 1
            lab.close()
            # The workspace download is Jupyter's own zip of the workspace, behind the door.
            session_card.get_by_text("Download workspace").click()  # open the <details>
            download = session_card.get_by_role("link", name="Download the whole workspace (.zip)")
            href = download.get_attribute("href") or ""
            assert href.startswith(f"/sessions/{session.pk}/open/?next=%2Fdirectories%2F")
            assert "token" not in href

            # Extend by 30 minutes: confirmed in words, in her own (Tokyo) time.
            expires = session.expires_at
            page.get_by_role("button", name="Extend").click()
            expect(session_card.locator(".timeline")).to_contain_text("Lease extended by 30 min")
            session.refresh_from_db()
            assert (session.expires_at - expires).total_seconds() == 30 * 60
            tokyo = session.expires_at.astimezone(zoneinfo.ZoneInfo("Asia/Tokyo"))
            expect(page.locator("#notice-text")).to_have_text(
                f"Extended by 30 min, now until {tokyo:%H:%M}."
            )
            expect(session_card.locator('[data-s="until"]')).to_have_text(f"(until {tokyo:%H:%M})")
            page.get_by_role("button", name="Dismiss message").click()

            # A warning pushed from the server appears without reloading.
            off_loop(
                lambda: session_event(
                    session, SessionEvent.Kind.WARNING, "Someone sat down at phys-pc-01."
                )
            )
            warning = session_card.locator(".warnings li")
            expect(warning).to_contain_text("Someone sat down at phys-pc-01.")
            # The last warning offers the workspace, through the door (issue 13).
            expect(
                warning.get_by_role("link", name="Download your workspace (.zip)")
            ).to_have_attribute(
                "href", f"/sessions/{session.pk}/open/?next=%2Fnexcompute%2Fapi%2Fdownload"
            )
            page.wait_for_function(
                "window.__notes.some(n => n.title.endsWith('ends soon')"
                " && n.body === 'Someone sat down at phys-pc-01.')"
            )

            # Her only allowed session runs: "Connect to any machine" is off, and says why.
            any_button = page.get_by_role("button", name="Connect to any machine that fits")
            expect(any_button).to_be_disabled()
            expect(page.locator("#connect-any-limit")).to_contain_text(
                "you may run one at a time. End it to start another."
            )
            shoot(page, "session-running")

            # Another student sees the machine taken and nothing of Alice's session.
            bob_ctx = browser.new_context(viewport={"width": 1280, "height": 800})
            bob = bob_ctx.new_page()
            bob.set_default_timeout(15_000)
            log_in(bob, site, "bob", "bob-pw-1")
            bob_card = bob.locator(f'[data-machine-id="{machine.pk}"]')
            expect(bob_card).to_have_attribute("data-status", "busy")
            expect(bob_card).to_contain_text("Another session is running on it.")
            expect(bob.get_by_text("You have no session running.")).to_be_visible()
            expect(bob.locator("[data-session-id]")).to_have_count(0)
            assert bob.request.get(f"{site}/api/sessions/{session.pk}").status == 404
            shoot(bob, "dashboard-other-student")

            # End the session (with confirmation); the wipe receipt arrives.
            page.get_by_role("button", name="End session").click()
            page.get_by_role("button", name="Confirm").click()
            expect(session_card).to_have_attribute("data-state", "ended", timeout=15_000)
            expect(session_card).to_contain_text("You ended the session.")
            expect(session_card).to_contain_text(
                "Wipe verified: 7 files removed, 1 process killed."
            )
            expect(session_card.get_by_text("You ended the session.")).to_have_count(2)
            page.wait_for_function(
                "window.__notes.some(n => n.title.endsWith('has ended')"
                " && n.body.includes('1 process killed'))"
            )
            expect(any_button).to_be_enabled()
            expect(page.locator("#connect-any-limit")).to_be_hidden()
            expect(card).to_have_attribute("data-status", "available")
            expect(bob_card).to_have_attribute("data-status", "available")
            # Bob's page never heard of Alice's session.
            expect(bob.locator("[data-session-id]")).to_have_count(0)

            page.get_by_role("link", name="History", exact=True).click()
            page.wait_for_url(f"{site}/history/")
            past = page.locator(f'[data-session-id="{session.pk}"]')
            expect(past).to_contain_text("You ended the session.")
            expect(past).to_contain_text("Verified: nothing of yours is left on the machine.")
            expect(past).to_contain_text("7 files removed")
            expect(past).to_contain_text("1 process killed")
            session.refresh_from_db()
            assert session.started_at and session.ended_at
            ran = (session.ended_at - session.started_at).total_seconds()
            if ran < 60:  # a short session reads "NN s", never "0 min"
                expect(past.locator(".facts")).to_contain_text(f"{round(ran)} s")
            expect(past.locator(".facts")).not_to_contain_text("0 min")
            past.get_by_text("Timeline").click()
            expect(past.locator(".timeline")).to_contain_text("Someone sat down at phys-pc-01.")
            shoot(page, "history")
            bob.goto(f"{site}/history/")
            expect(bob.get_by_text("No past sessions yet.")).to_be_visible()
            shoot(bob, "history-empty")
        finally:
            for agent in agents:
                agent.stop()
            browser.close()

    session = ComputeSession.objects.get()
    assert session.state == SessionState.ENDED
    assert session.cleanup_verified is True
    assert not any(agent.errors for agent in agents)
    for name in ("login", "dashboard", "session-running", "history"):
        for label in VIEWPORTS:
            assert (SHOTS / f"{name}-{label}.png").stat().st_size > 0
