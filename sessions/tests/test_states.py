"""The session state machine: the ALLOWED table, the conditional UPDATE and its event rows."""

from __future__ import annotations

import itertools
import threading

import pytest
from django.db import connection

from accounts.models import User
from sessions.models import ComputeSession, SessionEvent
from sessions.occupancy import transition
from sessions.states import ALLOWED, LIVE, TERMINAL, SessionState, is_allowed
from tests.factories import SessionFactory

ALLOWED_PAIRS = [(old, new) for old, targets in ALLOWED.items() for new in sorted(targets)]
FORBIDDEN_PAIRS = [
    (old, new)
    for old, new in itertools.product(SessionState, SessionState)
    if new not in ALLOWED[old]
]


def _ids(pair: tuple[SessionState, SessionState]) -> str:
    return f"{pair[0].value}->{pair[1].value}"


def test_the_table_covers_every_state_and_terminal_states_lead_nowhere() -> None:
    assert set(ALLOWED) == set(SessionState)
    assert len(ALLOWED_PAIRS) + len(FORBIDDEN_PAIRS) == 36
    for state in TERMINAL:
        assert ALLOWED[state] == frozenset()
    assert frozenset(SessionState) - TERMINAL == LIVE


def test_is_allowed_refuses_unknown_state_names() -> None:
    assert not is_allowed("requested", "nonsense")
    assert not is_allowed("nonsense", "ended")


@pytest.mark.django_db
@pytest.mark.parametrize(("old", "new"), ALLOWED_PAIRS, ids=[_ids(p) for p in ALLOWED_PAIRS])
def test_it_makes_every_allowed_transition_and_records_it(
    old: SessionState, new: SessionState, staff: User
) -> None:
    session = SessionFactory(state=old)

    assert transition(session, new, reason="admin", message="because", actor=staff) is True

    assert session.state == new
    session.refresh_from_db()
    assert session.state == new
    event = SessionEvent.objects.get(session=session)
    assert (event.kind, event.from_state, event.to_state) == ("state", old.value, new.value)
    assert (event.reason, event.message, event.actor) == ("admin", "because", staff)


@pytest.mark.django_db
def test_it_writes_extra_fields_with_the_transition_and_a_plain_message_by_default() -> None:
    session = SessionFactory(state=SessionState.RUNNING, jupyter_url="http://x/lab")

    assert transition(
        session, SessionState.STOPPING, reason="idle", end_reason="idle", jupyter_url=""
    )

    session.refresh_from_db()
    assert (session.end_reason, session.jupyter_url) == ("idle", "")
    event = session.events.get()
    assert event.message == "The session was idle for too long."
    assert event.actor is None


@pytest.mark.django_db
@pytest.mark.parametrize(("old", "new"), FORBIDDEN_PAIRS, ids=[_ids(p) for p in FORBIDDEN_PAIRS])
def test_it_refuses_every_other_transition_and_changes_nothing(
    old: SessionState, new: SessionState
) -> None:
    session = SessionFactory(state=old)

    with pytest.raises(ValueError, match="not allowed"):
        transition(session, new, end_reason="user")

    assert session.state == old
    session.refresh_from_db()
    assert (session.state, session.end_reason) == (old, "")
    assert not SessionEvent.objects.filter(session=session).exists()


@pytest.mark.django_db
def test_it_returns_false_when_the_row_moved_under_a_stale_copy() -> None:
    session = SessionFactory(state=SessionState.REQUESTED)
    stale = ComputeSession.objects.get(pk=session.pk)
    assert transition(session, SessionState.STARTING)

    assert transition(stale, SessionState.FAILED, end_reason="start_failed") is False

    assert stale.state == SessionState.REQUESTED  # the loser's copy is left as it was
    session.refresh_from_db()
    assert (session.state, session.end_reason) == (SessionState.STARTING, "")
    assert session.events.count() == 1


def _race(session_pk: int, to: SessionState, threads: int) -> list[bool | BaseException]:
    barrier = threading.Barrier(threads)
    results: list[bool | BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            mine = ComputeSession.objects.get(pk=session_pk)  # each thread its own fresh copy
            barrier.wait(timeout=30)
            won: bool | BaseException = transition(mine, to, reason="user", end_reason="user")
        except BaseException as exc:  # reported to the test thread below
            won = exc
        finally:
            connection.close()
        with lock:
            results.append(won)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in pool)
    return results


@pytest.mark.django_db(transaction=True)
def test_exactly_one_of_ten_concurrent_transitions_wins() -> None:
    session = SessionFactory(state=SessionState.RUNNING)

    results = _race(session.pk, SessionState.STOPPING, threads=10)

    assert sorted(map(repr, results)) == sorted(["True"] + ["False"] * 9)
    session.refresh_from_db()
    assert session.state == SessionState.STOPPING
    assert SessionEvent.objects.filter(session=session, to_state="stopping").count() == 1


@pytest.mark.django_db(transaction=True)
def test_exactly_one_of_racing_stop_and_end_wins_from_starting() -> None:
    session = SessionFactory(state=SessionState.STARTING)
    barrier = threading.Barrier(2)
    outcome: dict[str, bool | BaseException] = {}

    def worker(to: SessionState) -> None:
        try:
            mine = ComputeSession.objects.get(pk=session.pk)
            barrier.wait(timeout=30)
            outcome[to.value] = transition(mine, to, reason="agent_lost")
        except BaseException as exc:
            outcome[to.value] = exc
        finally:
            connection.close()

    pool = [
        threading.Thread(target=worker, args=(to,))
        for to in (SessionState.RUNNING, SessionState.FAILED)
    ]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)

    assert sorted(map(repr, outcome.values())) == ["False", "True"]
    session.refresh_from_db()
    winner = next(k for k, v in outcome.items() if v is True)
    assert session.state == winner
    assert list(session.events.values_list("to_state", flat=True)) == [winner]
