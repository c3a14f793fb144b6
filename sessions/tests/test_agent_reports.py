"""What an agent reports about its sessions, applied by ``apply_agent_report`` as the agent link
does: crashes, notices, the receipt's checks and account, and the limits sent with a start."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.test import Client

from accounts.models import QuotaPolicy, User
from accounts.services import policy_for
from machines.models import Machine, MachineEvent, MachineStatus
from nexcompute_agent import protocol
from sessions.models import ComputeSession, SessionEvent
from sessions.services import (
    apply_agent_report,
    session_mark_running,
    session_request,
    session_start_command,
    session_stop,
)
from sessions.states import END_REASON_SENTENCES, EndReason, SessionState
from tests.factories import MachineFactory

pytestmark = pytest.mark.django_db

GIB = 1024**3


@pytest.fixture(autouse=True)
def _in_memory_layer(in_memory_layer: None) -> None:
    """Every test here uses the in-process channel layer (fixture in conftest.py)."""


def report(session: ComputeSession, message: dict[str, Any]) -> bool:
    msg = protocol.parse_agent_message(json.dumps({**message, "session_id": session.pk}))
    return apply_agent_report(machine_id=session.machine_id, msg=msg)  # type: ignore[arg-type]


def running(user: User, **machine: Any) -> ComputeSession:
    session = session_request(user=user, machine_id=MachineFactory.create(**machine).pk)
    assert session_mark_running(session=session, url="http://pc/lab?token=t")
    return session


def reload(session: ComputeSession) -> ComputeSession:
    return ComputeSession.objects.select_related("machine").get(pk=session.pk)


# --- a Jupyter that dies after `running` crashed -----------------------------------------------


def test_a_running_session_whose_jupyter_dies_stops_as_crashed(owner: User) -> None:
    session = running(owner)

    assert report(session, {"type": "session.failed", "error": "exit 1", "phase": "running"})

    session = reload(session)
    assert (session.state, session.end_reason) == (SessionState.STOPPING, EndReason.CRASHED)
    assert session.jupyter_url == ""
    assert session.machine.status == MachineStatus.CLEANING
    event = session.events.get(to_state=SessionState.STOPPING)
    assert (event.reason, event.message) == (
        "crashed",
        "Jupyter Lab stopped unexpectedly on the machine. exit 1",
    )
    assert END_REASON_SENTENCES[EndReason.CRASHED] == (
        "Jupyter Lab stopped unexpectedly on the machine."
    )


def test_a_failure_of_a_running_session_is_a_crash_even_without_the_phase(owner: User) -> None:
    session = running(owner)

    assert report(session, {"type": "session.failed", "error": "tunnel died"})

    assert reload(session).end_reason == EndReason.CRASHED


def test_a_failure_in_the_running_phase_before_ready_arrived_is_a_crash(owner: User) -> None:
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)

    assert report(session, {"type": "session.failed", "error": "exit 1", "phase": "running"})

    session = reload(session)
    assert (session.state, session.end_reason) == (SessionState.STOPPING, EndReason.CRASHED)


def test_a_failed_start_is_still_start_failed(owner: User) -> None:
    machine = MachineFactory.create()
    session = session_request(user=owner, machine_id=machine.pk)

    assert report(session, {"type": "session.failed", "error": "no jupyter", "phase": "start"})

    session = reload(session)
    assert (session.state, session.end_reason) == (SessionState.FAILED, EndReason.START_FAILED)
    assert session.machine.status == MachineStatus.CLEANING


def test_a_failure_after_the_stop_changes_nothing(owner: User) -> None:
    session = running(owner)
    assert report(session, {"type": "session.failed", "error": "x", "phase": "running"})

    assert report(session, {"type": "session.failed", "error": "y", "phase": "running"})

    assert session.events.filter(to_state=SessionState.STOPPING).count() == 1
    assert reload(session).state == SessionState.STOPPING


def test_the_api_names_the_crash(owner: User, owner_client: Client) -> None:
    session = running(owner)
    report(session, {"type": "session.failed", "error": "exit 1", "phase": "running"})

    body = owner_client.get(f"/api/sessions/{session.pk}").json()

    assert (body["end_reason"], body["end_reason_text"]) == (
        "crashed",
        "Jupyter Lab stopped unexpectedly on the machine.",
    )


# --- notices -----------------------------------------------------------------------------------


def test_a_notice_becomes_a_warning_on_the_session(
    owner: User, django_capture_on_commit_callbacks: Any
) -> None:
    session = running(owner)

    with django_capture_on_commit_callbacks() as callbacks:
        assert report(
            session,
            {
                "type": "session.notice",
                "kind": "memory_limit",
                "message": "A process was stopped: the session hit its memory limit.",
            },
        )

    warnings = SessionEvent.objects.filter(session=session, kind=SessionEvent.Kind.WARNING)
    assert list(warnings.values_list("message", flat=True)) == [
        "A process was stopped: the session hit its memory limit."
    ]
    assert len(callbacks) == 1  # pushed to the owner's dashboard after commit


def test_a_notice_for_another_machines_session_is_refused(owner: User) -> None:
    session = running(owner)
    intruder = MachineFactory.create()
    msg = protocol.SessionNotice(session_id=session.pk, kind="disk_full", message="full")

    assert not apply_agent_report(machine_id=intruder.pk, msg=msg)

    assert not SessionEvent.objects.filter(session=session, kind=SessionEvent.Kind.WARNING)


# --- the receipt's proof -----------------------------------------------------------------------

CHECKS = [
    {"name": "processes", "ok": True, "detail": ""},
    {"name": "files", "ok": True, "detail": "0 files of uid 6001"},
]


def test_the_receipt_stores_its_checks_and_account(
    owner: User, owner_client: Client, client: Client
) -> None:
    session = running(owner)
    receipt = {
        "type": "session.receipt",
        "verified": True,
        "files_removed": 4,
        "bytes_removed": 40,
        "processes_killed": 1,
        "duration_seconds": 0.4,
        "details": ["removed /tmp/x"],
        "checks": CHECKS,
        "account": "nxs-1",
    }

    assert report(session, receipt)

    session = reload(session)
    assert (session.cleanup_checks, session.cleanup_account) == (CHECKS, "nxs-1")
    cleanup = owner_client.get(f"/api/sessions/{session.pk}").json()["cleanup"]
    assert cleanup["checks"] == CHECKS
    assert cleanup["account"] == "nxs-1"
    assert (cleanup["verified"], cleanup["files_removed"], cleanup["bytes_removed"]) == (
        True,
        4,
        40,
    )
    client.force_login(owner)
    page = client.get("/history/").content.decode()
    assert "nxs-1" in page
    assert "0 files of uid 6001" in page


def test_a_receipt_without_checks_keeps_them_empty(owner: User, owner_client: Client) -> None:
    session = running(owner)
    receipt = {
        "type": "session.receipt",
        "verified": True,
        "files_removed": 0,
        "bytes_removed": 0,
        "processes_killed": 0,
        "duration_seconds": 0.1,
    }

    assert report(session, receipt)

    cleanup = owner_client.get(f"/api/sessions/{session.pk}").json()["cleanup"]
    assert (cleanup["checks"], cleanup["account"]) == ([], None)


def test_a_failed_check_quarantines_the_machine(owner: User) -> None:
    session = running(owner)
    session_stop(session=session, reason=EndReason.USER)
    receipt = {
        "type": "session.receipt",
        "verified": False,
        "files_removed": 0,
        "bytes_removed": 0,
        "processes_killed": 0,
        "duration_seconds": 0.1,
        "checks": [{"name": "ipc", "ok": False, "detail": "1 queue left"}],
    }

    assert report(session, receipt)

    session = reload(session)
    assert session.state == SessionState.ENDED
    assert session.machine.status == MachineStatus.QUARANTINED
    # Straight from cleaning to quarantined: the machine was never offered in between.
    changes = MachineEvent.objects.filter(machine=session.machine, from_status="cleaning")
    assert list(changes.values_list("to_status", flat=True)) == ["quarantined"]


# --- limits sent with session.start ------------------------------------------------------------


def test_the_start_carries_the_policys_limits(owner: User) -> None:
    machine: Machine = MachineFactory.create(memory_bytes=16 * GIB)
    session = session_request(user=owner, machine_id=machine.pk)

    start = session_start_command(session_id=session.pk)

    assert start is not None
    assert start.limits == protocol.SessionLimits(
        memory_bytes=12 * GIB,  # 75 % of the machine's RAM
        cpu_weight=20,
        cpu_quota=None,
        max_tasks=1024,
        workspace_bytes=20 * GIB,
    )
    assert start.memory_limit_bytes == start.limits.memory_bytes


def test_the_start_leaves_memory_to_the_agent_when_the_machine_never_said(owner: User) -> None:
    machine = MachineFactory.create(memory_bytes=0)
    session = session_request(user=owner, machine_id=machine.pk)

    start = session_start_command(session_id=session.pk)

    assert start is not None and start.limits is not None
    assert (start.limits.memory_bytes, start.memory_limit_bytes) == (None, None)


def test_the_most_generous_policy_sets_each_limit(owner: User) -> None:
    group = Group.objects.create(name="thesis")
    owner.groups.add(group)
    thesis = QuotaPolicy.objects.create(
        name="thesis", group=group, memory_percent=90, cpu_weight=100, cpu_quota=4.0
    )
    extra = Group.objects.create(name="extra")
    owner.groups.add(extra)
    QuotaPolicy.objects.create(
        name="extra", group=extra, workspace_gb=50, max_tasks=512, cpu_quota=2.0
    )

    policy = policy_for(owner)

    assert thesis.max_tasks == 1024
    assert (policy.memory_percent, policy.cpu_weight, policy.cpu_quota) == (90, 100, 4.0)
    assert (policy.max_tasks, policy.workspace_gb) == (1024, 50)


def test_a_policy_without_a_cpu_quota_gives_all_cpus(owner: User) -> None:
    group = Group.objects.create(name="quota")
    owner.groups.add(group)
    QuotaPolicy.objects.create(name="quota", group=group, cpu_quota=2.0)
    other = Group.objects.create(name="free")
    owner.groups.add(other)
    QuotaPolicy.objects.create(name="free", group=other)

    assert policy_for(owner).cpu_quota is None


# --- activity (docs/policy.md, "What counts as activity") --------------------------------------


def test_an_activity_report_keeps_its_source_and_cpu_and_an_older_agents_report_still_counts(
    owner: User,
) -> None:
    session = running(owner)
    at = "2027-01-15T08:00:00Z"
    base = {"type": "session.activity", "kernels_busy": 0, "connections": 2}

    assert report(session, {**base, "last_activity": at, "source": "cpu", "cpu_percent": 97.5})
    s = reload(session)
    assert (s.activity_source, s.activity_cpu_percent) == ("cpu", 97.5)
    assert s.last_activity is not None
    assert s.last_activity.isoformat() == "2027-01-15T08:00:00+00:00"

    # A protocol-2 agent's report (Jupyter's own clock, no source) replaces it.
    assert report(session, {**base, "last_activity": "2027-01-15T08:05:00Z"})
    s = reload(session)
    assert (s.activity_source, s.activity_cpu_percent) == ("", None)
    assert s.last_activity is not None and s.last_activity.minute == 5
    # An unknown source is refused by the protocol before it reaches the database.
    with pytest.raises(protocol.ProtocolError):
        report(session, {**base, "last_activity": at, "source": "tab_open"})
