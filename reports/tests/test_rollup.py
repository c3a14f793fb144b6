"""The nightly rollup (``reports.rollup``): a report added up from stored days gives exactly the
figures of the same report computed live, on a generated history full of the hard cases
(sessions across local midnight, both DST changes in two time zones, availability windows and
a closed day, owner presence, machines offline for a day and more, a machine appearing in the
middle of the period, a session still running), and it stays exact when late data arrives or
the lab changes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from machines.models import AvailabilityWindow, ClosedDate, Lab, Machine, MachineStatus
from reports.figures import days_of, report, stored_days
from reports.models import LabDayRollup
from reports.rollup import rollup
from reports.tests.history import EXPECTED, EXPECTED_DAYS, EXPECTED_MACHINES, FIRST, LAST, build
from reports.tests.history import NOW as HAND_NOW
from sessions.models import ComputeSession, UnmetRequest
from sessions.states import EndReason, SessionState
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

UTC = dt.UTC
NOW = dt.datetime(2026, 11, 6, 15, 0, tzinfo=UTC)
# Two stretches of history: March (US DST starts on the 8th, the EU's on the 29th) and
# October-November (the EU's ends on 25 October, the US's on 1 November).
SPANS = [(dt.date(2026, 3, 1), dt.date(2026, 4, 6)), (dt.date(2026, 10, 20), dt.date(2026, 11, 6))]
REASONS = [r.value for r in EndReason]


def _insert_events(rows: list[tuple[int, dt.datetime, str, str, str]]) -> None:
    with connection.cursor() as cur:
        cur.executemany(
            "INSERT INTO machines_machineevent (machine_id, at, kind, from_status, to_status,"
            " message) VALUES (%s, %s, %s, %s, %s, '')",
            rows,
        )


def _session(
    machine: Machine,
    owner: User,
    created: dt.datetime,
    minutes: float,
    rng: random.Random,
    *,
    live: bool = False,
) -> ComputeSession:
    failed = rng.random() < 0.1
    started = None if failed else created + dt.timedelta(seconds=rng.uniform(5, 120))
    ended = created + dt.timedelta(minutes=minutes)
    activity = (
        None if started is None else started + (ended - started) * rng.uniform(-0.1, 1.0)
    )  # sometimes before ready: no use at all
    s = ComputeSession.objects.create(
        owner=owner,
        machine=machine,
        state=SessionState.RUNNING if live else SessionState.ENDED,
        end_reason="" if live else (EndReason.START_FAILED if failed else rng.choice(REASONS)),
        duration_minutes=600,
        expires_at=created + dt.timedelta(hours=10),
        started_at=started,
        ended_at=None if live else ended,
        last_activity=activity,
        cleanup_verified=None if live or failed else rng.random() > 0.2,
        cleanup_finished_at=None if live else ended + dt.timedelta(minutes=rng.uniform(0, 90)),
    )
    ComputeSession.objects.filter(pk=s.pk).update(created_at=created)
    return s


def generate(seed: int = 14) -> tuple[Lab, Lab]:
    rng = random.Random(seed)
    users = [UserFactory.create(username=f"u{n}") for n in range(6)]
    groups = [Group.objects.create(name=f"g{n}") for n in range(3)]
    for n, user in enumerate(users):
        user.groups.add(groups[n % 3], groups[(n + 1) % 3])
    berlin = Lab.objects.create(name="Berlin", timezone="Europe/Berlin")
    for day in range(5):
        AvailabilityWindow.objects.create(
            lab=berlin, weekday=day, start=dt.time(8), end=dt.time(20)
        )
    AvailabilityWindow.objects.create(lab=berlin, weekday=5, start=dt.time(20), end=dt.time(0))
    AvailabilityWindow.objects.create(lab=berlin, weekday=6, start=dt.time(0), end=dt.time(4))
    ClosedDate.objects.create(lab=berlin, date=dt.date(2026, 3, 16))
    new_york = Lab.objects.create(name="New York", timezone="America/New_York")  # always open
    machines = []
    for lab in (berlin, new_york):
        for n in range(4):
            machines.append(
                Machine.objects.create(name=f"{lab.name}-{n}", lab=lab, status="available")
            )
    Machine.objects.update(created_at=dt.datetime(2026, 2, 1, tzinfo=UTC))
    # One machine enrolled in the middle of March, mid-day.
    late = Machine.objects.create(name="Berlin-late", lab=berlin, status="available")
    Machine.objects.filter(pk=late.pk).update(
        created_at=dt.datetime(2026, 3, 20, 11, 17, tzinfo=UTC)
    )
    machines = list(Machine.objects.order_by("pk"))

    for machine in machines:
        changes: list[tuple[dt.datetime, str, str]] = [
            (machine.created_at + dt.timedelta(minutes=1), "online", "available")
        ]
        for first, last in SPANS:
            for day in days_of(first, last):
                midnight = dt.datetime.combine(day, dt.time(0), UTC)
                if midnight < machine.created_at:
                    continue
                at = midnight + dt.timedelta(hours=rng.uniform(0, 24))
                pick = rng.random()
                if pick < 0.12:  # offline for hours, sometimes more than a day
                    back = at + dt.timedelta(hours=rng.uniform(1, 40))
                    changes += [(at, "offline", "offline"), (back, "online", "available")]
                elif pick < 0.25:  # the owner at the keyboard
                    gone = at + dt.timedelta(hours=rng.uniform(0.2, 6))
                    changes += [
                        (at, "owner_present", ""),
                        (at, "presence", "owner_present"),
                        (gone, "owner_left", ""),
                        (gone, "presence", "available"),
                    ]
                elif pick < 0.28:
                    back = at + dt.timedelta(hours=rng.uniform(1, 30))
                    changes += [(at, "maintenance", "maintenance"), (back, "enable", "available")]
                for _ in range(rng.choice([0, 1, 1, 2])):
                    created = midnight + dt.timedelta(hours=rng.uniform(0, 24))
                    minutes = rng.choice([rng.uniform(1, 90), rng.uniform(60, 600)])
                    s = _session(machine, rng.choice(users), created, minutes, rng)
                    assert s.ended_at is not None
                    changes += [
                        (created, "reserved", "reserved"),
                        (created + dt.timedelta(seconds=30), "status", "busy"),
                        (s.ended_at, "status", "cleaning"),
                        (s.ended_at + dt.timedelta(seconds=40), "status", "available"),
                    ]
                if rng.random() < 0.3:
                    UnmetRequest.objects.create(
                        user=rng.choice(users),
                        at=midnight + dt.timedelta(hours=rng.uniform(0, 24)),
                        lab=machine.lab,
                    )
        # A consistent history: each change starts from the status the one before left.
        rows, status = [], MachineStatus.OFFLINE.value
        for at, kind, to in sorted(changes, key=lambda c: c[0]):
            rows.append((machine.pk, at, kind, status, to))
            status = to or status
        _insert_events(rows)
    # Still running at NOW, since the evening before (its days are not final).
    _session(machines[5], users[0], dt.datetime(2026, 11, 5, 20, 0, tzinfo=UTC), 0, rng, live=True)
    ComputeSession.objects.filter(ended_at__isnull=True).update(
        last_activity=NOW - dt.timedelta(minutes=3)
    )
    return berlin, new_york


def figures(rep: Any) -> dict[str, Any]:
    """Everything a report shows (every lab's every figure, the weekly quota table)."""
    return {
        "labs": [dataclasses.asdict(lab) for lab in rep.labs],
        "json": rep.as_json(),
        "weekly": rep.weekly_quota,
    }


PERIODS = [
    (dt.date(2026, 3, 1), dt.date(2026, 4, 6)),
    (dt.date(2026, 3, 8), dt.date(2026, 3, 8)),  # US spring forward (23 h)
    (dt.date(2026, 3, 29), dt.date(2026, 3, 29)),  # EU spring forward
    (dt.date(2026, 3, 15), dt.date(2026, 3, 21)),  # the closed day, the machine appearing
    (dt.date(2026, 10, 25), dt.date(2026, 10, 25)),  # EU fall back (25 h)
    (dt.date(2026, 11, 1), dt.date(2026, 11, 1)),  # US fall back
    (dt.date(2026, 10, 20), dt.date(2026, 11, 6)),  # up to NOW, a session still running
    (dt.date(2026, 2, 1), dt.date(2026, 11, 30)),  # everything, days after NOW too
]


@pytest.fixture
def history() -> tuple[Lab, Lab]:
    return generate()


def test_a_report_from_rollups_has_exactly_the_live_figures(history: tuple[Lab, Lab]) -> None:
    stored = rollup(now=NOW)
    assert stored == LabDayRollup.objects.count() > 300
    berlin, new_york = history
    # The days a running session crosses are not final: not stored, computed live.
    assert not LabDayRollup.objects.filter(lab=new_york, day__gte=dt.date(2026, 11, 5)).exists()
    assert LabDayRollup.objects.filter(lab=new_york, day=dt.date(2026, 11, 4)).exists()
    assert not LabDayRollup.objects.filter(lab=berlin, day=dt.date(2026, 11, 6)).exists()  # today
    for first, last in PERIODS:
        for lab in (None, "Berlin", "New York"):
            live = report(first, last, lab=lab, now=NOW, rollups=False)
            rolled = report(first, last, lab=lab, now=NOW)
            assert figures(rolled) == figures(live), (first, last, lab)
    # The rollup path really read the stored days: a whole past month of both labs runs no
    # session or status query at all (the API's answer, without the weekly quota table).
    first, last = dt.date(2026, 3, 1), dt.date(2026, 3, 31)
    assert {
        len(v) for v in stored_days([berlin, new_york], first, last, now=NOW).days.values()
    } == {31}
    with CaptureQueriesContext(connection) as queries:
        rolled = report(first, last, now=NOW, detail=False)
    sql = " ".join(q["sql"] for q in queries.captured_queries)
    assert "compute_sessions_computesession" not in sql
    assert "machines_machineevent" not in sql
    live = report(first, last, now=NOW, detail=False, rollups=False)
    assert figures(rolled) == figures(live)
    assert rolled.labs[0].hours_available > 0 and rolled.labs[1].sessions > 0


def test_stored_days_added_up_in_python_give_the_same_figures(
    history: tuple[Lab, Lab], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without PostgreSQL's sums (SQLite, the development default) Python adds the days."""
    from reports import figures as module

    rollup(now=NOW)
    first, last = dt.date(2026, 3, 1), dt.date(2026, 4, 6)
    in_database = figures(report(first, last, now=NOW))
    monkeypatch.setattr(module, "_sums_in_database", lambda: False)
    assert len(stored_days(list(history), first, last, now=NOW).days[history[0].pk]) == 37
    assert figures(report(first, last, now=NOW)) == in_database
    assert in_database == figures(report(first, last, now=NOW, rollups=False))


def test_the_rollup_is_idempotent(history: tuple[Lab, Lab]) -> None:
    rollup(now=NOW)
    before = {(r.lab_id, r.day): r.parts for r in LabDayRollup.objects.all()}
    # A second run recomputes the recent days only (the older ones are all there)...
    assert 0 < rollup(now=NOW) < len(before)
    # ...and recomputing every day again, by dates, writes the same rows over themselves.
    # (Berlin's 31 January, before its machines, is stored too when asked for by date.)
    assert rollup(now=NOW, first=dt.date(2026, 1, 31), last=dt.date(2026, 11, 6)) == len(before) + 1
    after = {(r.lab_id, r.day): r.parts for r in LabDayRollup.objects.all()}
    assert {key: after[key] for key in before} == before


def test_late_data_is_picked_up_by_the_next_run(history: tuple[Lab, Lab]) -> None:
    berlin, _ = history
    rollup(now=NOW)
    first, last = dt.date(2026, 10, 20), dt.date(2026, 11, 6)
    machine = Machine.objects.get(name="Berlin-1")
    user = User.objects.get(username="u1")
    # A session of two days ago recorded late (an agent's receipt after a reconnect).
    _session(machine, user, dt.datetime(2026, 11, 3, 22, 30, tzinfo=UTC), 120, random.Random(1))
    live = figures(report(first, last, lab="Berlin", now=NOW, rollups=False))
    # The attack worked: the stored days are stale until the next run...
    assert figures(report(first, last, lab="Berlin", now=NOW)) != live
    rollup(now=NOW)  # ...which recomputes the recent days.
    assert figures(report(first, last, lab="Berlin", now=NOW)) == live

    # Older history corrected: recomputed when asked for those days.
    _session(machine, user, dt.datetime(2026, 10, 21, 9, 0, tzinfo=UTC), 30, random.Random(2))
    live = figures(report(first, last, lab="Berlin", now=NOW, rollups=False))
    assert figures(report(first, last, lab="Berlin", now=NOW)) != live
    rollup(now=NOW, lab_ids=[berlin.pk], first=dt.date(2026, 10, 21), last=dt.date(2026, 10, 21))
    assert figures(report(first, last, lab="Berlin", now=NOW)) == live


def test_the_running_session_s_days_are_rolled_up_once_it_ends(history: tuple[Lab, Lab]) -> None:
    _, new_york = history
    rollup(now=NOW)
    later = NOW + dt.timedelta(days=1)
    ComputeSession.objects.filter(ended_at__isnull=True).update(
        state=SessionState.ENDED, end_reason=EndReason.USER, ended_at=NOW, last_activity=NOW
    )
    rollup(now=later)
    assert LabDayRollup.objects.filter(lab=new_york, day=dt.date(2026, 11, 5)).exists()
    first, last = dt.date(2026, 11, 1), dt.date(2026, 11, 7)
    assert figures(report(first, last, now=later)) == figures(
        report(first, last, now=later, rollups=False)
    )


@pytest.mark.parametrize("change", ["windows", "closed", "timezone", "machine", "moved"])
def test_stored_days_of_a_changed_lab_are_not_used(history: tuple[Lab, Lab], change: str) -> None:
    berlin, new_york = history
    rollup(now=NOW)
    first, last = dt.date(2026, 3, 1), dt.date(2026, 4, 6)
    before = figures(report(first, last, now=NOW, rollups=False))
    if change == "windows":
        AvailabilityWindow.objects.filter(lab=berlin, weekday=2).update(start=dt.time(10))
    elif change == "closed":
        ClosedDate.objects.create(lab=berlin, date=dt.date(2026, 3, 18))
    elif change == "timezone":
        Lab.objects.filter(pk=new_york.pk).update(timezone="America/Chicago")
    elif change == "machine":  # enrolled now, but its history says it was there before
        m = Machine.objects.create(name="Berlin-9", lab=berlin, status="available")
        Machine.objects.filter(pk=m.pk).update(created_at=dt.datetime(2026, 1, 1, tzinfo=UTC))
    else:
        Machine.objects.filter(name="New York-2").update(lab=berlin)
    live = figures(report(first, last, now=NOW, rollups=False))
    assert live != before  # the change changes the figures...
    assert figures(report(first, last, now=NOW)) == live  # ...and the rollup path follows


def test_the_hand_computed_history_through_rollups(owner: User, other: User) -> None:
    lab = build(owner, other)
    assert rollup(now=HAND_NOW) > 0
    assert set(stored_days([lab], FIRST, LAST, now=HAND_NOW).days[lab.pk]) == set(
        days_of(FIRST, LAST)
    )
    rep = report(FIRST, LAST, now=HAND_NOW)
    physics = next(f for f in rep.labs if f.lab == "Physics")
    assert physics.summary() == EXPECTED
    assert [
        (d["date"].isoformat(), d["hours_available"], d["hours_leased"], d["hours_used"])
        for d in physics.days
    ] == EXPECTED_DAYS
    assert [
        (m.name, m.hours_available, m.hours_leased, m.hours_used, m.sessions, m.wipe_failures)
        for m in physics.machines
    ] == EXPECTED_MACHINES


def test_the_beat_runs_the_rollup_task(history: tuple[Lab, Lab]) -> None:
    from django.conf import settings

    from reports.tasks import rollup_reports

    tasks = {row["task"] for row in settings.CELERY_BEAT_SCHEDULE.values()}
    assert "reports.tasks.rollup_reports" in tasks
    berlin, _ = history
    assert rollup_reports(lab_ids=[berlin.pk], first="2026-03-01", last="2026-03-31") == 31
    assert set(LabDayRollup.objects.values_list("lab_id", flat=True)) == {berlin.pk}
