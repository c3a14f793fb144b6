"""Join tokens and machine credentials: one use, only digests stored, revocation."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
import time_machine
from django.db import connection
from django.test import Client
from django.utils import timezone

from machines.models import EnrollmentToken, Lab, Machine, MachineEvent
from machines.services import (
    enrollment_token_create,
    lab_get_or_create,
    machine_authenticate,
    machine_enroll,
    machine_revoke_credential,
)
from nexcompute.errors import BadRequest, PolicyDenied
from nexcompute.tokens import digest_token

pytestmark = pytest.mark.django_db


def enroll(token: str, hostname: str = "lab-pc-01", **extra: Any) -> Any:
    return Client().post(
        "/api/agents/enroll",
        {"token": token, "hostname": hostname, **extra},
        content_type="application/json",
    )


@pytest.fixture
def lab() -> Lab:
    return lab_get_or_create(name="Physics 101")


def test_a_join_token_works_once(lab: Lab) -> None:
    _, token = enrollment_token_create(lab=lab)

    first = enroll(token, agent_version="1.2.3")
    second = enroll(token, hostname="lab-pc-02")

    assert first.status_code == 201, first.content
    body = first.json()
    assert body["name"] == "lab-pc-01"
    assert body["credential"].startswith("nxm_")
    machine = Machine.objects.get(pk=body["machine_id"])
    assert (machine.lab, machine.hostname, machine.agent_version) == (lab, "lab-pc-01", "1.2.3")
    assert machine.status == "offline"  # online only once its agent connects
    assert MachineEvent.objects.filter(machine=machine, kind="enrolled").count() == 1
    assert second.status_code == 403
    assert "already used" in second.json()["detail"]
    assert Machine.objects.count() == 1


def test_an_expired_join_token_is_refused(lab: Lab) -> None:
    _, token = enrollment_token_create(lab=lab, ttl_hours=1)

    with time_machine.travel(timezone.now() + dt.timedelta(hours=1, seconds=1)):
        response = enroll(token)

    assert response.status_code == 403
    assert response.json()["detail"] == "enrollment token already used or expired"
    assert not Machine.objects.exists()


@pytest.mark.parametrize(
    ("wrong", "status"),
    [
        ("nxe_wrong", 403),  # unknown
        ("x" * 200, 403),  # the longest the schema takes, still unknown
        ("", 400),  # refused by the schema before any lookup
    ],
)
def test_a_wrong_join_token_is_refused(lab: Lab, wrong: str, status: int) -> None:
    enrollment_token_create(lab=lab)  # a real token exists; the wrong one still fails

    response = enroll(wrong)

    assert response.status_code == status
    detail = response.json()["detail"]
    if status == 403:
        assert detail == "unknown enrollment token"
    else:
        assert detail
    assert not Machine.objects.exists()


def test_a_token_with_the_right_prefix_but_wrong_secret_is_refused(lab: Lab) -> None:
    _, token = enrollment_token_create(lab=lab)
    forged = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]

    response = enroll(forged)

    assert response.status_code == 403
    assert response.json() == {"detail": "unknown enrollment token"}
    assert enroll(token).status_code == 201  # the real one is still unused


def test_only_digests_are_stored(lab: Lab) -> None:
    row, token = enrollment_token_create(lab=lab)
    credential = enroll(token).json()["credential"]

    row.refresh_from_db()
    assert row.digest == digest_token(token)
    machine = Machine.objects.get()
    assert machine.credential_digest == digest_token(credential)
    for secret in (token, credential):
        hits = [
            (model.__name__, field.name)
            for model in (EnrollmentToken, Machine)
            for obj in model.objects.all()
            for field in model._meta.concrete_fields
            if secret in str(getattr(obj, field.attname))
        ]
        assert hits == []


def test_a_token_can_not_be_made_with_a_non_positive_lifetime(lab: Lab) -> None:
    with pytest.raises(BadRequest):
        enrollment_token_create(lab=lab, ttl_hours=0)


def test_machines_with_the_same_hostname_get_distinct_names(lab: Lab) -> None:
    names = [
        machine_enroll(token=enrollment_token_create(lab=lab)[1], hostname="pc")[0].name
        for _ in range(3)
    ]

    assert names == ["pc", "pc-2", "pc-3"]


def test_a_machine_is_found_by_its_credential_until_it_is_revoked(lab: Lab) -> None:
    machine, credential = machine_enroll(token=enrollment_token_create(lab=lab)[1], hostname="pc")
    _, other_credential = machine_enroll(token=enrollment_token_create(lab=lab)[1], hostname="pc-b")

    assert machine_authenticate(credential) == machine
    assert machine_authenticate(other_credential) != machine
    assert machine_authenticate(credential[:-1] + "x") is None
    assert machine_authenticate("") is None
    assert machine_authenticate("nxm_" + "a" * 300) is None

    machine_revoke_credential(machine=machine, actor=None)

    assert machine_authenticate(credential) is None
    machine.refresh_from_db()
    assert machine.credential_revoked_at is not None
    # One audit row for the revocation (the machine never connected: it stays offline).
    revoked = MachineEvent.objects.filter(machine=machine).exclude(kind="enrolled")
    assert [(e.kind, e.message) for e in revoked] == [("credential_revoked", "credential revoked")]
    assert machine_authenticate(other_credential) is not None


@pytest.mark.django_db(transaction=True)
def test_two_hosts_racing_with_one_token_get_one_machine() -> None:
    lab = lab_get_or_create(name="Race lab")
    _, token = enrollment_token_create(lab=lab)
    barrier = threading.Barrier(8)
    outcomes: list[Any] = []
    lock = threading.Lock()

    def host(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            result: Any = machine_enroll(token=token, hostname=f"host{i}")
        except Exception as exc:
            result = exc
        finally:
            connection.close()
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=host, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    winners = [o for o in outcomes if isinstance(o, tuple)]
    losers = [o for o in outcomes if not isinstance(o, tuple)]
    assert len(winners) == 1
    assert len(losers) == 7
    assert all(isinstance(o, PolicyDenied) for o in losers), losers
    assert Machine.objects.count() == 1
    assert EnrollmentToken.objects.get().machine == winners[0][0]


def test_agents_me_answers_only_a_valid_machine_credential(lab: Lab, owner: Any) -> None:
    from accounts.services import api_token_create

    _, token = enrollment_token_create(lab=lab)
    body = enroll(token).json()
    client = Client()

    ok = client.get("/api/agents/me", HTTP_AUTHORIZATION=f"Bearer {body['credential']}")
    assert ok.status_code == 200, ok.content
    assert ok.json()["machine_id"] == body["machine_id"] and ok.json()["lab"] == "Physics 101"
    # No credential, a wrong one, a person's API token: 401 with a JSON detail.
    _, personal = api_token_create(user=owner)
    for header in ({}, {"HTTP_AUTHORIZATION": "Bearer nxm_wrong"},
                   {"HTTP_AUTHORIZATION": f"Bearer {personal}"}):  # fmt: skip
        refused = client.get("/api/agents/me", **header)
        assert refused.status_code == 401 and "detail" in refused.json()
    machine_revoke_credential(machine=Machine.objects.get(pk=body["machine_id"]), actor=None)
    revoked = client.get("/api/agents/me", HTTP_AUTHORIZATION=f"Bearer {body['credential']}")
    assert revoked.status_code == 401


KEY = "ab" * 32  # what the agent sends: a sha256 of the host's machine id
OTHER_KEY = "cd" * 32


def test_a_lab_token_for_imaging_works_its_number_of_times_then_never(lab: Lab) -> None:
    token, clear = enrollment_token_create(lab=lab, uses=3, ttl_hours=2)
    names = [machine_enroll(token=clear, hostname=f"pc{i:02}")[0].name for i in range(3)]
    assert names == ["pc00", "pc01", "pc02"]
    with pytest.raises(PolicyDenied, match="already used or expired"):
        machine_enroll(token=clear, hostname="pc03")  # the attack: a fourth use
    token.refresh_from_db()
    assert (token.uses, token.max_uses) == (3, 3)
    assert Machine.objects.count() == 3


def test_a_multi_use_token_expires_like_any_other(lab: Lab) -> None:
    _, clear = enrollment_token_create(lab=lab, uses=40, ttl_hours=1)
    machine_enroll(token=clear, hostname="early")
    with time_machine.travel(timezone.now() + dt.timedelta(hours=1, seconds=1)):
        with pytest.raises(PolicyDenied):
            machine_enroll(token=clear, hostname="late")
    assert Machine.objects.count() == 1


@pytest.mark.parametrize("uses", [0, -1, 10001])
def test_a_token_needs_a_sensible_number_of_uses(lab: Lab, uses: int) -> None:
    with pytest.raises(BadRequest):
        enrollment_token_create(lab=lab, uses=uses)


def test_a_reimaged_pc_takes_back_its_machine_record_when_staff_allow_it(lab: Lab) -> None:
    _, first = enrollment_token_create(lab=lab)
    machine, old_credential = machine_enroll(token=first, hostname="pc01", machine_key=KEY)
    _, again = enrollment_token_create(lab=lab, reclaim=True)
    back, new_credential = machine_enroll(
        token=again, hostname="pc01", machine_key=KEY, agent_version="0.2.0"
    )
    assert back.pk == machine.pk and back.name == "pc01"
    assert Machine.objects.count() == 1, "no duplicate pc01-2"
    assert back.agent_version == "0.2.0"
    # The old image's credential stops working; the new one works.
    assert machine_authenticate(old_credential) is None
    assert machine_authenticate(new_credential) == machine
    assert MachineEvent.objects.filter(machine=machine, message__startswith="re-enrolled").exists()
    # The raw key is never stored, and the stored one is bound to the lab.
    stored = Machine.objects.get().host_key
    assert stored and KEY not in stored


def test_without_permission_a_reimaged_pc_is_a_new_machine(lab: Lab) -> None:
    _, first = enrollment_token_create(lab=lab)
    machine, _ = machine_enroll(token=first, hostname="pc01", machine_key=KEY)
    _, plain = enrollment_token_create(lab=lab)  # reclaim not allowed
    other, _ = machine_enroll(token=plain, hostname="pc01", machine_key=KEY)
    assert other.pk != machine.pk and other.name == "pc01-2"


def test_a_machine_key_never_takes_a_record_of_another_lab_or_host(lab: Lab) -> None:
    _, first = enrollment_token_create(lab=lab)
    machine, credential = machine_enroll(token=first, hostname="pc01", machine_key=KEY)
    elsewhere = lab_get_or_create(name="Chemistry")
    _, there = enrollment_token_create(lab=elsewhere, reclaim=True)
    other_lab, _ = machine_enroll(token=there, hostname="pc01", machine_key=KEY)
    _, here = enrollment_token_create(lab=lab, reclaim=True)
    other_host, _ = machine_enroll(token=here, hostname="pc01", machine_key=OTHER_KEY)
    assert machine.pk not in (other_lab.pk, other_host.pk)
    assert machine_authenticate(credential) == machine, "the original keeps its credential"


@pytest.mark.parametrize("key", ["AB" * 32, "ab" * 31, "zz" * 32, "ab" * 32 + "\x00"])
def test_a_malformed_machine_key_is_refused(lab: Lab, key: str) -> None:
    _, clear = enrollment_token_create(lab=lab, reclaim=True)
    response = enroll(clear, machine_key=key)
    assert response.status_code == 400, response.content
    assert "detail" in response.json()
    assert Machine.objects.count() == 0


def test_the_enroll_api_takes_the_machine_key(lab: Lab) -> None:
    _, first = enrollment_token_create(lab=lab)
    assert enroll(first, machine_key=KEY).status_code == 201
    _, again = enrollment_token_create(lab=lab, reclaim=True)
    second = enroll(again, machine_key=KEY)
    assert second.status_code == 201
    assert second.json()["machine_id"] == Machine.objects.get().pk


@pytest.mark.django_db(transaction=True)
def test_hosts_racing_for_a_multi_use_token_get_exactly_its_uses() -> None:
    lab = lab_get_or_create(name="Imaging lab")
    _, token = enrollment_token_create(lab=lab, uses=3)
    barrier = threading.Barrier(8)
    outcomes: list[Any] = []
    lock = threading.Lock()

    def host(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            result: Any = machine_enroll(token=token, hostname=f"host{i}")
        except Exception as exc:
            result = exc
        finally:
            connection.close()
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=host, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [o for o in outcomes if isinstance(o, tuple)]
    assert len(winners) == 3
    assert all(isinstance(o, PolicyDenied) for o in outcomes if not isinstance(o, tuple))
    assert Machine.objects.count() == 3
    assert EnrollmentToken.objects.get().uses == 3
