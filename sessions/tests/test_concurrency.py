"""Allocation under real concurrency: threads with their own database connections.

PostgreSQL here allows about 100 connections, shared with whatever else runs, so at most
``DB_SLOTS`` threads hold a connection at once; all threads still start together at a barrier
and race for the same machines, which is what the guards must survive.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from django.contrib.auth.hashers import make_password
from django.db import connection
from django.db.models import Count
from django.test import Client

from accounts.models import User
from accounts.services import api_token_create, default_policy
from machines.models import Machine, MachineStatus
from nexcompute.errors import Conflict, PolicyDenied
from sessions.models import ComputeSession
from sessions.services import session_request
from sessions.states import LIVE
from tests.factories import MachineFactory

pytestmark = pytest.mark.django_db(transaction=True)

DB_SLOTS = 40
T = TypeVar("T")


def race(calls: list[Callable[[], T]], slots: int = DB_SLOTS) -> list[T | BaseException]:
    """Run ``calls`` in one thread each, released together; each closes its connection."""
    barrier = threading.Barrier(len(calls))
    gate = threading.BoundedSemaphore(slots)
    results: list[T | BaseException] = [RuntimeError("did not run")] * len(calls)

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            with gate:
                try:
                    results[i] = calls[i]()
                finally:
                    connection.close()
        except BaseException as exc:  # handed to the test thread
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return results


def make_users(n: int, prefix: str) -> list[User]:
    password = make_password(None)  # unusable; hashing 200 passwords would dominate the test
    User.objects.bulk_create(
        [User(username=f"{prefix}{i:03d}", password=password) for i in range(n)]
    )
    return list(User.objects.filter(username__startswith=prefix).order_by("username"))


def assert_one_live_session_per_machine() -> None:
    doubled = (
        ComputeSession.objects.filter(state__in=LIVE)
        .values("machine")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    assert list(doubled) == []


def test_two_hundred_requests_for_twenty_machines_yield_exactly_twenty_sessions() -> None:
    machines = MachineFactory.create_batch(20)
    users = make_users(200, "racer")

    results = race([lambda u=u: session_request(user=u) for u in users])

    won = [r for r in results if isinstance(r, ComputeSession)]
    lost = [r for r in results if not isinstance(r, ComputeSession)]
    assert len(won) == 20, Counter(type(r).__name__ for r in lost)
    assert all(isinstance(r, Conflict) and r.status_code == 409 for r in lost), {
        repr(r) for r in lost if not isinstance(r, Conflict)
    }
    assert len(lost) == 180
    assert ComputeSession.objects.count() == 20
    assert_one_live_session_per_machine()
    assert {s.machine_id for s in won} == {m.pk for m in machines}
    assert set(Machine.objects.values_list("status", flat=True)) == {MachineStatus.RESERVED}
    assert len({s.owner_id for s in won}) == 20


def test_concurrent_requests_through_http_never_double_book() -> None:
    machines = MachineFactory.create_batch(5)
    users = make_users(40, "web")
    clients = [Client(HTTP_AUTHORIZATION=f"Bearer {api_token_create(user=u)[1]}") for u in users]

    def post(client: Client) -> Any:
        return client.post("/api/sessions", {}, content_type="application/json")

    responses = race([lambda c=c: post(c) for c in clients], slots=20)

    codes = Counter(getattr(r, "status_code", repr(r)) for r in responses)
    assert codes == {201: 5, 409: 35}
    for response in responses:
        assert response.json()["detail" if response.status_code == 409 else "state"]
    assert_one_live_session_per_machine()
    assert {s.machine_id for s in ComputeSession.objects.all()} == {m.pk for m in machines}


def test_one_user_racing_themselves_gets_only_their_quota() -> None:
    MachineFactory.create_batch(4)
    policy = default_policy()
    policy.max_concurrent_sessions = 1
    policy.save()
    (user,) = make_users(1, "twin")

    results = race([lambda: session_request(user=user) for _ in range(2)])

    assert sorted(type(r).__name__ for r in results) == ["ComputeSession", "PolicyDenied"]
    denied = next(r for r in results if isinstance(r, PolicyDenied))
    assert denied.status_code == 403
    assert "1 of 1" in denied.detail
    assert ComputeSession.objects.filter(owner=user).count() == 1


def test_one_user_with_a_quota_of_three_racing_ten_times_gets_three() -> None:
    MachineFactory.create_batch(10)
    policy = default_policy()
    policy.max_concurrent_sessions = 3
    policy.save()
    (user,) = make_users(1, "greedy")

    results = race([lambda: session_request(user=user) for _ in range(10)])

    assert Counter(type(r).__name__ for r in results) == {"ComputeSession": 3, "PolicyDenied": 7}
    assert ComputeSession.objects.filter(owner=user, state__in=LIVE).count() == 3
    assert Machine.objects.filter(status=MachineStatus.RESERVED).count() == 3


def _lock_waiters() -> int:
    """Backends of this database waiting for a row lock right now."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int(cursor.fetchone()[0])


def test_a_request_waits_for_a_held_machine_instead_of_being_refused(owner: User) -> None:
    """The only free machine is row-locked by a transaction that then rolls back (a claim that
    failed, a heartbeat write): the request must neither take it while held nor answer 409
    while it may still come free; it waits, then gets it."""
    from tests.procs import wait_for

    default_policy()
    machine = MachineFactory(status=MachineStatus.AVAILABLE)
    held, release = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def holder() -> None:
        try:
            from django.db import transaction

            with transaction.atomic():
                Machine.objects.select_for_update().get(pk=machine.pk)
                held.set()
                release.wait(30)
                transaction.set_rollback(True)
        finally:
            connection.close()

    def requester() -> None:
        try:
            outcome.append(session_request(user=owner))
        except BaseException as exc:
            outcome.append(exc)
        finally:
            connection.close()

    h = threading.Thread(target=holder)
    h.start()
    assert held.wait(10)
    r = threading.Thread(target=requester)
    r.start()
    # The attack is real: the request is blocked on the held row, not answered.
    wait_for(lambda: _lock_waiters() == 1, what="the request waits for the row lock")
    assert outcome == [] and r.is_alive()
    release.set()
    h.join(10)
    r.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ComputeSession), outcome
    assert outcome[0].machine_id == machine.pk
    assert Machine.objects.get(pk=machine.pk).status == MachineStatus.RESERVED


def test_a_refusal_when_nothing_is_free_takes_no_lock(owner: User) -> None:
    """With every machine taken, a request is answered 409 without taking a lock: not even
    its own user row, which another request of the same user holds meanwhile."""
    default_policy()
    MachineFactory(status=MachineStatus.BUSY)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        try:
            from django.db import transaction

            with transaction.atomic():
                # What a granted request holds while it claims: its user row.
                User.objects.select_for_update(no_key=True).get(pk=owner.pk)
                held.set()
                release.wait(30)
        finally:
            connection.close()

    h = threading.Thread(target=holder)
    h.start()
    try:
        assert held.wait(10)
        # The same user's refused request does not queue behind that lock: had it tried, the
        # lock timeout would raise OperationalError instead of the 409.
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")
        try:
            with pytest.raises(Conflict):
                session_request(user=owner)
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
    finally:
        release.set()
        h.join(10)
