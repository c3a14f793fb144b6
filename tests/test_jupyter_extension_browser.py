"""The session's own Jupyter Lab extension in Debian's Chromium, with everything real: daphne,
a Celery worker and beat (lease periods of seconds), Redis, PostgreSQL, the agent as root with a
sandboxed session account, and `jupyter lab` from the session environment.

In the Lab: the status bar shows the machine and the time left; at a lease warning a banner
offers Extend, whose one click moves ``expires_at`` (read through the API); "Save all and
download workspace" and the dashboard's link at the warning give the workspace as a zip; an
edit the student never saved is on disk when the lease runs out (read in the workspace while
the agent stops the session, before the wipe), and the tab then says the session has ended.
From inside a kernel, the session capability reads only its own session, cannot extend another,
and is worthless once the session is over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import io
import json
import re
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from django.utils import timezone

from accounts.services import api_token_create
from machines.models import Machine, MachineStatus
from sessions.models import ComputeSession, SessionEvent
from sessions.services import session_mark_running, session_request, session_start_command
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.factories import MachineFactory
from tests.kernel import run_code, start_kernel
from tests.procs import ProcessSet, free_port, wait_for
from tests.test_agent_link import enroll
from tests.test_dashboard_browser import log_in, make_user, shoot
from tests.test_sessions_e2e import (  # noqa: F401 - fixtures
    api,
    configure,
    request_session,
    session_user,
    workspace_root,
)

T = TypeVar("T")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(420),
]

# Run in the session's kernel, as the student's code: the capability from the 0600 config
# Jupyter reads, used against the Nexus for this session, another one, and forged.
ATTACK = r"""
import json, os, urllib.request, urllib.error
conf = json.load(open(os.path.expanduser('~/.jupyter/jupyter_server_config.json')))
ext = conf['NexComputeExtension']
cap, nexus, own = ext['capability'], ext['nexus_url'], ext['session_id']

def call(method, sid, what, body=None, capability=cap):
    req = urllib.request.Request(
        f'{nexus}/api/session-capability/sessions/{sid}/{what}', method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={'Authorization': f'Bearer {capability}', 'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b'null')

forged = cap.replace(f'nxcap_{own}_', f'nxcap_{OTHER}_')
print(json.dumps({
    'capability': cap, 'own_session': own,
    'own': call('GET', own, 'lease'),
    'other_read': call('GET', OTHER, 'lease'),
    'other_extend': call('POST', OTHER, 'extend', {'minutes': 30}),
    'forged_read': call('GET', OTHER, 'lease', capability=forged),
    'env_has_it': any(cap in v for v in os.environ.values()),
}))
"""


def policy_env(tmp_path: Path, port: int) -> dict[str, str]:
    return {
        "NEXCOMPUTE_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "NEXCOMPUTE_BEAT_EXPIRE_SESSIONS_SECONDS": "0.5",
        "NEXCOMPUTE_BEAT_LEASE_WARNINGS_SECONDS": "0.5",
        "NEXCOMPUTE_EXPIRY_WARNINGS_MINUTES": "0.75,0.25",  # 45 s and 15 s before the end
        "NEXCOMPUTE_IDLE_MINUTES": "0",  # idle is another test's subject
        "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
    }


def other_running_session() -> ComputeSession:
    """Bob's running session on another machine (its agent is not needed: it is the target)."""
    bob = make_user("bob", "bob-pw-1")
    machine = MachineFactory(status=MachineStatus.AVAILABLE)
    session = session_request(user=bob, machine_id=machine.pk, duration_minutes=30)
    assert session_start_command(session_id=session.pk) is not None
    assert session_mark_running(session=session, url="http://bobs-pc:8888/lab")
    session.refresh_from_db()
    return session


def lease_ends_in(session_id: int, seconds: float) -> dt.datetime:
    """Leases are asked for in minutes; the test needs seconds (as the lease tests do)."""
    at = timezone.now() + dt.timedelta(seconds=seconds)
    ComputeSession.objects.filter(pk=session_id).update(expires_at=at)
    return at


class Snapshots:
    """Reads a file in the workspace every 20 ms while the session stops, keeping each new
    content: what was on disk before the wipe removed it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = self.path.read_text()
            except (OSError, UnicodeDecodeError):
                text = None
            if text and (not self.seen or self.seen[-1] != text):
                self.seen.append(text)
            time.sleep(0.02)


def off_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on its own loop in a thread (Playwright's sync API owns this thread's)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(timeout=120)


def door_download(page: Any, site: str, href: str) -> bytes:
    """Follow the dashboard's download link as the browser does: the door page's one-time
    code, POSTed to the session's Jupyter, which redirects to the zip (browser cookies)."""
    door = page.request.get(urllib.parse.urljoin(site, href))
    assert door.status == 200, door.text()
    html = door.text()
    # The door form's own action (the page's first form is base.html's logout, a relative URL).
    action = re.search(r'<form method="post" action="([^"]+)" id="door">', html)
    code = re.search(r'name="code" value="([^"]+)"', html)
    nxt = re.search(r'name="next" value="([^"]+)"', html)
    assert action and code and nxt, html
    assert nxt.group(1) == "/nexcompute/api/download"
    resp = page.request.post(action.group(1), form={"code": code.group(1), "next": nxt.group(1)})
    assert resp.status == 200, resp.text()[:500]
    assert resp.headers["content-type"] == "application/zip"
    return resp.body()


def test_the_lease_lives_in_jupyter_lab(
    procs: ProcessSet,
    live_env: dict[str, str],
    tmp_path: Path,
    session_env: Path,
    session_user: int,  # noqa: F811
    workspace_root: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not Path(CHROMIUM).exists():
        raise AssertionError(f"{CHROMIUM} missing: apt-get install -y chromium (make install)")
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")
    port = free_port()
    live_env.update(policy_env(tmp_path, port))
    procs.daphne(port)
    procs.celery_worker()
    procs.celery_beat(tmp_path / "beat-schedule")
    config = enroll(port, tmp_path)
    configure(config, session_env, workspace_root)
    procs.agent(config)
    wait_for(
        lambda: Machine.objects.filter(status=MachineStatus.AVAILABLE).exists(),
        timeout=30,
        what="machine available",
    )
    site = f"http://127.0.0.1:{port}"
    alice = make_user("alice", "alice-pw-1")
    _, api_token = api_token_create(user=alice)
    made = request_session(port, api_token)
    assert made["state"] == "running", made
    sid = made["id"]
    token = ComputeSession.objects.get(pk=sid).jupyter_token
    jbase = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(made["url"]))
    machine_name = made["machine"]["name"]
    theirs = other_running_session()
    # No autosave in this Lab: the only way the unsaved edit reaches the disk is the stop's.
    # And no "Rename file" dialog on the first manual save of an Untitled notebook (JupyterLab
    # 4.1+ asks by default; the dialog would hold the test's save; the stop's save-all never
    # asks).
    settings_url = f"{jbase}/lab/api/settings/@jupyterlab/docmanager-extension:plugin"
    put = httpx.put(
        settings_url,
        headers={"Authorization": f"token {token}"},
        json={"raw": json.dumps({"autosave": False, "renameUntitledFileOnSave": False})},
    )
    assert put.status_code == 204, put.text

    with api(port, api_token) as client, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        context = browser.new_context(
            viewport={"width": 1280, "height": 800}, accept_downloads=True
        )
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)
            log_in(page, site, "alice", "alice-pw-1")
            expect(page.locator("[data-session-id]")).to_have_attribute("data-state", "running")
            with page.expect_popup() as popup:
                page.get_by_role("link", name="Open Jupyter Lab").click()
            lab = popup.value
            lab.set_default_timeout(60_000)
            lab.wait_for_url(f"{jbase}/lab")

            # The status bar: the machine and the time left (30 min lease).
            left = lab.locator("[data-nexcompute-time-left]")
            expect(left).to_contain_text(machine_name, timeout=60_000)
            expect(left).to_contain_text(re.compile(r"(29|30) min left"))
            # No "official Jupyter news" question in the session.
            expect(lab.locator(".jp-LauncherCard").first).to_be_visible(timeout=60_000)
            assert lab.get_by_text("official Jupyter news").count() == 0

            # A notebook, saved once.
            lab.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
            expect(lab.get_by_role("button", name=re.compile(r"\| Idle$"))).to_be_visible(
                timeout=90_000
            )
            cell = lab.locator(".jp-Notebook .jp-Cell .cm-content").first
            cell.click()
            cell.type("saved_line = 1")
            expect(cell).to_have_text("saved_line = 1")
            # The notebook toolbar's save (Ctrl+S did not reach JupyterLab in headless Chromium).
            lab.locator('.jp-NotebookPanel-toolbar [data-command="docmanager:save"]').first.click()
            notebook = wait_for(
                lambda: next(
                    (p for p in workspace_root.rglob("Untitled.ipynb") if "saved_line" in
                     p.read_text()), None,
                ),
                timeout=30,
                what="the notebook saved in the workspace",
            )  # fmt: skip
            assert notebook is not None
            # The user's own interaction was reported (the agent's idle check reads it).
            activity = httpx.get(
                f"{jbase}/nexcompute/api/activity", headers={"Authorization": f"token {token}"}
            ).json()
            assert activity["last_interaction"] is not None

            # A short lease: the 45 s warning shows in the Lab with Extend.
            lease_ends_in(sid, 50)
            banner = lab.locator("[data-nexcompute-warning]")
            expect(banner).to_be_visible(timeout=30_000)
            expect(banner).to_contain_text("Your session ends in")
            assert SessionEvent.objects.filter(session_id=sid, kind="warning").exists()
            shoot(lab, "jupyter-lease-warning")
            before = dt.datetime.fromisoformat(
                client.get(f"/api/sessions/{sid}").json()["expires_at"]
            )
            banner.get_by_role("button", name="Extend", exact=True).click()
            expect(banner).to_contain_text("Extended by 30 min")
            after = dt.datetime.fromisoformat(
                client.get(f"/api/sessions/{sid}").json()["expires_at"]
            )
            assert after - before == dt.timedelta(minutes=30)
            expect(left).to_contain_text(re.compile(r"(30|31) min left"))

            # "Save all and download workspace" in the Lab: the zip holds the notebook.
            with lab.expect_download() as dl:
                banner.get_by_role("button", name="Save all and download workspace").click()
            with zipfile.ZipFile(dl.value.path()) as zf:
                assert "saved_line" in zf.read("Untitled.ipynb").decode()
                assert not [n for n in zf.namelist() if n.startswith(".")]
            # And on the dashboard, the warning offers the workspace through the door.
            link = page.locator(".warning [data-download-workspace]").first
            expect(link).to_be_visible()
            zipped = door_download(page, site, link.get_attribute("href") or "")
            with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
                assert "saved_line" in zf.read("Untitled.ipynb").decode()

            # From inside the session's kernel: the capability reads its own session, and the
            # Nexus refuses it for Bob's (the answers are the Nexus's own JSON: it got there).
            kernel = off_loop(start_kernel(jbase, token))
            out = off_loop(run_code(jbase, token, kernel, ATTACK.replace("OTHER", str(theirs.pk))))
            got = json.loads(out)
            assert got["own_session"] == sid
            assert got["own"][0] == 200 and got["own"][1]["session_id"] == sid
            assert got["other_read"] == [404, {"detail": "no such session"}]
            assert got["other_extend"] == [404, {"detail": "no such session"}]
            assert got["forged_read"][0] == 401 and "not valid" in got["forged_read"][1]["detail"]
            assert got["env_has_it"] is False  # not in the kernel's environment
            theirs_expiry = theirs.expires_at
            theirs.refresh_from_db()
            assert theirs.expires_at == theirs_expiry
            capability = got["capability"]

            # An edit never saved, then the lease runs out.
            cell.click()
            lab.keyboard.press("End")
            cell.type("\nunsaved_marker = 12345")
            expect(lab.locator(".jp-mod-dirty").first).to_be_attached()
            assert "unsaved_marker" not in notebook.read_text()
            lab.evaluate(
                """() => { window.__finals = [];
                  new MutationObserver(() => {
                    const e = document.querySelector('[data-nexcompute-final]');
                    if (e) { window.__finals.push(e.textContent); }
                  }).observe(document.body, {childList: true, subtree: true, characterData: true});
                }"""
            )
            snapshots = Snapshots(notebook)
            snapshots.thread.start()
            lease_ends_in(sid, 6)
            ended = wait_for(
                lambda: (r := client.get(f"/api/sessions/{sid}").json())["state"] == "ended" and r,
                timeout=90,
                what="session ended by expiry",
            )
            snapshots.stop.set()
            snapshots.thread.join(timeout=5)
            assert ended["end_reason"] == "expired"
            assert not notebook.exists()  # wiped
            assert snapshots.seen and "unsaved_marker = 12345" in snapshots.seen[-1], [
                s[-300:] for s in snapshots.seen
            ]
            finals = lab.evaluate("() => window.__finals")
            assert any("All open documents were saved" in f for f in finals), finals
            # The tab says so instead of "Connecting".
            expect(lab.locator("[data-nexcompute-ended]")).to_contain_text(
                "This session has ended", timeout=30_000
            )
            shoot(lab, "jupyter-session-ended")

            # The capability the kernel read is worthless now.
            dead = httpx.get(
                f"{site}/api/session-capability/sessions/{sid}/lease",
                headers={"Authorization": f"Bearer {capability}"},
            )
            assert dead.status_code == 401, dead.text
        finally:
            context.close()
            browser.close()
