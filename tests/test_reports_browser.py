"""The staff utilisation overview in Debian's Chromium against a real daphne and PostgreSQL:
the charts draw the hand-computed history (bars and cells of real size, not empty frames), the
page prints without its controls, and the machines list fits a 1366 px screen. Screenshots go
to ``artifacts/screenshots/reports-*.png`` (the paths are printed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher

from accounts.models import User
from machines.models import Lab
from reports.tests.history import build
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.factories import MachineFactory, UserFactory
from tests.live import ARTIFACTS
from tests.procs import ProcessSet, free_port

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.django_db(transaction=True)]
SHOTS = ARTIFACTS / "screenshots"


def _bars(page: Any, selector: str) -> list[float]:
    """Rendered heights (px) of the SVG marks matching ``selector``."""
    return page.eval_on_selector_all(
        selector, "els => els.map(e => e.getBoundingClientRect().height)"
    )


def test_the_overview_draws_its_charts_in_chromium(
    procs: ProcessSet, live_env: dict[str, str], tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        raise AssertionError(f"{CHROMIUM} missing: apt-get install -y chromium")
    from playwright.sync_api import expect, sync_playwright

    build(UserFactory.create(username="owner"), UserFactory.create(username="other"))
    for n in range(30):  # a list long enough to scroll, with every column filled
        MachineFactory.create(
            name=f"lab-pc-{n:02d}-with-a-long-host-name",
            lab=Lab.objects.get(name="Chemistry"),
            agent_version="0.1.0",
        )
    hasher = PBKDF2PasswordHasher()
    User.objects.create(
        username="it-staff",
        password=hasher.encode("staff-pw", hasher.salt(), iterations=1000),
        is_staff=True,
        is_superuser=True,
    )
    port = free_port()
    site = f"http://127.0.0.1:{port}"
    procs.daphne(port=port)
    SHOTS.mkdir(parents=True, exist_ok=True)
    overview_png = SHOTS / "reports-overview.png"
    print_png = SHOTS / "reports-overview-print.png"
    machines_png = SHOTS / "admin-machines-1366.png"

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.set_viewport_size({"width": 1366, "height": 900})
            page.goto(f"{site}/admin/")
            page.get_by_label("Username").fill("it-staff")
            page.get_by_label("Password").fill("staff-pw")
            page.get_by_role("button", name="Log in").click()
            expect(page.locator("#fleet-overview")).to_be_visible()
            expect(page.locator("#site-name")).to_have_text("NexCompute administration")

            page.get_by_role("link", name="Utilisation reports").click()
            page.get_by_label("From:", exact=True).fill("2026-03-27")
            page.get_by_label("To:", exact=True).fill("2026-03-30")
            page.get_by_role("button", name="Show").click()
            physics = page.locator('section[data-lab="Physics"]')
            expect(physics).to_be_visible()
            expect(page.locator('[data-kpi="used"]')).to_have_text("6.5")

            # Hours by day: four days, each with a visible "available" bar; used bars too.
            available = _bars(
                page, 'section[data-lab="Physics"] [data-chart="hours-by-day"] rect.bar.available'
            )
            used = _bars(
                page, 'section[data-lab="Physics"] [data-chart="hours-by-day"] rect.bar.used'
            )
            assert len(available) == 4 and all(h > 10 for h in available), available
            assert len(used) == 4 and all(h > 0 for h in used), used
            # The tallest available bar is Sunday's 30 h; Saturday's 16 h about half of it.
            assert available[2] == max(available)
            assert abs(available[1] / available[2] - 16 / 30) < 0.02
            # Heat maps: the cells with use and with refusals are drawn darker than empty ones.
            heat = physics.locator('[data-chart="use-heat-map"] rect.cell:not([data-value="0"])')
            expect(heat).to_have_count(8)
            unmet = physics.locator('[data-chart="unmet-demand"] rect.cell[data-value="2"]')
            expect(unmet).to_have_count(1)
            fill = unmet.evaluate("e => getComputedStyle(e).fill")
            assert fill != "rgb(244, 244, 244)", fill
            reasons = _bars(page, 'section[data-lab="Physics"] [data-chart="end-reasons"] rect.bar')
            assert len(reasons) == 4 and all(h > 0 for h in reasons)
            expect(page.locator('[data-table="top_users"]')).to_contain_text("personal data")
            page.screenshot(path=str(overview_png), full_page=True)

            # Print: the date picker and CSV links go, the charts stay.
            page.emulate_media(media="print")
            expect(page.locator(".nx-range")).to_be_hidden()
            expect(page.locator('[data-chart="hours-by-day"]').first).to_be_visible()
            page.screenshot(path=str(print_png), full_page=True)
            page.emulate_media(media="screen")

            # The machines list at 1366 px: nothing beyond the window's width.
            page.goto(f"{site}/admin/machines/machine/")
            expect(page.locator("#result_list")).to_be_visible()
            expect(page.get_by_role("link", name="Add machine")).to_have_count(0)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 1366, f"the page is {width} px wide at 1366 px"
            page.screenshot(path=str(machines_png), full_page=True)
        finally:
            browser.close()

    for shot in (overview_png, print_png, machines_png):
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
