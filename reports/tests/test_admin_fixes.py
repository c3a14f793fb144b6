"""Admin as an IT team meets it: NexCompute branding, the fleet overview first, human units,
the current session on a busy machine, lifecycle buttons through the services, no adding
machines, read-only telemetry, no deleting live sessions, labs that say they are always open."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.core import mail
from django.test import Client
from django.urls import reverse

from accounts.models import User
from machines.models import AvailabilityWindow, Machine, MachineEvent, MachineStatus
from machines.services import enrollment_token_create, machine_enroll, machine_quarantine
from nexcompute.errors import Conflict
from reports.fleet import is_outdated
from reports.models import LabReportSubscription
from reports.tasks import send_lab_report, send_monthly_reports
from reports.tests.history import build
from sessions.models import ComputeSession, UnmetRequest
from sessions.services import Requirements, session_mark_running, session_request
from sessions.states import EndReason, SessionState
from tests.factories import LabFactory, MachineFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(staff: User) -> Client:
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def busy(owner: User) -> tuple[Machine, ComputeSession]:
    lab = LabFactory(name="Busy lab")
    _, clear = enrollment_token_create(lab=lab)
    machine, _ = machine_enroll(token=clear, hostname="busy-pc", agent_version="0.0.9")
    Machine.objects.filter(pk=machine.pk).update(
        status=MachineStatus.AVAILABLE,
        memory_bytes=32 * 1024**3,
        specs={"cpu_model": "Xeon", "cpu_count": 8, "memory_bytes": 32 * 1024**3, "gpus": []},
        metrics={"cpu_percent": 37.5, "memory_percent": 12.0},
    )
    session = session_request(user=owner, machine_id=machine.pk)
    session_mark_running(session=session, url="http://busy-pc/lab")
    return Machine.objects.get(pk=machine.pk), session


def test_admin_is_branded_and_opens_on_the_fleet_overview(
    staff_client: Client, busy: tuple[Machine, ComputeSession]
) -> None:
    _, session = busy
    quarantined = MachineFactory(name="dirty-pc")
    machine_quarantine(machine=quarantined, message="wipe not verified: /tmp/x left")
    html = staff_client.get("/admin/").content.decode()
    assert "NexCompute administration" in html
    assert "Django administration" not in html
    assert 'id="fleet-overview"' in html
    assert "Live sessions (1)" in html and f"session {session.pk}" in html
    assert "dirty-pc" in html and "wipe not verified" in html
    assert "Outdated agents (1)" in html and "busy-pc</a>: 0.0.9" in html
    assert 'data-status-count="busy"' in html
    assert reverse("reports:overview") in html


def test_the_busy_machine_page_shows_session_units_and_buttons(
    staff_client: Client, busy: tuple[Machine, ComputeSession], owner: User
) -> None:
    machine, session = busy
    html = staff_client.get(
        reverse("admin:machines_machine_change", args=[machine.pk])
    ).content.decode()
    assert f"session {session.pk}</a>: owner (running" in html
    assert "32.0 GiB" in html and "<td>38 %</td>" in html
    assert "34359738368" not in html  # no raw bytes
    assert '"cpu_percent"' not in html  # no raw JSON
    for label in ("Drain", "Maintenance", "Enable", "Revoke credential"):
        assert f">{label}</button>" in html
    listing = staff_client.get(reverse("admin:machines_machine_changelist")).content.decode()
    assert "Add machine" not in listing
    assert staff_client.get(reverse("admin:machines_machine_add")).status_code == 403


def test_lifecycle_buttons_call_the_services(
    staff_client: Client, busy: tuple[Machine, ComputeSession], owner: User
) -> None:
    machine, _ = busy
    url = reverse("admin:machines_machine_lifecycle", args=[machine.pk, "drain"])
    assert staff_client.get(url).status_code == 405  # a button posts; a link cannot drain
    assert staff_client.post(url).status_code == 302
    machine.refresh_from_db()
    assert machine.draining
    assert MachineEvent.objects.filter(machine=machine, kind="drain").count() == 1
    staff_client.post(reverse("admin:machines_machine_lifecycle", args=[machine.pk, "maintenance"]))
    staff_client.post(reverse("admin:machines_machine_lifecycle", args=[machine.pk, "enable"]))
    machine.refresh_from_db()
    assert machine.enabled and not machine.draining
    assert (
        staff_client.post(
            reverse("admin:machines_machine_lifecycle", args=[machine.pk, "explode"])
        ).status_code
        == 403
    )
    student = Client()
    student.force_login(owner)
    resp = student.post(
        reverse("admin:machines_machine_lifecycle", args=[machine.pk, "maintenance"])
    )
    assert resp.status_code == 302 and "/admin/login/" in resp["Location"]
    machine.refresh_from_db()
    assert machine.enabled


def test_live_sessions_are_ended_not_deleted_and_telemetry_is_read_only(
    staff_client: Client, busy: tuple[Machine, ComputeSession]
) -> None:
    _, session = busy
    change = reverse("admin:compute_sessions_computesession_change", args=[session.pk])
    html = staff_client.get(change).content.decode()
    assert 'name="kernels_busy"' not in html and 'name="last_activity"' not in html
    assert 'name="connections"' not in html
    assert 'name="_save"' not in html
    assert ">End session</button>" in html
    # A forged edit of the telemetry changes nothing.
    staff_client.post(change, {"kernels_busy": 9, "connections": 9})
    session.refresh_from_db()
    assert (session.kernels_busy, session.connections) == (0, 0)
    # No bulk delete; the delete page of a live session is refused.
    listing = staff_client.get(
        reverse("admin:compute_sessions_computesession_changelist")
    ).content.decode()
    assert "delete_selected" not in listing
    delete = reverse("admin:compute_sessions_computesession_delete", args=[session.pk])
    assert staff_client.post(delete, {"post": "yes"}).status_code == 403
    assert ComputeSession.objects.filter(pk=session.pk).exists()
    # The button ends it through the service.
    assert (
        staff_client.post(
            reverse("admin:compute_sessions_computesession_end", args=[session.pk])
        ).status_code
        == 302
    )
    session.refresh_from_db()
    assert session.state == SessionState.STOPPING and session.end_reason == EndReason.ADMIN


def test_a_lab_without_windows_says_it_is_always_open(staff_client: Client) -> None:
    open_lab, hours_lab = LabFactory(name="Open lab"), LabFactory(name="Day lab")
    AvailabilityWindow.objects.create(lab=hours_lab, weekday=0, start="09:00", end="17:00")
    html = staff_client.get(reverse("admin:machines_lab_changelist")).content.decode()
    assert "Always open (no availability windows)" in html and "Monday 09:00-17:00" in html
    page = staff_client.get(
        reverse("admin:machines_lab_change", args=[open_lab.pk])
    ).content.decode()
    assert "Always open (no availability windows)" in page


def test_the_staff_dashboard_links_to_admin(staff_client: Client, owner: User) -> None:
    assert 'href="/admin/"' in staff_client.get("/").content.decode()
    student = Client()
    student.force_login(owner)
    assert 'href="/admin/"' not in student.get("/").content.decode()


def test_the_machine_report_page_shows_load_and_receipts(
    staff_client: Client, busy: tuple[Machine, ComputeSession]
) -> None:
    from reports.history import record_loads

    machine, session = busy
    now = dt.datetime.now(dt.UTC)
    for minutes in range(0, 60, 5):
        record_loads(
            {
                machine.pk: (
                    {"cpu_percent": float(minutes), "memory_percent": 40.0},
                    now - dt.timedelta(minutes=minutes),
                )
            }
        )
    html = staff_client.get(reverse("reports:machine", args=[machine.pk])).content.decode()
    assert 'data-chart="load-history"' in html and 'data-points="12"' in html
    assert f"<td>{session.pk}</td>" in html
    csv_text = staff_client.get(
        reverse("reports:machine", args=[machine.pk]), {"csv": "load"}
    ).content.decode()
    assert len(csv_text.strip().splitlines()) == 13


def test_no_machine_fits_is_recorded_as_unmet_demand(owner: User) -> None:
    MachineFactory(status=MachineStatus.BUSY, lab=LabFactory(name="Full lab"))
    with pytest.raises(Conflict, match="no free machine"):
        session_request(user=owner, requirements=Requirements(lab="Full lab", gpu=False))
    with pytest.raises(Conflict, match="no free machine"):
        session_request(user=owner)
    rows = list(UnmetRequest.objects.order_by("pk").values_list("user__username", "lab__name"))
    assert rows == [("owner", "Full lab"), ("owner", None)]


def test_the_monthly_email_goes_once_to_opted_in_labs(
    owner: User, other: User, settings: Any
) -> None:
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    lab = build(owner, other)
    LabReportSubscription.objects.create(
        lab=lab.__class__.objects.get(name="Chemistry"), monthly_email=False, recipients="c@uni.edu"
    )
    sub = LabReportSubscription.objects.create(
        lab=lab, monthly_email=True, recipients="head@uni.edu, it@uni.edu"
    )
    april = dt.datetime(2026, 4, 2, 8, tzinfo=dt.UTC)
    assert send_lab_report(sub.pk, now=april) == 1
    assert send_lab_report(sub.pk, now=april) == 0  # claimed: never twice for one month
    assert len(mail.outbox) == 1
    msg = mail.outbox[0]
    assert msg.to == ["head@uni.edu", "it@uni.edu"]
    assert "March 2026" in msg.subject
    # March holds S0 too (20 March: ready 09:01, last activity 10:00): 6.5 + 59/60 hours.
    assert "Hours given to students (used):  7.4833" in msg.body
    assert "Wipe failures (machine quarantined): 1" in msg.body
    assert "Sessions:                        5" in msg.body
    # The hourly beat task: last month's report for Physics once, nothing for the lab that
    # did not opt in, however often it runs.
    assert send_monthly_reports() == 1
    assert send_monthly_reports() == 0
    assert len(mail.outbox) == 2
    assert "Physics" in mail.outbox[1].subject
    assert all("Chemistry" not in m.subject for m in mail.outbox)


def test_versions_are_compared_as_versions() -> None:
    assert is_outdated("0.0.9", "0.1.0") and is_outdated("0.9.0", "0.10.0")
    assert not is_outdated("0.1.0", "0.1.0") and not is_outdated("garbage", "0.1.0")
