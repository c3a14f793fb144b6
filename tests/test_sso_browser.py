"""The OIDC single sign-on in Chromium: the login page's IdP button, the IdP's form, the
dashboard. Debian's Chromium only (never a downloaded browser)."""

from __future__ import annotations

from pathlib import Path

import pytest

from accounts.models import User
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.idp import start_oidc_idp
from tests.live import ARTIFACTS
from tests.procs import ProcessSet, free_port

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_sso_login_in_chromium(procs: ProcessSet, live_env: dict[str, str], tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        raise AssertionError(
            f"{CHROMIUM} missing: apt-get install -y chromium (make install does it)"
        )
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    site = f"http://127.0.0.1:{port}"
    idp = start_oidc_idp(
        procs,
        tmp_path / "oidc",
        site_url=site,
        accounts={
            "alice": {
                "password": "alice-pw",
                "email": "alice@uni.edu",
                "name": "Alice Liddell",
                "groups": ["faculty"],
            }
        },
    )
    live_env.update(idp.site_env())
    procs.daphne(port=port)

    screenshot = ARTIFACTS / "screenshots" / "sso-login.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    profile = tmp_path / "chromium-profile"
    with sync_playwright() as pw:
        # A fresh profile directory per run (Playwright passes it as --user-data-dir).
        browser = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(f"{site}/")
            expect(page).to_have_url(f"{site}/accounts/login/?next=/")
            page.get_by_role("button", name="Test University").click()
            page.wait_for_url("http://localhost:*/interaction/**")
            page.get_by_label("Username").fill("alice")
            page.get_by_label("Password").fill("alice-pw")
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"{site}/")
            expect(page.get_by_role("button", name="Log out")).to_be_visible()
            expect(page.get_by_text("alice")).to_be_visible()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    alice = User.objects.get(username="alice")
    assert alice.is_staff
    assert set(alice.groups.values_list("name", flat=True)) == {"staff"}
    assert screenshot.stat().st_size > 0
