"""The door to a session in Debian's Chromium, with everything real: daphne, a Celery worker,
Redis, PostgreSQL, the agent as root with a sandboxed session account, and `jupyter lab` from
the session environment with the nexcompute-jupyter identity provider.

The owner opens Jupyter Lab from the dashboard and no token (nor the one-time code) ever sits in
a URL: not in the address bar, not in any request or websocket URL, not in Chromium's own
history database. Another signed-in student with the owner's final Jupyter URL and the owner's
code (used, or expired) is refused; a replayed code is refused; the API's token URL still
serves API clients.
"""

from __future__ import annotations

import re
import sqlite3
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from nexcompute_jupyter import door

from accounts.models import User
from accounts.services import api_token_create
from sessions.models import ComputeSession
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.procs import ProcessSet
from tests.test_dashboard_browser import log_in, make_user, shoot
from tests.test_sessions_e2e import (  # noqa: F401 - fixtures
    end_session,
    request_session,
    session_user,
    start_stack,
    workspace_root,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(300),
]


def history_urls(profile: Path) -> list[str]:
    """Every URL in Chromium's history database of ``profile`` (the browser is closed)."""
    db = profile / "Default" / "History"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [row[0] for row in conn.execute("SELECT url FROM urls")]


def test_only_the_owner_gets_through_the_door(
    procs: ProcessSet,
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
    port, _ = start_stack(procs, tmp_path, session_env, workspace_root)
    site = f"http://127.0.0.1:{port}"
    make_user("alice", "alice-pw-1")
    make_user("bob", "bob-pw-1")
    _, api_token = api_token_create(user=User.objects.get(username="alice"))
    made = request_session(port, api_token)
    assert made["state"] == "running", made
    sid = made["id"]
    token = ComputeSession.objects.get(pk=sid).jupyter_token
    api_url = made["url"]
    assert api_url.endswith(f"/lab?token={token}")  # the API's url: for API clients
    parts = urllib.parse.urlsplit(api_url)
    jbase = f"{parts.scheme}://{parts.netloc}"

    # API clients: the token (header, or the API url's ?token=) still opens Jupyter's API.
    status = httpx.get(f"{jbase}/api/status", headers={"Authorization": f"token {token}"})
    assert status.status_code == 200
    assert httpx.get(f"{jbase}/api/status", params={"token": token}).status_code == 200
    assert httpx.get(f"{jbase}/api/status").status_code == 403

    alice_profile = tmp_path / "alice-profile"
    urls: list[str] = []  # every request and websocket URL of Alice's browser
    posted: list[str] = []  # bodies POSTed to Jupyter's /login
    with sync_playwright() as pw:
        alice = pw.chromium.launch_persistent_context(
            str(alice_profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000,
            viewport={"width": 1280, "height": 800},
        )  # fmt: skip
        alice.on("request", lambda r: urls.append(r.url))
        alice.on(
            "request",
            lambda r: (
                posted.append(r.post_data or "")
                if r.method == "POST" and r.url == f"{jbase}/login"
                else None
            ),
        )
        address_bar: list[str] = []
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = alice.pages[0] if alice.pages else alice.new_page()
            page.set_default_timeout(30_000)
            log_in(page, site, "alice", "alice-pw-1")
            card = page.locator("[data-session-id]")
            expect(card).to_have_attribute("data-state", "running")
            with page.expect_popup() as popup:
                page.get_by_role("link", name="Open Jupyter Lab").click()
            lab = popup.value
            lab.set_default_timeout(60_000)
            lab.on(
                "framenavigated",
                lambda f: address_bar.append(f.url) if f == lab.main_frame else None,
            )
            lab.on("websocket", lambda ws: urls.append(ws.url))
            lab.wait_for_url(f"{jbase}/lab")
            # JupyterLab itself, working on the cookie alone: its file browser lists the
            # workspace (REST) and the kernel specs load (no token in its page).
            expect(lab.locator(".jp-DirListing-content")).to_be_visible(timeout=60_000)
            expect(lab.locator(".jp-LauncherCard").first).to_be_visible(timeout=60_000)
            assert token not in lab.content()
            shoot(lab, "jupyter-through-the-door")
            # A kernel over Jupyter's websocket, on the cookie alone.
            lab.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
            cell = lab.locator(".jp-Notebook .jp-Cell .cm-content").first
            # The notebook is ready for typing once its kernel says Idle (typing earlier went
            # nowhere, and Shift+Enter then ran an empty cell).
            expect(lab.get_by_role("button", name=re.compile(r"\| Idle$"))).to_be_visible(
                timeout=90_000
            )
            cell.click()
            cell.type("print(6 * 7)")
            expect(cell).to_have_text("print(6 * 7)")
            lab.keyboard.press("Shift+Enter")
            expect(lab.locator(".jp-OutputArea-output").first).to_have_text("42", timeout=90_000)
            assert any(u.startswith(f"ws://{parts.netloc}/api/kernels/") for u in urls), urls
            address_bar.append(lab.url)

            # The attack on Alice's code, first proved to be Alice's live code.
            assert len(posted) == 1, posted
            code = urllib.parse.parse_qs(posted[0])["code"][0]
            door.check_code(code, token=token, session_id=sid)  # a real code of this session
            assert all(token not in u and code not in u for u in urls + address_bar), urls

            # Bob, signed in to the Nexus in his own browser, holds Alice's final URL and code.
            bob_ctx = browser.new_context(viewport={"width": 1280, "height": 800})
            bob = bob_ctx.new_page()
            bob.set_default_timeout(30_000)
            log_in(bob, site, "bob", "bob-pw-1")
            resp = bob.goto(f"{jbase}/lab")
            assert resp is not None and resp.status == 403
            expect(bob.locator("body")).to_contain_text("nobody else can")
            assert bob.locator("#jp-main-dock-panel").count() == 0
            # Alice's used code, replayed by Bob: refused.
            replay = bob.request.post(f"{jbase}/login", form={"code": code, "next": "/lab"},
                                      max_redirects=0)  # fmt: skip
            assert replay.status == 403 and "used already" in replay.text()
            # An expired code of Alice's session (minted as the Nexus does, 2 minutes ago).
            old = door.mint_code(token=token, session_id=sid, now=time.time() - 120)
            expired = bob.request.post(f"{jbase}/login", form={"code": old, "next": "/lab"},
                                       max_redirects=0)  # fmt: skip
            assert expired.status == 403 and "expired" in expired.text()
            assert bob.goto(f"{jbase}/lab").status == 403  # still nothing for Bob
            assert bob.request.get(f"{jbase}/api/contents").status == 403
            # Nor does the Nexus hand Bob a code for Alice's session.
            assert bob.request.get(f"{site}/sessions/{sid}/open/").status == 404
            # A fresh, unused code works exactly once, whoever replays it afterwards.
            fresh = door.mint_code(token=token, session_id=sid)
            anon = browser.new_context()
            first = anon.request.post(f"{jbase}/login", form={"code": fresh, "next": "/lab"},
                                      max_redirects=0)  # fmt: skip
            assert first.status == 302, first.text()
            again = bob.request.post(f"{jbase}/login", form={"code": fresh, "next": "/lab"},
                                     max_redirects=0)  # fmt: skip
            assert again.status == 403 and "used already" in again.text()
            anon.close()
            bob_ctx.close()
        finally:
            alice.close()  # flushes Chromium's history to disk
            browser.close()

    history = history_urls(alice_profile)
    assert f"{jbase}/lab" in history, history  # the history is real and holds the visit
    assert not [u for u in history if token in u or code in u], history
    assert not [u for u in history if "token=" in u or "code=" in u], history
    end_session(port, api_token, sid)
