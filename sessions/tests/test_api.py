"""Access to every JSON API endpoint: who may see and change what, and the answers' shape."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from django.test import Client

from accounts.models import User
from accounts.services import api_token_create, api_token_revoke, default_policy
from machines.models import Machine, MachineStatus
from sessions.api import session_out
from sessions.models import ComputeSession
from sessions.occupancy import transition
from sessions.services import session_mark_running, session_request, session_stop
from sessions.states import EndReason, SessionState
from tests.factories import MachineFactory, SessionFactory, record_receipt

pytestmark = pytest.mark.django_db


# Every endpoint of CONTRACT.md that needs a user; {id} is filled with a real session.
ENDPOINTS = [
    ("get", "/api/machines", None),
    ("post", "/api/sessions", {}),
    ("get", "/api/sessions", None),
    ("get", "/api/sessions/{id}", None),
    ("get", "/api/sessions/{id}/events", None),
    ("post", "/api/sessions/{id}/extend", {"minutes": 10}),
    ("delete", "/api/sessions/{id}", None),
]
ONE_SESSION = [e for e in ENDPOINTS if "{id}" in e[1]]


def call(client: Client, method: str, url: str, body: Any = None) -> Any:
    if body is None:
        return getattr(client, method)(url)
    return getattr(client, method)(url, body, content_type="application/json")


def running(user: User) -> ComputeSession:
    session = session_request(user=user)
    assert session_mark_running(session=session, url="http://pc:8888/lab?token=abc")
    session.refresh_from_db()
    return session


@pytest.mark.parametrize(("method", "url", "body"), ENDPOINTS)
def test_it_answers_401_json_without_credentials(
    method: str, url: str, body: Any, owner: User, machine: Machine
) -> None:
    session = running(owner)
    anonymous = Client()

    response = call(anonymous, method, url.format(id=session.pk), body)

    assert response.status_code == 401
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["detail"].startswith("authentication required")
    assert response["WWW-Authenticate"].startswith("Bearer")
    session.refresh_from_db()
    assert session.state == SessionState.RUNNING


def _revoked_token(user: User) -> str:
    row, clear = api_token_create(user=user)
    assert Client(HTTP_AUTHORIZATION=f"Bearer {clear}").get("/api/sessions").status_code == 200
    api_token_revoke(token=row)
    return clear


@pytest.mark.parametrize(("method", "url", "body"), ENDPOINTS)
@pytest.mark.parametrize("credential", ["none", "unknown", "revoked", "not-bearer"])
def test_every_method_answers_401_not_a_csrf_error_for_a_bad_credential(
    method: str, url: str, body: Any, credential: str, owner: User, machine: Machine
) -> None:
    """CONTRACT: 401 with WWW-Authenticate: Bearer on every method; CSRF is for cookies only.

    The client enforces CSRF as a browser would: before the fix a POST/DELETE with a bad token
    fell through to the cookie check and answered 403 "CSRF check Failed"."""
    session = running(owner)
    header = {
        "none": None,
        "unknown": "Bearer nxp_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "revoked": f"Bearer {_revoked_token(owner)}",
        "not-bearer": "Basic b3duZXI6cHc=",
    }[credential]
    client = Client(enforce_csrf_checks=True, **({"HTTP_AUTHORIZATION": header} if header else {}))

    response = call(client, method, url.format(id=session.pk), body)

    assert response.status_code == 401, response.content
    assert response["Content-Type"].startswith("application/json")
    assert "csrf" not in response.json()["detail"].lower()
    assert response["WWW-Authenticate"].startswith("Bearer")
    if credential in ("unknown", "revoked"):
        assert 'error="invalid_token"' in response["WWW-Authenticate"]
        assert "unknown or revoked" in response.json()["detail"]
    session.refresh_from_db()
    assert session.state == SessionState.RUNNING  # nothing happened


def test_a_bearer_request_needs_no_csrf_token(owner: User, machine: Machine) -> None:
    _, clear = api_token_create(user=owner)
    client = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {clear}")

    response = client.post("/api/sessions", {}, content_type="application/json")

    assert response.status_code == 201, response.content


def test_a_cookie_request_still_needs_the_csrf_token(owner: User, machine: Machine) -> None:
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)

    refused = browser.post("/api/sessions", {}, content_type="application/json")
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]
    assert not ComputeSession.objects.exists()

    browser.get("/")  # the dashboard sets the CSRF cookie
    token = browser.cookies["csrftoken"].value
    accepted = browser.post(
        "/api/sessions", {}, content_type="application/json", HTTP_X_CSRFTOKEN=token
    )
    assert accepted.status_code == 201, accepted.content


@pytest.mark.parametrize(
    "header", ["Bearer nxp_not-a-real-token", "Bearer ", "Basic b3duZXI6cHc=", "nxp_x"]
)
def test_it_answers_401_for_a_wrong_token(header: str, owner: User) -> None:
    response = Client(HTTP_AUTHORIZATION=header).get("/api/sessions")

    assert response.status_code == 401
    assert response.json()["detail"]


@pytest.mark.parametrize(("method", "url", "body"), ONE_SESSION)
def test_another_students_session_is_not_found(
    method: str, url: str, body: Any, owner: User, other_client: Client, machine: Machine
) -> None:
    session = running(owner)

    response = call(other_client, method, url.format(id=session.pk), body)

    assert response.status_code == 404
    assert response.json() == {"detail": "no such session"}
    session.refresh_from_db()
    assert (session.state, session.expires_at) == (SessionState.RUNNING, session.expires_at)


@pytest.mark.parametrize(("method", "url", "body"), ONE_SESSION)
def test_a_missing_session_is_not_found(
    method: str, url: str, body: Any, owner_client: Client
) -> None:
    response = call(owner_client, method, url.format(id=999999), body)

    assert response.status_code == 404
    assert response.json() == {"detail": "no such session"}


def test_the_list_holds_only_my_sessions_newest_first(
    owner_client: Client, owner: User, other: User
) -> None:
    oldest = SessionFactory(owner=owner, state=SessionState.ENDED)
    SessionFactory(owner=other)
    newest = SessionFactory(owner=owner, state=SessionState.ENDED)
    ComputeSession.objects.filter(pk=oldest.pk).update(
        created_at=newest.created_at - dt.timedelta(hours=1)
    )

    response = owner_client.get("/api/sessions")

    assert response.status_code == 200
    assert [s["id"] for s in response.json()] == [newest.pk, oldest.pk]


def test_it_shows_the_full_session_shape(
    owner_client: Client, owner: User, machine: Machine
) -> None:
    session = running(owner)

    body = owner_client.get(f"/api/sessions/{session.pk}").json()

    assert set(body) >= {
        "id",
        "state",
        "machine",
        "url",
        "created_at",
        "started_at",
        "expires_at",
        "ended_at",
        "end_reason",
        "cleanup",
    }
    assert body["machine"] == {"id": machine.pk, "name": machine.name}
    assert (body["state"], body["url"]) == ("running", "http://pc:8888/lab?token=abc")
    assert body["started_at"] is not None
    assert (body["ended_at"], body["end_reason"], body["cleanup"]) == (None, None, None)


def test_the_url_is_shown_only_to_its_owner_and_only_while_running(
    owner_client: Client, owner: User, other: User, machine: Machine
) -> None:
    session = session_request(user=owner)
    assert owner_client.get(f"/api/sessions/{session.pk}").json()["url"] is None
    session_mark_running(session=session, url="http://pc/lab")
    session.refresh_from_db()

    assert owner_client.get(f"/api/sessions/{session.pk}").json()["url"] == "http://pc/lab"
    assert owner_client.get("/api/sessions").json()[0]["url"] == "http://pc/lab"
    assert session_out(session, viewer_id=other.pk)["url"] is None
    assert session_out(session, viewer_id=None)["url"] is None

    session_stop(session=session, reason=EndReason.USER)
    assert owner_client.get(f"/api/sessions/{session.pk}").json()["url"] is None


def test_deleting_a_requested_session_of_an_offline_machine_ends_it_at_once(
    owner_client: Client, owner: User, machine: Machine
) -> None:
    session = session_request(user=owner)
    Machine.objects.filter(pk=machine.pk).update(status=MachineStatus.OFFLINE)

    response = owner_client.delete(f"/api/sessions/{session.pk}")

    assert response.status_code == 202
    body = response.json()
    assert (body["state"], body["end_reason"]) == ("ended", "user")
    assert body["end_reason_text"] == "You ended the session."
    assert body["ended_at"] is not None


def test_deleting_a_requested_session_of_an_online_machine_has_it_wiped(
    owner_client: Client, owner: User, machine: Machine
) -> None:
    # The start command went out on commit, so the agent may already be starting Jupyter:
    # the session stops through the agent's wipe rather than ending on the spot.
    session = session_request(user=owner)

    response = owner_client.delete(f"/api/sessions/{session.pk}")

    assert response.status_code == 202
    assert (response.json()["state"], response.json()["end_reason"]) == ("stopping", "user")
    machine.refresh_from_db()
    assert machine.status == MachineStatus.CLEANING
    record_receipt(session)
    machine.refresh_from_db()
    assert machine.status == MachineStatus.AVAILABLE
    assert owner_client.get(f"/api/sessions/{session.pk}").json()["state"] == "ended"


def test_deleting_a_running_session_stops_it_and_cleans_the_machine(
    owner_client: Client, owner: User, machine: Machine
) -> None:
    session = running(owner)

    response = owner_client.delete(f"/api/sessions/{session.pk}")

    assert response.status_code == 202
    assert (response.json()["state"], response.json()["url"]) == ("stopping", None)
    machine.refresh_from_db()
    assert machine.status == MachineStatus.CLEANING
    # Stopping is idempotent until the agent's receipt ends it.
    assert owner_client.delete(f"/api/sessions/{session.pk}").status_code == 202


def test_deleting_an_ended_session_is_a_conflict(
    owner_client: Client, owner: User, machine: Machine
) -> None:
    session = running(owner)
    assert owner_client.delete(f"/api/sessions/{session.pk}").status_code == 202
    session.refresh_from_db()
    assert transition(session, SessionState.ENDED)  # the agent's receipt would do this

    response = owner_client.delete(f"/api/sessions/{session.pk}")

    assert response.status_code == 409
    assert response.json() == {"detail": "session already ended"}


def test_the_timeline_is_oldest_first_with_kind_state_and_message(
    owner_client: Client, owner: User, machine: Machine
) -> None:
    session = running(owner)
    owner_client.delete(f"/api/sessions/{session.pk}")

    response = owner_client.get(f"/api/sessions/{session.pk}/events")

    assert response.status_code == 200
    events = response.json()
    assert [(e["kind"], e["state"]) for e in events] == [
        ("state", "requested"),
        ("state", "starting"),
        ("state", "running"),
        ("state", "stopping"),
    ]
    assert all(e["message"] and e["at"] for e in events)
    assert events[-1]["message"] == "You ended the session."
    assert events[-1]["reason"] == "user"
    ats = [e["at"] for e in events]
    assert ats == sorted(ats)


def test_the_machine_list_shows_specs_and_hides_what_policy_forbids(
    owner_client: Client,
) -> None:
    plain = MachineFactory(metrics={"cpu_percent": 12.5, "memory_percent": 40.0})
    gpu = MachineFactory(gpu_count=1)

    listed = {m["id"]: m for m in owner_client.get("/api/machines").json()}
    assert set(listed) == {plain.pk, gpu.pk}
    entry = listed[plain.pk]
    assert entry["lab"] == plain.lab.name
    assert entry["status"] == "available"
    assert entry["specs"]["memory_bytes"] == 16 * 1024**3
    assert entry["specs"]["gpus"] == []
    assert listed[gpu.pk]["specs"]["gpus"] == [{"name": "Test GPU", "memory_bytes": 8 * 1024**3}]
    assert entry["metrics"]["cpu_percent"] == 12.5
    assert entry["last_seen"] is not None

    policy = default_policy()
    policy.allow_gpu = False
    policy.save()
    assert [m["id"] for m in owner_client.get("/api/machines").json()] == [plain.pk]


# --- browser session auth and CSRF -------------------------------------------------------------


def test_the_browser_session_authenticates_reads(owner: User, machine: Machine) -> None:
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)

    response = browser.get("/api/machines")

    assert response.status_code == 200
    assert [m["id"] for m in response.json()] == [machine.pk]


def test_a_browser_post_without_the_csrf_token_is_refused(owner: User, machine: Machine) -> None:
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)

    response = browser.post("/api/sessions", {}, content_type="application/json")

    assert response.status_code == 403
    assert response["Content-Type"].startswith("application/json")
    assert "CSRF" in response.json()["detail"]
    assert not ComputeSession.objects.exists()


def test_a_browser_post_with_the_csrf_token_succeeds(owner: User, machine: Machine) -> None:
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)
    browser.get("/accounts/login/")  # any page with a form sets the CSRF cookie
    token = browser.cookies["csrftoken"].value

    response = browser.post(
        "/api/sessions", {}, content_type="application/json", HTTP_X_CSRFTOKEN=token
    )

    assert response.status_code == 201, response.content
    assert ComputeSession.objects.get().owner == owner


def test_a_browser_delete_without_the_csrf_token_is_refused(owner: User, machine: Machine) -> None:
    session = running(owner)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner)

    response = browser.delete(f"/api/sessions/{session.pk}")

    assert response.status_code == 403
    session.refresh_from_db()
    assert session.state == SessionState.RUNNING


def test_a_revoked_user_token_stops_working(owner: User) -> None:
    from accounts.models import ApiToken
    from accounts.services import api_token_create, api_token_revoke

    token, clear = api_token_create(user=owner)
    client = Client(HTTP_AUTHORIZATION=f"Bearer {clear}")
    assert client.get("/api/sessions").status_code == 200

    api_token_revoke(token=ApiToken.objects.get(pk=token.pk))

    assert client.get("/api/sessions").status_code == 401


# --- the agent's wipe receipt ------------------------------------------------------------------


def test_a_verified_receipt_ends_the_session_erases_access_and_frees_the_machine(
    owner_client: Client, owner: User, machine: Machine
) -> None:
    session = running(owner)
    owner_client.delete(f"/api/sessions/{session.pk}")

    record_receipt(
        session,
        files_removed=12,
        bytes_removed=4096,
        processes_killed=3,
        details=("removed /tmp/ws",),
    )

    body = owner_client.get(f"/api/sessions/{session.pk}").json()
    assert (body["state"], body["end_reason"]) == ("ended", "user")
    assert body["ended_at"] is not None
    assert body["cleanup"]["verified"] is True
    assert (body["cleanup"]["files_removed"], body["cleanup"]["processes_killed"]) == (12, 3)
    assert body["cleanup"]["finished_at"] is not None
    session.refresh_from_db()
    assert (session.jupyter_token, session.jupyter_url) == ("", "")
    machine.refresh_from_db()
    assert machine.status == MachineStatus.AVAILABLE
    assert session.events.filter(message="Workspace wiped and verified.").count() == 1


def test_an_unverified_receipt_quarantines_the_machine(
    owner_client: Client, owner: User, machine: Machine
) -> None:
    session = running(owner)
    owner_client.delete(f"/api/sessions/{session.pk}")

    record_receipt(session, verified=False, details=("rm failed: permission denied",))

    assert owner_client.get(f"/api/sessions/{session.pk}").json()["cleanup"]["verified"] is False
    machine.refresh_from_db()
    assert machine.status == MachineStatus.QUARANTINED
    assert "unverified wipe" in machine.quarantine_reason
    # Quarantine outlives the session: the machine is not lent again.
    assert (
        owner_client.post("/api/sessions", {}, content_type="application/json").status_code == 409
    )


def test_the_openapi_document_is_served_as_json() -> None:
    response = Client().get("/api/openapi.json")

    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"/api/machines", "/api/sessions", "/api/sessions/{session_id}"} <= set(paths)


def test_an_empty_body_is_answered_in_words(owner: User, machine: Machine) -> None:
    session = running(owner)
    client = Client()
    client.force_login(owner)

    empty = client.post("/api/sessions", " ", content_type="application/json")
    form = client.post("/api/sessions")  # the test client's default: an empty form
    text = client.post("/api/sessions", "", content_type="text/plain")
    broken = client.post("/api/sessions", "{machine_id: 1", content_type="application/json")
    no_minutes = client.post(
        f"/api/sessions/{session.pk}/extend", {}, content_type="application/json"
    )
    unknown = client.post("/api/sessions", {"gpus": 1}, content_type="application/json")

    assert empty.status_code == 400
    assert empty.json()["detail"] == "the request body is empty: send a JSON object, e.g. {}"
    assert form.status_code == 400
    assert form.json()["detail"] == (
        "the request body must be a JSON object (Content-Type: application/json)"
    )
    assert text.status_code == 400
    assert text.json()["detail"] == "a JSON object is required as the request body"
    assert broken.status_code == 400
    assert broken.json()["detail"].startswith("the request body is not valid JSON")
    assert no_minutes.status_code == 400
    assert no_minutes.json()["detail"] == "minutes is required"
    assert unknown.status_code == 400
    assert unknown.json()["detail"] == "gpus is not a known field"


def test_an_unknown_machine_is_404_even_at_quota(owner: User, machine: Machine) -> None:
    running(owner)  # the quota (one session) is used up
    client = Client()
    client.force_login(owner)

    response = client.post("/api/sessions", {"machine_id": 99999}, content_type="application/json")

    assert response.status_code == 404
    assert response.json() == {"detail": "no such machine: 99999"}


def test_interactive_api_docs_are_served_by_the_app_without_a_cdn(db: Any) -> None:
    client = Client()
    page = client.get("/api/docs")

    assert page.status_code == 200
    html = page.content.decode()
    assert "cdn" not in html.lower()
    scripts = re.findall(r'<script[^>]+src="([^"]+)"', html)
    styles = re.findall(r'<link[^>]+href="([^"]+\.css)"', html)
    assert scripts and styles
    for asset in scripts + styles:
        assert asset.startswith("/static/"), asset
        assert b"".join(client.get(asset).streaming_content), asset
    assert "/api/openapi.json" in html
