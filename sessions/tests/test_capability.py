"""The session-scoped capability (sessions/capability.py, /api/session-capability/…): issued
with the start frame, stored only as a hash, good for its own live session's lease and Extend
only, and dead once the session ends."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import User
from accounts.services import api_token_create, default_policy
from machines.models import Machine
from sessions.capability import capability_for, capability_hash, capability_session
from sessions.models import ComputeSession, SessionEvent
from sessions.services import (
    lease_extend_choices,
    session_mark_running,
    session_request,
    session_start_command,
    session_stop,
)
from sessions.states import EndReason, SessionState
from tests.factories import MachineFactory, record_receipt

pytestmark = pytest.mark.django_db


def started(user: User, machine: Machine | None = None) -> tuple[ComputeSession, str]:
    """A running session and the capability its start frame carried."""
    machine = machine or MachineFactory()
    session = session_request(user=user, machine_id=machine.pk, duration_minutes=60)
    start = session_start_command(session_id=session.pk)
    assert start is not None and start.capability
    assert session_mark_running(session=session, url="http://pc:8888/lab")
    session.refresh_from_db()
    return session, start.capability


def cap_client(capability: str) -> Client:
    return Client(headers={"Authorization": f"Bearer {capability}"})


def lease_url(session_id: int, what: str = "lease") -> str:
    return f"/api/session-capability/sessions/{session_id}/{what}"


def test_it_stores_only_a_hash_and_sends_the_same_capability_again(owner: User) -> None:
    session, cap = started(owner)

    row = ComputeSession.objects.get(pk=session.pk)
    assert row.capability_hash == capability_hash(cap)
    assert cap not in str(row.__dict__)  # the value itself is nowhere in the row
    assert cap.startswith(f"nxcap_{session.pk}_")
    # A start sent again (the agent lost the first) carries the same value.
    ComputeSession.objects.filter(pk=session.pk).update(state=SessionState.STARTING)
    again = session_start_command(session_id=session.pk)
    assert again is not None and again.capability == cap


def test_capabilities_of_two_sessions_differ(owner: User, other: User) -> None:
    _, mine = started(owner)
    _, theirs = started(other)
    assert mine != theirs
    assert mine.split("_")[-1] != theirs.split("_")[-1]


def test_it_reads_its_own_lease_with_warnings_and_extend_choices(owner: User) -> None:
    session, cap = started(owner)
    SessionEvent.objects.create(
        session=session, kind=SessionEvent.Kind.WARNING, message="Your session ends in 10 min"
    )

    resp = cap_client(cap).get(lease_url(session.pk))

    assert resp.status_code == 200, resp.content
    body = resp.json()
    assert body["session_id"] == session.pk
    assert body["state"] == "running"
    assert body["machine"]["name"] == session.machine.name
    assert body["warnings"][-1]["message"] == "Your session ends in 10 min"
    assert body["extend"]["default_minutes"] == 30
    assert body["extend"]["choices_minutes"] == [15, 30, 60]


def test_it_extends_its_own_session_by_the_policy(owner: User) -> None:
    session, cap = started(owner)
    before = session.expires_at

    resp = cap_client(cap).post(
        lease_url(session.pk, "extend"), {"minutes": 30}, content_type="application/json"
    )

    assert resp.status_code == 200, resp.content
    session.refresh_from_db()
    assert session.expires_at - before == dt.timedelta(minutes=30)
    assert resp.json()["expires_at"].startswith(session.expires_at.isoformat()[:19])
    # Past the policy's lifetime: refused with the reason, nothing moves.
    too_long = cap_client(cap).post(
        lease_url(session.pk, "extend"), {"minutes": 600}, content_type="application/json"
    )
    assert too_long.status_code == 409
    assert "at most" in too_long.json()["detail"]
    bad = cap_client(cap).post(
        lease_url(session.pk, "extend"), {"minutes": "lots"}, content_type="application/json"
    )
    assert bad.status_code == 400 and "detail" in bad.json()


def test_it_offers_only_what_the_policy_allows(owner: User) -> None:
    policy = default_policy()
    policy.max_session_minutes = 80
    policy.save()
    session, _ = started(owner)  # 60 min lease: 20 min left to give
    choices = lease_extend_choices(session=session, now=timezone.now())
    assert choices.choices == [15]
    assert choices.default == 15
    policy.max_session_minutes = 60
    policy.save()
    none = lease_extend_choices(session=session, now=timezone.now())
    assert none.choices == [] and none.default is None
    assert "at most 60 min" in none.reason


def test_it_cannot_read_or_extend_another_session(owner: User, other: User) -> None:
    mine, cap = started(owner)
    theirs, _ = started(other)
    client = cap_client(cap)
    # The attack's tool works: this capability reads its own session.
    assert client.get(lease_url(mine.pk)).status_code == 200

    assert client.get(lease_url(theirs.pk)).status_code == 404
    extend = client.post(
        lease_url(theirs.pk, "extend"), {"minutes": 30}, content_type="application/json"
    )
    assert extend.status_code == 404
    theirs_before = theirs.expires_at
    theirs.refresh_from_db()
    assert theirs.expires_at == theirs_before
    # Nor does rewriting the id inside the capability help: the digest is the proof.
    forged = cap.replace(f"nxcap_{mine.pk}_", f"nxcap_{theirs.pk}_")
    assert cap_client(forged).get(lease_url(theirs.pk)).status_code == 401


def test_it_accepts_nothing_but_the_capability(owner: User) -> None:
    session, cap = started(owner)
    _, api_token = api_token_create(user=owner)
    # The owner's own API token and browser session are not capabilities.
    user_client = Client(headers={"Authorization": f"Bearer {api_token}"})
    assert user_client.get(lease_url(session.pk)).status_code == 401
    browser = Client()
    browser.force_login(owner)
    assert browser.get(lease_url(session.pk)).status_code == 401
    assert Client().get(lease_url(session.pk)).status_code == 401
    # And the capability opens none of the user's own API.
    assert cap_client(cap).get(f"/api/sessions/{session.pk}").status_code == 401
    assert cap_client(cap).get("/api/sessions").status_code == 401
    wrong = cap[:-2] + ("AA" if not cap.endswith("AA") else "BB")
    assert cap_client(wrong).get(lease_url(session.pk)).status_code == 401


def test_it_dies_with_its_session(owner: User) -> None:
    session, cap = started(owner)
    client = cap_client(cap)
    assert client.get(lease_url(session.pk)).status_code == 200

    session_stop(session=session, reason=EndReason.USER, actor=owner)
    # Stopping: it still reads (the Lab shows the end coming), but nothing extends.
    stopping = client.get(lease_url(session.pk))
    assert stopping.status_code == 200 and stopping.json()["state"] == "stopping"
    extend = client.post(
        lease_url(session.pk, "extend"), {"minutes": 30}, content_type="application/json"
    )
    assert extend.status_code == 409
    record_receipt(session)
    session.refresh_from_db()
    assert session.state == SessionState.ENDED

    assert ComputeSession.objects.get(pk=session.pk).capability_hash == ""
    assert capability_session(cap) is None
    assert client.get(lease_url(session.pk)).status_code == 401


def test_a_session_without_a_token_has_no_capability(owner: User) -> None:
    session, _ = started(owner)
    session.jupyter_token = ""
    with pytest.raises(ValueError, match="no Jupyter token"):
        capability_for(session)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "nxcap_",
        "nxcap_1_",
        "nxcap_0_" + "A" * 43,
        "nxcap_1_" + "A" * 42,
        "x" * 5000,
        "nxcap_-1_" + "A" * 43,
    ],
)
def test_it_refuses_malformed_capabilities(owner: User, value: Any) -> None:
    started(owner)
    assert capability_session(value) is None
