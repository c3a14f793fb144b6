"""The dashboard, its machines fragment and the history page: access, content, query counts."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import User
from accounts.services import default_policy
from dashboard.cards import STATUS_TEXT, page_texts
from machines.models import AvailabilityWindow, MachineStatus
from sessions.models import SessionEvent
from sessions.services import (
    session_event,
    session_mark_running,
    session_request,
    session_stop,
)
from sessions.states import STATE_SUMMARIES, EndReason, SessionState
from tests.factories import LabFactory, MachineFactory, SessionFactory, record_receipt

pytestmark = pytest.mark.django_db

PAGES = ["/", "/history/", "/dashboard/machines/"]


def logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def machine_ids(html: str) -> set[int]:
    return {int(x) for x in re.findall(r'data-machine-id="(\d+)"', html)}


@pytest.mark.parametrize("url", PAGES)
def test_anonymous_visitors_are_sent_to_the_login_page(url: str) -> None:
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={url}"


def test_the_dashboard_groups_machines_by_lab_with_status_and_specs(owner: User) -> None:
    lab_a, lab_b = LabFactory.create(name="Alpha"), LabFactory.create(name="Beta")
    free = MachineFactory.create(name="a1", lab=lab_a, gpu_count=1)
    off = MachineFactory.create(name="b1", lab=lab_b, status=MachineStatus.OFFLINE)
    MachineFactory.create(name="b2", lab=lab_b, status=MachineStatus.OWNER_PRESENT)
    html = logged_in(owner).get("/").content.decode()

    assert html.index("Alpha") < html.index("Beta")
    assert f'data-machine-id="{free.pk}" data-status="available"' in html
    assert f'data-machine-id="{off.pk}" data-status="offline"' in html
    assert "The computer is off or its agent is not running." in html
    assert "Someone is using the computer in the lab." in html
    assert "Test GPU (8 GB)" in html and "Test CPU · 8 cores" in html and "16 GB" in html
    # Exactly one enabled Connect button: the free machine's.
    assert html.count('data-action="connect"') == 3
    assert len(re.findall(r'data-action="connect" aria-describedby="[^"]+">', html)) == 1
    assert 'name="csrfmiddlewaretoken"' in html
    assert "Log out" in html


def test_a_machine_in_a_closed_lab_says_so(owner: User) -> None:
    lab = LabFactory.create(name="Night")
    # Open one minute a week, a day from now: closed at the moment.
    when = (timezone.now() + dt.timedelta(days=1)).astimezone(lab.tz)
    AvailabilityWindow.objects.create(
        lab=lab, weekday=when.weekday(), start=dt.time(3, 0), end=dt.time(3, 1)
    )
    MachineFactory.create(lab=lab)
    html = logged_in(owner).get("/").content.decode()
    assert "Outside the lab&#x27;s hours." in html
    assert "Closed now" in html
    assert 'data-open="0"' in html


def test_a_lab_with_hours_shows_when_it_closes(owner: User) -> None:
    lab = LabFactory.create(name="Day")
    for day in range(7):
        AvailabilityWindow.objects.create(
            lab=lab, weekday=day, start=dt.time(0, 0), end=dt.time(0, 0)
        )
    lab.closed_dates.create(date=(timezone.now() + dt.timedelta(days=2)).date())
    MachineFactory.create(lab=lab)
    html = logged_in(owner).get("/").content.decode()
    assert "Open until 00:00 (UTC)" in html
    assert "data-open-until=" in html


def test_labs_the_policy_forbids_are_not_shown(owner: User) -> None:
    allowed, forbidden = LabFactory.create(name="Ok"), LabFactory.create(name="No")
    policy = default_policy()
    policy.labs.add(allowed)
    seen = MachineFactory.create(lab=allowed)
    hidden = MachineFactory.create(lab=forbidden)
    for url in ("/", "/dashboard/machines/"):
        ids = machine_ids(logged_in(owner).get(url).content.decode())
        assert seen.pk in ids
        assert hidden.pk not in ids


def test_the_empty_states(owner: User) -> None:
    html = logged_in(owner).get("/").content.decode()
    assert "No lab machines yet." in html
    assert "You have no session running." in html
    history = logged_in(owner).get("/history/").content.decode()
    assert "No past sessions yet." in history


def test_the_dashboard_carries_the_live_session_for_its_script(owner: User, other: User) -> None:
    machine = MachineFactory.create(name="mine")
    session = session_request(user=owner, machine_id=machine.pk)
    html = logged_in(owner).get("/").content.decode()
    assert f'data-initial-session="{session.pk}"' in html
    assert f'"id": {session.pk}' in html  # json_script for the script
    assert "Your session" in html
    # Another student sees the machine taken, and nothing of the session.
    theirs = logged_in(other).get("/").content.decode()
    assert f'"id": {session.pk}' not in theirs
    assert "data-initial-session" not in theirs
    assert "Someone is connecting to it right now." in theirs


def test_the_session_card_states_the_idle_rule(owner: User, settings: Any) -> None:
    session_request(user=owner, machine_id=MachineFactory.create().pk)
    settings.NEXCOMPUTE_IDLE_MINUTES = 45
    html = logged_in(owner).get("/").content.decode()
    rule = re.search(r'<p class="muted" data-s="idle-rule" data-idle-rule hidden>([^<]*)</p>', html)
    assert rule is not None
    assert rule.group(1).startswith("Stopped after 45 min idle: no typing or clicks in Jupyter")
    assert "An open tab alone is idle; a running program is not." in rule.group(1)
    settings.NEXCOMPUTE_IDLE_MINUTES = 0
    assert "never stopped for being idle" in logged_in(owner).get("/").content.decode()


def test_the_dashboard_hands_its_script_every_sentence_from_the_server(owner: User) -> None:
    response = logged_in(owner).get("/")

    texts = json.loads(
        re.search(
            r'<script id="page-texts" type="application/json">(.*?)</script>',
            response.content.decode(),
            re.DOTALL,
        ).group(1)  # type: ignore[union-attr]
    )
    assert texts == page_texts()
    assert texts["state_summaries"] == {str(k): v for k, v in STATE_SUMMARIES.items()}
    assert texts["state_labels"]["running"] == "Running"
    assert texts["status"]["cleaning"] == list(STATUS_TEXT[MachineStatus.CLEANING])
    assert sorted(texts["live_states"]) == ["requested", "running", "starting", "stopping"]


def test_the_dashboard_query_count_does_not_grow_with_machines(
    owner: User, django_assert_num_queries: Any
) -> None:
    labs = [LabFactory.create(name=f"Lab {i}") for i in range(3)]
    for i in range(20):
        MachineFactory.create(lab=labs[i % 3], gpu_count=i % 2)
    session_request(user=owner)
    client = logged_in(owner)
    client.get("/")  # warm: the default policy is created on first use
    # session, user, live session, policy (the user's or the default, with their labs: 2),
    # machines, labs with their windows and closed dates (3).
    with django_assert_num_queries(9):
        response = client.get("/")
    assert len(machine_ids(response.content.decode())) == 20
    with django_assert_num_queries(9):
        client.get("/dashboard/machines/")


def test_history_lists_past_sessions_with_reason_timeline_and_receipt(
    owner: User, other: User
) -> None:
    machine = MachineFactory.create(name="pc-hist")
    session = session_request(user=owner, machine_id=machine.pk)
    assert session_mark_running(session=session, url="http://pc/lab?token=t")
    session_event(session, SessionEvent.Kind.WARNING, "Your session ends in 10 minutes.")
    session = session_stop(session=session, reason=EndReason.USER, actor=owner)
    record_receipt(session, files_removed=12, bytes_removed=4096, processes_killed=3)
    SessionFactory.create(owner=other, state=SessionState.ENDED, end_reason=EndReason.IDLE)

    html = logged_in(owner).get("/history/").content.decode()
    assert f'data-session-id="{session.pk}" data-state="ended"' in html
    assert "You ended the session." in html
    assert "Verified: nothing of yours is left on the machine." in html
    assert "<strong>12</strong> files removed" in html
    assert "<strong>3</strong> processes killed" in html
    assert "Your session ends in 10 minutes." in html
    assert "Jupyter Lab is ready." in html
    assert "was idle" not in html  # the other student's session


def test_history_shows_a_missing_or_failed_receipt(owner: User) -> None:
    SessionFactory.create(owner=owner, state=SessionState.ENDED, end_reason=EndReason.AGENT_LOST)
    html = logged_in(owner).get("/history/").content.decode()
    assert "The lab computer went offline." in html
    assert "No receipt yet" in html


def test_history_query_count_is_fixed(owner: User, django_assert_num_queries: Any) -> None:
    for _ in range(10):
        s = SessionFactory.create(owner=owner, state=SessionState.ENDED, end_reason="expired")
        SessionEvent.objects.create(session=s, kind="state", to_state="ended", message="x")
    client = logged_in(owner)
    # session, user, sessions with machines and labs, their events, the live session.
    with django_assert_num_queries(5):
        response = client.get("/history/")
    assert response.content.decode().count("The session reached the end of its lease.") == 10
