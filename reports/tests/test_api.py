"""The staff report's API, CSV, management command and pages: the same figures everywhere,
and for staff only."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client

from accounts.models import User
from reports.figures import END_REASON_KEYS
from reports.tables import SUMMARY_SCALARS
from reports.tests.history import EXPECTED, build
from tests.factories import bearer_client

pytestmark = pytest.mark.django_db
URL = "/api/reports/utilisation"
# The history's period ends in the past, so the figures do not depend on the clock.
PERIOD = {"from": "2026-03-27", "to": "2026-03-30"}


@pytest.fixture
def history(owner: User, other: User) -> None:
    build(owner, other)


def _from_csv(text: str) -> list[dict[str, Any]]:
    """Rebuild the JSON's lab objects from the CSV, typed as the JSON is."""
    labs = []
    for row in csv.DictReader(io.StringIO(text)):
        lab: dict[str, Any] = {"lab": row["lab"], "timezone": row["timezone"]}
        for key in SUMMARY_SCALARS:
            if key == "timezone":
                continue
            value = row[key]
            if value == "":
                lab[key] = None
            elif key in ("sessions", "unmet_requests", "waiting_users", "wipe_failures"):
                lab[key] = int(value)
            else:
                lab[key] = float(value)
        lab["end_reasons"] = {
            k: int(row[f"end_reason_{k}"]) for k in END_REASON_KEYS if int(row[f"end_reason_{k}"])
        }
        labs.append(lab)
    return labs


def test_staff_get_the_hand_computed_figures_as_json(history: None, staff: User) -> None:
    resp = bearer_client(staff).get(URL, {**PERIOD, "lab": "Physics"})
    assert resp.status_code == 200, resp.content
    body = resp.json()
    assert body["from"] == "2026-03-27" and body["to"] == "2026-03-30"
    assert body["labs"] == [EXPECTED]


def test_the_csv_equals_the_json(history: None, staff: User) -> None:
    client = bearer_client(staff)
    as_json = client.get(URL, PERIOD).json()
    resp = client.get(URL, {**PERIOD, "format": "csv"})
    assert resp.status_code == 200
    assert resp["Content-Type"].startswith("text/csv")
    labs = _from_csv(resp.content.decode())
    assert [lab["lab"] for lab in labs] == ["Chemistry", "Physics"]
    assert labs == as_json["labs"]


def test_the_command_prints_the_same_figures(history: None, staff: User) -> None:
    api = bearer_client(staff).get(URL, PERIOD).json()
    out = io.StringIO()
    call_command(
        "report", "--from", PERIOD["from"], "--to", PERIOD["to"], "--format", "json", stdout=out
    )
    assert json.loads(out.getvalue()) == api
    out = io.StringIO()
    call_command(
        "report", "--lab", "Physics", "--from", PERIOD["from"], "--to", PERIOD["to"],
        "--format", "csv", stdout=out,
    )  # fmt: skip
    assert _from_csv(out.getvalue()) == [EXPECTED]


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"from": "2026-03-30", "to": "2026-03-27"}, 400),
        ({"from": "2020-01-01", "to": "2026-01-01"}, 400),
        ({"from": "yesterday", "to": "2026-01-01"}, 400),
        ({"from": "9999-12-31", "to": "9999-12-31"}, 400),
        ({"from": "0001-01-01", "to": "0001-01-02"}, 400),
        ({"to": "2026-01-01"}, 400),
        ({**PERIOD, "format": "xml"}, 400),
        ({**PERIOD, "lab": "Nowhere"}, 404),
    ],
)
def test_bad_queries_get_a_json_detail(
    history: None, staff: User, params: dict[str, str], status: int
) -> None:
    resp = bearer_client(staff).get(URL, params)
    assert resp.status_code == status
    assert resp.json()["detail"]


def test_students_and_visitors_are_refused(history: None, owner: User, staff: User) -> None:
    # The attack is real: the same request by staff returns the figures.
    assert bearer_client(staff).get(URL, PERIOD).status_code == 200
    student = bearer_client(owner)
    resp = student.get(URL, PERIOD)
    assert resp.status_code == 403 and resp.json() == {"detail": "staff only"}
    assert student.get(URL, {**PERIOD, "format": "csv"}).status_code == 403
    assert Client().get(URL, PERIOD).status_code == 401
    # The browser session too.
    browser = Client()
    browser.force_login(owner)
    assert browser.get(URL, PERIOD).status_code == 403


def test_the_report_is_in_the_openapi_document(db: Any) -> None:
    doc = Client().get("/api/openapi.json").json()
    op = doc["paths"]["/api/reports/utilisation"]["get"]
    names = {p["name"] for p in op["parameters"]}
    assert {"from", "to", "lab", "format"} <= names


def test_the_page_refuses_dates_off_the_calendar(history: None, staff: User) -> None:
    client = Client()
    client.force_login(staff)
    resp = client.get("/admin/reports/", {"start": "9999-12-31", "end": "9999-12-31"})
    assert resp.status_code == 400 and b"Choose dates between" in resp.content
    from machines.models import Machine

    pc = Machine.objects.get(name="pc-a")
    resp = client.get(
        f"/admin/reports/machine/{pc.pk}/", {"start": "0001-01-01", "end": "0001-01-01"}
    )
    assert resp.status_code == 400 and b"Choose dates between" in resp.content


def test_staff_pages_are_for_staff_only(history: None, owner: User, staff: User) -> None:
    pages = ["/admin/reports/", "/admin/reports/?csv=labs"]
    admin_client = Client()
    admin_client.force_login(staff)
    for page in pages:
        assert (
            admin_client.get(page, {"start": PERIOD["from"], "end": PERIOD["to"]}).status_code
            == 200
        )
    student = Client()
    student.force_login(owner)
    for page in pages:
        assert student.get(page).status_code == 403
    anonymous = Client().get(pages[0])
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]


def test_every_table_of_the_overview_exports_as_csv(history: None, staff: User) -> None:
    client = Client()
    client.force_login(staff)
    page = client.get("/admin/reports/", {"start": PERIOD["from"], "end": PERIOD["to"]})
    html = page.content.decode()
    slugs = [
        "labs",
        "days",
        "end_reasons",
        "unmet",
        "machines",
        "top_users",
        "top_groups",
        "weekly_quota",
    ]
    for slug in slugs:
        assert f'data-table="{slug}"' in html
        resp = client.get(
            "/admin/reports/", {"start": PERIOD["from"], "end": PERIOD["to"], "csv": slug}
        )
        assert resp.status_code == 200 and resp["Content-Type"].startswith("text/csv")
        assert len(list(csv.reader(io.StringIO(resp.content.decode())))) >= 1
    days = list(csv.DictReader(io.StringIO(client.get(
        "/admin/reports/",
        {"start": PERIOD["from"], "end": PERIOD["to"], "csv": "days", "lab": "Physics"},
    ).content.decode())))  # fmt: skip
    assert [(r["date"], float(r["hours_available"])) for r in days] == [
        ("2026-03-27", 22.5), ("2026-03-28", 16.0), ("2026-03-29", 30.0), ("2026-03-30", 24.0)
    ]  # fmt: skip
    # Charts with data: bars of non-zero height, heat-map cells with values.
    assert html.count('data-chart="hours-by-day"') == 2
    assert 'class="cell" data-value="2"' in html  # two refusals Monday 09:00 in Physics
    assert "Always open" in html or "always open" in html
    assert "Staff only. Names of people are personal data" in html
