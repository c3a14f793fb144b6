"""The admin: every page loads cheaply for staff, actions go through services, students stay out."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from accounts.models import ApiToken, QuotaPolicy, User
from accounts.services import api_token_create, default_policy
from machines.models import (
    AvailabilityWindow,
    ClosedDate,
    EnrollmentToken,
    Machine,
    MachineEvent,
    MachineStatus,
)
from machines.services import enrollment_token_create, machine_enroll
from sessions.models import ComputeSession, SessionEvent
from sessions.services import session_mark_running, session_request
from sessions.states import SessionState
from tests.factories import LabFactory, MachineFactory, SessionFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(staff: User) -> Client:
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def student_client(owner: User) -> Client:
    client = Client()
    client.force_login(owner)
    return client


@pytest.fixture
def populated(owner: User) -> dict[str, Any]:
    """One object of each of our admin models, with the relations their pages show."""
    lab = LabFactory(name="Admin lab")
    token, clear = enrollment_token_create(lab=lab)
    machine, _ = machine_enroll(token=clear, hostname="admin-pc")
    Machine.objects.filter(pk=machine.pk).update(status=MachineStatus.AVAILABLE)
    session = session_request(user=owner, machine_id=machine.pk)
    session_mark_running(session=session, url="http://admin-pc/lab")
    # Hours for the lab's inline rows (added after the request, which they might refuse).
    AvailabilityWindow.objects.create(lab=lab, weekday=0, start="09:00", end="17:00")
    ClosedDate.objects.create(lab=lab, date="2026-12-24")
    api_token, _ = api_token_create(user=owner)
    return {
        "lab": lab,
        "machine": machine,
        "session": session,
        "token": EnrollmentToken.objects.get(pk=token.pk),
        "api_token": api_token,
        "policy": default_policy(),
        "event": MachineEvent.objects.filter(machine=machine).first(),
    }


def _registered() -> list[type[Any]]:
    return sorted(admin.site._registry, key=lambda m: m._meta.label)


@pytest.mark.parametrize("model", _registered(), ids=lambda m: m._meta.label)
def test_staff_can_load_every_changelist(
    model: type[Any], staff_client: Client, populated: dict[str, Any]
) -> None:
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")

    response = staff_client.get(url)

    assert response.status_code == 200, url


@pytest.mark.parametrize(
    "key", ["lab", "machine", "session", "token", "api_token", "policy", "event"]
)
def test_staff_can_load_every_change_page(
    key: str, staff_client: Client, populated: dict[str, Any], staff: User
) -> None:
    obj = populated[key]
    opts = obj._meta

    response = staff_client.get(
        reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
    )

    assert response.status_code == 200
    assert b"credential_digest" not in response.content


def test_staff_can_load_the_user_and_group_pages(staff_client: Client, owner: User) -> None:
    assert (
        staff_client.get(reverse("admin:accounts_user_change", args=[owner.pk])).status_code == 200
    )
    assert staff_client.get(reverse("admin:auth_group_add")).status_code == 200


def test_the_session_change_page_hides_the_jupyter_token(
    staff_client: Client, populated: dict[str, Any]
) -> None:
    session = populated["session"]
    ComputeSession.objects.filter(pk=session.pk).update(jupyter_token="very-secret-token")

    response = staff_client.get(
        reverse("admin:compute_sessions_computesession_change", args=[session.pk])
    )

    assert b"very-secret-token" not in response.content


def _queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(url).status_code == 200
    return len(ctx.captured_queries)


def test_the_machine_changelist_costs_the_same_for_few_and_many_rows(
    staff_client: Client, django_assert_max_num_queries: Any
) -> None:
    url = reverse("admin:machines_machine_changelist")
    labs = LabFactory.create_batch(3)
    for i in range(4):
        MachineFactory(lab=labs[i % 3])
    few = _queries(staff_client, url)
    for i in range(16):
        MachineFactory(lab=labs[i % 3])

    with django_assert_max_num_queries(8):
        assert staff_client.get(url).status_code == 200
    assert _queries(staff_client, url) == few


def test_the_session_changelist_costs_the_same_for_few_and_many_rows(
    staff_client: Client, django_assert_max_num_queries: Any
) -> None:
    url = reverse("admin:compute_sessions_computesession_changelist")
    for _ in range(4):
        SessionFactory(owner=UserFactory())
    few = _queries(staff_client, url)
    for _ in range(16):
        SessionFactory(owner=UserFactory(), state=SessionState.ENDED)

    with django_assert_max_num_queries(8):
        assert staff_client.get(url).status_code == 200
    assert _queries(staff_client, url) == few


# --- staff actions -----------------------------------------------------------------------------


def act(client: Client, model: str, action: str, *pks: int) -> Any:
    return client.post(
        reverse(f"admin:{model}_changelist"),
        {"action": action, "_selected_action": [str(pk) for pk in pks], "index": "0"},
    )


@pytest.mark.parametrize(
    ("action", "start", "status", "kind"),
    [
        ("drain", MachineStatus.AVAILABLE, MachineStatus.DRAINING, "drain"),
        ("maintenance", MachineStatus.AVAILABLE, MachineStatus.MAINTENANCE, "maintenance"),
        ("enable", MachineStatus.MAINTENANCE, MachineStatus.AVAILABLE, "enable"),
        ("enable", MachineStatus.QUARANTINED, MachineStatus.AVAILABLE, "enable"),
        ("revoke_credential", MachineStatus.AVAILABLE, MachineStatus.OFFLINE, "credential_revoked"),
    ],
)
def test_each_machine_action_goes_through_its_service_and_leaves_one_event(
    action: str, start: str, status: str, kind: str, staff_client: Client, staff: User
) -> None:
    machine = MachineFactory(
        status=start,
        enabled=start != MachineStatus.MAINTENANCE,
        quarantine_reason="unverified" if start == MachineStatus.QUARANTINED else "",
    )
    bystander = MachineFactory()

    response = act(staff_client, "machines_machine", action, machine.pk)

    assert response.status_code == 302
    machine.refresh_from_db()
    assert machine.status == status
    # Exactly one audit row per staff action, recording the status change it made.
    events = MachineEvent.objects.filter(machine=machine)
    assert [(e.kind, e.actor, e.from_status, e.to_status) for e in events] == [
        (kind, staff, start, status)
    ]
    bystander.refresh_from_db()
    assert bystander.status == MachineStatus.AVAILABLE
    assert not MachineEvent.objects.filter(machine=bystander).exists()


def test_drain_lets_the_running_session_finish(
    staff_client: Client, owner: User, staff: User
) -> None:
    machine = MachineFactory()
    session = session_request(user=owner)
    session_mark_running(session=session, url="http://pc/lab")

    act(staff_client, "machines_machine", "drain", machine.pk)

    machine.refresh_from_db()
    assert (machine.draining, machine.status) == (True, MachineStatus.BUSY)
    session.refresh_from_db()
    assert session.state == SessionState.RUNNING
    # One audit row for the action; the status stays until the session ends.
    drains = MachineEvent.objects.filter(machine=machine, actor=staff)
    assert [(e.kind, e.from_status, e.to_status) for e in drains] == [("drain", "", "")]


def test_the_lab_action_creates_a_join_token_shown_once(staff_client: Client, staff: User) -> None:
    lab = LabFactory()

    response = act(staff_client, "machines_lab", "create_enrollment_token", lab.pk)

    assert response.status_code == 302
    token = EnrollmentToken.objects.get(lab=lab)
    assert token.created_by == staff
    page = staff_client.get(response["Location"]).content.decode()
    assert "nexcompute-agent enroll" in page
    clear = page.split("--token=")[1].split()[0].split("<")[0]
    assert clear.startswith("nxe_")
    assert (
        Client()
        .post(
            "/api/agents/enroll", {"token": clear, "hostname": "x"}, content_type="application/json"
        )
        .status_code
        == 201
    )


def test_the_end_session_action_stops_a_session_as_staff(
    staff_client: Client, staff: User, owner: User
) -> None:
    MachineFactory()
    session = session_request(user=owner)
    session_mark_running(session=session, url="http://pc/lab")
    ended = SessionFactory(state=SessionState.ENDED)

    response = act(
        staff_client, "compute_sessions_computesession", "end_sessions", session.pk, ended.pk
    )

    assert response.status_code == 302
    session.refresh_from_db()
    assert (session.state, session.end_reason) == (SessionState.STOPPING, "admin")
    event = SessionEvent.objects.get(session=session, to_state="stopping")
    assert (event.actor, event.reason) == (staff, "admin")
    page = staff_client.get(response["Location"]).content.decode()
    assert "1 session(s) ending." in page
    assert "already ended" in page


# --- students ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/admin/",
        "/admin/machines/machine/",
        "/admin/compute_sessions/computesession/",
        "/admin/accounts/apitoken/",
    ],
)
def test_a_student_is_sent_to_the_admin_login(url: str, student_client: Client) -> None:
    response = student_client.get(url)

    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_a_student_cannot_run_actions(student_client: Client, owner: User) -> None:
    machine = MachineFactory()
    session = SessionFactory(owner=owner, state=SessionState.RUNNING)

    machine_response = act(student_client, "machines_machine", "maintenance", machine.pk)
    session_response = act(
        student_client, "compute_sessions_computesession", "end_sessions", session.pk
    )

    for response in (machine_response, session_response):
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")
    machine.refresh_from_db()
    assert (machine.status, machine.enabled) == (MachineStatus.AVAILABLE, True)
    session.refresh_from_db()
    assert session.state == SessionState.RUNNING
    assert not MachineEvent.objects.exists()


def test_tokens_cannot_be_added_through_admin(staff_client: Client) -> None:
    assert staff_client.get(reverse("admin:accounts_apitoken_add")).status_code == 403
    assert staff_client.get(reverse("admin:machines_enrollmenttoken_add")).status_code == 403
    assert not ApiToken.objects.exists()
    assert QuotaPolicy.objects.exists()


def test_machines_are_listed_by_agent_version_and_outdated_ones_flagged(
    staff_client: Client,
) -> None:
    from nexcompute_agent import __version__

    major, minor, patch = (int(x) for x in __version__.split(".")[:3])
    older = f"{major}.{minor}.{patch - 1}" if patch else f"{major}.{minor - 1}.9"
    newer = f"{major}.{minor}.{patch + 1}"
    MachineFactory(name="old-pc", agent_version=older)
    MachineFactory(name="current-pc", agent_version=__version__)
    MachineFactory(name="new-pc", agent_version=newer)
    MachineFactory(name="never-seen", agent_version="")
    url = reverse("admin:machines_machine_changelist")

    page = staff_client.get(url).content.decode()
    assert f"Outdated (older than {__version__})" in page
    for version in (older, __version__, newer):
        assert f"?agent={version}" in page

    outdated = staff_client.get(url, {"agent": "outdated"}).content.decode()
    assert "old-pc" in outdated
    assert "current-pc" not in outdated and "new-pc" not in outdated
    assert "never-seen" not in outdated
    only = staff_client.get(url, {"agent": newer}).content.decode()
    assert "new-pc" in only and "old-pc" not in only
    assert Machine.objects.get(name="old-pc").agent_outdated is True
    assert Machine.objects.get(name="current-pc").agent_outdated is False
    assert Machine.objects.get(name="new-pc").agent_outdated is False
