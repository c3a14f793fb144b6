"""The dashboard in a student's words (issue 13): each complaint a new user had, tried again.

Progress without internals and without repeats, times in the student's zone with the zone
named, plurals and short durations, an honest answer when no machine could ever fit, sensible
offline cards, "Connect to any machine" off at the session limit, and load bars with the
latest known figures. The browser half (the script's own rendering) is in
``tests/test_dashboard_browser.py``.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import User
from dashboard.views import plain_timeline
from machines.heartbeats import _encode, _sync_client, live_key
from machines.models import MachineStatus
from nexcompute import words
from nexcompute_agent import protocol
from sessions.models import ComputeSession, SessionEvent
from sessions.services import (
    apply_agent_report,
    lease_extend,
    session_mark_running,
    session_request,
    session_stop,
)
from sessions.states import EndReason
from tests.factories import LabFactory, MachineFactory, record_receipt

pytestmark = pytest.mark.django_db


def logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def card_of(html: str, machine_id: int) -> str:
    match = re.search(
        rf'<li class="machine" data-machine-id="{machine_id}".*?</li>', html, re.DOTALL
    )
    assert match, f"no card for machine {machine_id}"
    return match.group(0)


# --- progress: plain steps, one line each -------------------------------------------------------

# What an agent really sends: its own wording, with paths, ports and tunnel kinds.
AGENT_STEPS = [
    ("allocated", "session allocated on lab-pc-17.internal"),
    ("workspace_ready", "workspace /var/lib/nexcompute/workspaces/s42 on port 8888"),
    ("jupyter_starting", "starting Jupyter Lab"),
    ("tunnel_opening", "opening the direct tunnel"),
    ("ready", "Jupyter Lab is ready"),
]


def report(session: ComputeSession, step: str, message: str) -> None:
    msg = protocol.SessionProgress(session_id=session.pk, step=step, message=message)
    assert apply_agent_report(machine_id=session.machine_id, msg=msg)


def test_progress_is_plain_steps_one_line_each(owner: User) -> None:
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)
    for _ in range(2):  # a resent start reports every step again
        for step, message in AGENT_STEPS:
            report(session, step, message)
            session.refresh_from_db()
    assert session_mark_running(session=session, url="http://pc/lab?token=t")
    report(session, "ready", "Jupyter Lab is ready")  # a late duplicate

    events = logged_in(owner).get(f"/api/sessions/{session.pk}/events").json()
    lines = [e["message"] for e in events]
    text = " ".join(lines)
    # The attack happened: the agent's messages named these.
    assert any("/var/lib" in m for _, m in AGENT_STEPS)
    for internal in ("/var/lib", "8888", "direct tunnel", "lab-pc-17", "workspaces"):
        assert internal not in text
    assert lines == [
        f"Session requested on {machine.name}.",
        "The machine is starting Jupyter Lab.",
        "The lab computer took your session.",
        "Your workspace is ready.",
        "Starting Jupyter Lab.",
        "Connecting Jupyter Lab to the web.",
        "Jupyter Lab is ready.",
    ]
    assert len(lines) == len(set(lines))


def test_the_end_reason_is_said_once(owner: User) -> None:
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)
    assert session_mark_running(session=session, url="http://pc/lab?token=t")
    session_stop(session=session, reason=EndReason.USER, actor=owner)
    record_receipt(session, files_removed=1, processes_killed=1)
    events = logged_in(owner).get(f"/api/sessions/{session.pk}/events").json()
    lines = [e["message"] for e in events]
    assert lines.count("You ended the session.") == 1
    assert lines[-2:] == ["Session ended.", "Workspace wiped and verified."]
    html = logged_in(owner).get("/history/").content.decode()
    # Once as the end reason, once in the timeline; the old page had it three times.
    assert html.count("You ended the session.") == 2


def test_repeated_lines_of_old_sessions_are_shown_once(owner: User) -> None:
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)
    for message in ["Jupyter Lab is ready", "Jupyter Lab is ready", "Lease extended."]:
        SessionEvent.objects.create(session=session, kind="progress", message=message)
    shown = [e.message for e in plain_timeline(session.events.all())]
    assert shown == [
        f"Session requested on {machine.name}.",
        "Jupyter Lab is ready",
        "Lease extended.",
    ]


# --- times: the student's zone, the zone named --------------------------------------------------


def test_history_times_are_in_the_profiles_zone_and_named(owner: User) -> None:
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)
    assert session_mark_running(session=session, url="http://pc/lab?token=t")
    session_stop(session=session, reason=EndReason.USER, actor=owner)
    record_receipt(session)
    session.refresh_from_db()
    html = logged_in(owner).get("/history/").content.decode()
    assert " UTC</time>" in html  # no profile zone: UTC, and it says so
    owner.time_zone = "America/New_York"
    owner.save()
    html = logged_in(owner).get("/history/").content.decode()
    local = session.created_at.astimezone(words.zone("America/New_York"))
    assert f"{local:%Y-%m-%d %H:%M} EST</time>" in html
    assert "UTC" not in html
    # Every time carries its instant for the page's script, which writes it in the zone.
    assert 'data-local="datetime"' in html and 'data-local="time"' in html
    assert 'data-time-zone="America/New_York"' in html


def test_lease_messages_name_the_labs_zone(owner: User) -> None:
    lab = LabFactory.create(name="Zurich", timezone="Europe/Zurich")
    machine = MachineFactory.create(lab=lab)
    session = session_request(user=owner, machine_id=machine.pk, duration_minutes=60)
    assert session_mark_running(session=session, url="http://pc/lab?token=t")
    session = lease_extend(session=session, minutes=30, actor=owner)
    local = session.expires_at.astimezone(lab.tz)
    last = session.events.order_by("-pk").first()
    assert last is not None
    assert last.message == f"Lease extended by 30 min, until {local:%H:%M} CET."


# --- plurals and durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (26, "26 s"),
        (59.4, "59 s"),
        (60, "1 min"),
        (89, "1 min"),
        (3600, "1 h"),
        (3900, "1 h 5 min"),
        (7260, "2 h 1 min"),
    ],
)
def test_durations_read_naturally(seconds: float, text: str) -> None:
    assert words.duration(seconds) == text


def test_plurals() -> None:
    assert words.plural(1, "process", "processes") == "1 process"
    assert words.plural(2, "process", "processes") == "2 processes"
    assert words.plural(0, "file") == "0 files"
    assert words.plural(1, "file") == "1 file"


def test_history_says_1_process_and_a_26_second_run(owner: User) -> None:
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)
    assert session_mark_running(session=session, url="http://pc/lab?token=t")
    session_stop(session=session, reason=EndReason.USER, actor=owner)
    record_receipt(session, files_removed=1, processes_killed=1)
    session.refresh_from_db()
    assert session.started_at and session.ended_at
    ComputeSession.objects.filter(pk=session.pk).update(
        started_at=session.ended_at - dt.timedelta(seconds=26)
    )
    html = logged_in(owner).get("/history/").content.decode()
    assert "<strong>1</strong> process killed" in html
    assert "<strong>1</strong> file removed" in html
    assert "<dd>26 s</dd>" in html
    assert "0 min" not in html


# --- no machine could ever fit: say so ----------------------------------------------------------


def test_asking_for_a_gpu_where_no_lab_has_one_says_so(owner: User) -> None:
    MachineFactory.create(gpu_count=0)
    client = logged_in(owner)
    response = client.post("/api/sessions", {"requirements": {"gpu": True}}, "application/json")
    assert response.status_code == 409
    assert response.json() == {"detail": "no machine in your labs has a GPU"}
    response = client.post(
        "/api/sessions", {"requirements": {"min_memory_gb": 512}}, "application/json"
    )
    assert response.json() == {"detail": "no machine in your labs has 512 GB of memory or more"}


def test_a_gpu_machine_that_is_busy_is_worth_waiting_for(owner: User) -> None:
    MachineFactory.create(gpu_count=1, status=MachineStatus.BUSY)
    response = logged_in(owner).post(
        "/api/sessions", {"requirements": {"gpu": True}}, "application/json"
    )
    assert response.status_code == 409
    assert response.json() == {"detail": "no free machine fits your request right now"}


# --- offline cards ------------------------------------------------------------------------------


def test_a_machine_that_never_connected_says_so_instead_of_unknowns(owner: User) -> None:
    fresh = MachineFactory.create(
        status=MachineStatus.OFFLINE, memory_bytes=0, specs={}, last_seen=None
    )
    card = card_of(logged_in(owner).get("/").content.decode(), fresh.pk)
    for unknown in ("Unknown CPU", "? GB", ">None<"):
        assert unknown not in card
    assert "appear here once the computer has connected" in card
    assert "Not connected yet." in card
    assert re.search(r'data-field="load"[^>]* hidden', card)


def test_an_offline_machine_keeps_its_specs_and_says_when_it_was_seen(owner: User) -> None:
    seen = timezone.now() - dt.timedelta(hours=2)
    machine = MachineFactory.create(
        status=MachineStatus.OFFLINE,
        specs={"cpu_model": "Ryzen 7", "cpu_count": 8, "memory_bytes": 16 * 1024**3, "gpus": []},
        last_seen=seen,
    )
    card = card_of(logged_in(owner).get("/").content.decode(), machine.pk)
    assert "Ryzen 7 · 8 cores" in card and "16 GB" in card and "No GPU" in card
    assert f'datetime="{seen.astimezone(dt.UTC).isoformat()}"' in card
    assert "Last seen" in card
    assert re.search(r'data-field="load"[^>]* hidden', card)  # no empty bars


# --- "Connect to any machine" at the limit ------------------------------------------------------


def connect_any(html: str) -> str:
    match = re.search(r'<form id="connect-any".*?</form>', html, re.DOTALL)
    assert match
    return match.group(0)


def test_connect_any_is_off_with_the_reason_while_the_only_session_runs(owner: User) -> None:
    machine = MachineFactory.create()
    form = connect_any(logged_in(owner).get("/").content.decode())
    assert re.search(r'<button type="submit"[^>]*>Connect to any', form)
    assert " disabled>" not in form
    assert re.search(r'id="connect-any-limit"[^>]* hidden', form)

    session_request(user=owner, machine_id=machine.pk)
    form = connect_any(logged_in(owner).get("/").content.decode())
    assert re.search(r'<button type="submit"[^>]* disabled>Connect to any', form)
    assert "you may run one at a time. End it to start another." in form
    assert not re.search(r'id="connect-any-limit"[^>]* hidden', form)
    assert 'data-max-sessions="1" data-live-count="1"' in form


# --- load bars: the latest known figures --------------------------------------------------------


def test_load_bars_show_the_latest_heartbeat_not_a_dash(owner: User) -> None:
    machine = MachineFactory.create(metrics={})
    client = logged_in(owner)
    card = card_of(client.get("/").content.decode(), machine.pk)
    assert '<span class="bar-value">–</span>' in card  # nothing known yet
    # A heartbeat arrived: the agent link put its figures in Redis (the row is written later).
    key = live_key()
    _sync_client().hset(
        key, str(machine.pk), _encode({"cpu_percent": 37.4, "memory_percent": 61.0}, timezone.now())
    )
    try:
        for url in ("/", "/dashboard/machines/"):
            card = card_of(client.get(url).content.decode(), machine.pk)
            assert '<span class="bar-value">37%</span>' in card
            assert '<span class="bar-value">61%</span>' in card
            assert 'aria-valuenow="37"' in card
    finally:
        _sync_client().hdel(key, str(machine.pk))


def test_the_dashboard_offers_browser_notifications_and_links_the_profile(owner: User) -> None:
    html = logged_in(owner).get("/").content.decode()
    assert '<button type="button" class="ghost" id="notify-toggle" aria-pressed="false"' in html
    assert "Turn on browser notifications" in html
    assert 'href="/accounts/profile/"' in html
