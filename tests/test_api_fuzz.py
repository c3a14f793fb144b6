"""Bad input, systematically: the API answers 4xx JSON ``{"detail": ...}``, never a 500 or HTML.

Schemathesis generates requests (valid and invalid) from our own OpenAPI document and sends
them through Django's real WSGI handler; Hypothesis adds raw bodies no schema describes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from accounts.models import QuotaPolicy, User
from accounts.services import api_token_create, default_policy
from machines.services import enrollment_token_create, lab_get_or_create
from sessions.models import ComputeSession
from sessions.services import session_mark_running, session_request
from tests.factories import MachineFactory, bearer_client

BOUNDED = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture
def wsgi_in_test_transaction() -> Iterator[None]:
    """Let the WSGI handler run inside the test's transaction.

    Django's handler closes "old" connections at the start and end of each request, which
    would close the connection holding the test transaction; the test client does the same.
    """
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def generous_policy() -> None:
    """Quotas out of the way, so generated bodies reach allocation and the database."""
    QuotaPolicy.objects.filter(pk=default_policy().pk).update(
        max_concurrent_sessions=100_000, max_session_minutes=100_000, max_hours_per_week=100_000
    )


@pytest.fixture
def fuzz_user(db: Any, wsgi_in_test_transaction: None) -> tuple[User, str]:
    generous_policy()
    user = User.objects.create(username="fuzzer")
    _, token = api_token_create(user=user)
    MachineFactory.create_batch(3)
    session = session_request(user=user)
    session_mark_running(session=session, url="http://pc/lab")
    return user, token


# Loaded once at import through the real WSGI stack; the document needs no database.
schema = schemathesis.openapi.from_wsgi("/api/openapi.json", get_wsgi_application())


def detail_json_on_client_errors(ctx: Any, response: Any, case: Any) -> None:
    """Every 4xx is JSON with a non-empty string ``detail``."""
    if 400 <= response.status_code < 500:
        content_type = response.headers.get("content-type", [""])[0]
        assert content_type.startswith("application/json"), (response.status_code, content_type)
        body = json.loads(response.content)
        assert isinstance(body, dict), body
        assert isinstance(body.get("detail"), str), body
        assert body["detail"], body


@pytest.mark.django_db
@schema.parametrize()
@BOUNDED
def test_the_api_never_fails_on_generated_input(case: Any, fuzz_user: tuple[User, str]) -> None:
    _, token = fuzz_user
    case.call_and_validate(
        headers={"Authorization": f"Bearer {token}"},
        checks=[not_a_server_error, detail_json_on_client_errors],
    )


# --- raw bodies that no schema describes -------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)
FIELDS = {
    "/api/sessions": ["machine_id", "requirements", "duration_minutes"],
    "/api/sessions/{id}/extend": ["minutes"],
    "/api/agents/enroll": ["token", "hostname", "agent_version"],
}
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda keys, values, extra: json.dumps(
            {**dict(zip(keys, values, strict=False)), **extra}
        ).encode(),
        st.lists(st.sampled_from(sorted({f for fs in FIELDS.values() for f in fs})), max_size=3),
        st.lists(JSON_VALUES, min_size=3, max_size=3),
        st.dictionaries(st.text(min_size=1, max_size=8), JSON_VALUES, max_size=2),
    ),
)


def assert_json_client_error(response: Any) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    assert isinstance(response.json()["detail"], str)


def _raw_targets(user: User) -> tuple[Client, list[str]]:
    generous_policy()
    MachineFactory.create_batch(2)
    session = session_request(user=user)
    return bearer_client(user), [
        "/api/sessions",
        f"/api/sessions/{session.pk}/extend",
        "/api/agents/enroll",
    ]


@pytest.mark.django_db
@given(body=BODIES)
@BOUNDED
def test_raw_bodies_get_a_json_client_error_or_success(body: bytes) -> None:
    user, _ = User.objects.get_or_create(username="raw")
    client, urls = _raw_targets(user)
    for url in urls:
        response = client.post(url, body, content_type="application/json")
        if response.status_code in (200, 201):
            continue  # a random body can be valid ({} for POST /api/sessions)
        assert_json_client_error(response)
    ComputeSession.objects.all().delete()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body",
    [
        b'{"requirements": {"lab": "a\\u0000b"}}',
        b'{"requirements": {"lab": "\\ud800"}}',
        b'{"requirements": {"min_memory_gb": NaN}}',
        b'{"requirements": {"min_memory_gb": Infinity}}',
        b'{"duration_minutes": 1e400}',
        b'{"machine_id": 99999999999999999999999999}',
        b'{"machine_id": -1}',
        b'{"requirements": []}',
        b'{"unknown": 1}',
        b'{"token": "nxe_\\u0000", "hostname": "h"}',
        b'{"token": "nxe_x", "hostname": "\\u0000"}',
        b'{"token": "x", "hostname": "h", "agent_version": "\\u0000"}',
        b'{"minutes": 10, "\\u0000": 1}',
        b"\xff\xfe\x00",
        b"[" * 5000,
        b"",
    ],
)
def test_known_nasty_bodies_get_a_json_client_error(body: bytes, owner: User) -> None:
    client, urls = _raw_targets(owner)
    for url in urls:
        response = client.post(url, body, content_type="application/json")
        if response.status_code in (200, 201):
            assert body == b"" and url == "/api/sessions"
            ComputeSession.objects.all().delete()
            continue
        assert_json_client_error(response)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "fields",
    [
        {"hostname": "pc\x00"},
        {"hostname": "pc", "agent_version": "1\x00"},
        {"hostname": "pc", "\x00": "x"},
    ],
)
def test_enrolling_with_a_nul_in_a_valid_tokens_body_is_a_client_error(
    fields: dict[str, str],
) -> None:
    _, token = enrollment_token_create(lab=lab_get_or_create(name="Fuzz lab"))

    response = Client().post(
        "/api/agents/enroll",
        json.dumps({"token": token, **fields}),
        content_type="application/json",
    )

    assert_json_client_error(response)


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/api/sessions", "/api/sessions/1/extend", "/api/agents/enroll"])
def test_a_body_over_64_kib_is_refused_with_413(url: str, owner_client: Client) -> None:
    body = json.dumps({"padding": "x" * (65 * 1024)})

    response = owner_client.post(url, body, content_type="application/json")

    assert response.status_code == 413
    assert response.json() == {"detail": "request body too large"}


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url", ["/api/nope", "/api/sessions/1/nope", "/api/machines/1/x", "/api/sessions/1/events/2"]
)
def test_unknown_api_urls_get_a_json_404(url: str, owner_client: Client) -> None:
    response = owner_client.get(url)

    assert response.status_code == 404
    assert response.json() == {"detail": "not found"}


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["/api/sessions/abc", "/api/sessions/-1", "/api/sessions/1e3"])
def test_a_malformed_session_id_gets_a_json_client_error(url: str, owner_client: Client) -> None:
    assert_json_client_error(owner_client.get(url))


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("put", "/api/sessions"),
        ("patch", "/api/sessions/1"),
        ("get", "/api/sessions/1/extend"),
        ("delete", "/api/machines"),
        ("get", "/api/agents/enroll"),
    ],
)
def test_a_wrong_method_gets_a_json_405(method: str, url: str, owner_client: Client) -> None:
    response = getattr(owner_client, method)(url)

    assert response.status_code == 405
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["detail"] == "method not allowed"
    assert response["Allow"]


@pytest.mark.django_db
@pytest.mark.parametrize("header", ["Bearer nxp_\x00abc", "Bearer " + "x" * 5000, "Bearer \u00ff"])
def test_odd_authorization_headers_get_a_json_401(header: str, owner: User) -> None:
    response = Client(HTTP_AUTHORIZATION=header).get("/api/sessions")

    assert response.status_code == 401
    assert response.json()["detail"]
