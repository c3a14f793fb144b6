"""Every figure of the hand-computed history (reports/tests/history.py) exactly."""

from __future__ import annotations

import datetime as dt

import pytest

from accounts.models import User
from machines.models import Lab
from reports.figures import HOUR, hour_of_week_buckets, lab_figures, report
from reports.tests.history import (
    EXPECTED,
    EXPECTED_DAYS,
    EXPECTED_MACHINES,
    EXPECTED_UNMET_BY_HOUR,
    EXPECTED_USE_BY_HOUR,
    FIRST,
    LAST,
    NOW,
    build,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def lab(owner: User, other: User) -> Lab:
    return build(owner, other)


def test_it_computes_every_lab_figure_exactly(lab: Lab) -> None:
    rep = report(FIRST, LAST, now=NOW)
    physics = next(f for f in rep.labs if f.lab == "Physics")
    assert physics.summary() == EXPECTED
    assert rep.unmet_any_lab == 1


def test_it_splits_hours_by_local_day_across_midnight_and_dst(lab: Lab) -> None:
    fig = lab_figures(Lab.objects.get(name="Physics"), FIRST, LAST, now=NOW)
    got = [
        (d["date"].isoformat(), d["hours_available"], d["hours_leased"], d["hours_used"])
        for d in fig.days
    ]
    assert got == EXPECTED_DAYS


def test_it_computes_each_machine(lab: Lab) -> None:
    fig = lab_figures(Lab.objects.get(name="Physics"), FIRST, LAST, now=NOW)
    got = [
        (m.name, m.hours_available, m.hours_leased, m.hours_used, m.sessions, m.wipe_failures)
        for m in fig.machines
    ]
    assert got == EXPECTED_MACHINES


def test_it_maps_use_and_unmet_demand_to_local_hours_of_week(lab: Lab) -> None:
    fig = lab_figures(Lab.objects.get(name="Physics"), FIRST, LAST, now=NOW)
    used = {
        (d, h): v for d, row in enumerate(fig.used_by_hour_of_week) for h, v in enumerate(row) if v
    }
    assert used == EXPECTED_USE_BY_HOUR
    unmet = {
        (d, h): n for d, row in enumerate(fig.unmet_by_hour_of_week) for h, n in enumerate(row) if n
    }
    assert unmet == EXPECTED_UNMET_BY_HOUR


def test_it_ranks_users_and_groups_by_leased_hours(lab: Lab) -> None:
    fig = lab_figures(Lab.objects.get(name="Physics"), FIRST, LAST, now=NOW)
    assert fig.top_users == [
        {"user": "owner", "hours": 4.7833, "sessions": 2},
        {"user": "other", "hours": 3.0, "sessions": 2},
    ]
    assert fig.top_groups == [
        {"group": "physics", "hours": 7.7833},
        {"group": "chem", "hours": 3.0},
    ]


def test_it_reports_weekly_quota_use(lab: Lab) -> None:
    rep = report(FIRST, LAST, now=NOW)
    assert [(w["week"].isoformat(), w["users"], w["hours"]) for w in rep.weekly_quota] == [
        ("2026-03-23", 2, round(4 + 44 / 60 + 1 + 59 / 60 + 40 / 3600, 4)),
        ("2026-03-30", 1, 0.975),
    ]


def test_a_dst_spring_forward_day_has_23_real_hours() -> None:
    import zoneinfo

    sunday = dt.date(2026, 3, 29)
    buckets = hour_of_week_buckets(sunday, sunday, zoneinfo.ZoneInfo("Europe/Berlin"))
    total = sum(e - s for s, e in zip(buckets.starts, buckets.ends, strict=True))
    assert total == 23 * HOUR
    # 02:00 does not exist that night: its bucket is empty.
    assert buckets.starts[2] == buckets.ends[2]


def test_a_lab_without_windows_is_open_all_day(lab: Lab) -> None:
    chem = Lab.objects.get(name="Chemistry")
    fig = lab_figures(chem, FIRST, LAST, now=NOW)
    assert fig.always_open
    # chem-1 was created "now" (after the period) and has no history: nothing available.
    assert fig.hours_available == 0.0
    assert fig.unmet_requests == 1


def test_weekly_limits_match_policy_for(lab: Lab, owner: User, other: User) -> None:
    from django.contrib.auth.models import Group

    from accounts.models import QuotaPolicy
    from accounts.services import policy_for
    from reports.figures import weekly_limits
    from tests.factories import UserFactory

    QuotaPolicy.objects.create(
        name="physics", group=Group.objects.get(name="physics"), max_hours_per_week=30
    )
    QuotaPolicy.objects.create(
        name="chem", group=Group.objects.get(name="chem"), max_hours_per_week=45
    )
    loner = UserFactory.create(username="loner")
    users = [owner, other, loner]
    assert (
        weekly_limits({u.pk for u in users})
        == {u.pk: policy_for(u).max_hours_per_week for u in users}
        == {owner.pk: 30, other.pk: 45, loner.pk: 20}
    )


def test_a_session_begun_long_before_the_period_still_counts(lab: Lab, owner: User) -> None:
    """The session scan is bounded by the longest lease a policy allows; one that long is in."""
    from machines.models import Machine
    from sessions.models import ComputeSession
    from sessions.states import EndReason, SessionState
    from tests.factories import default_policy_with

    default_policy_with(max_session_minutes=30 * 24 * 60)
    began = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)  # 26 days before the period
    s = ComputeSession.objects.create(
        owner=owner,
        machine=Machine.objects.get(name="pc-b"),
        state=SessionState.ENDED,
        end_reason=EndReason.USER,
        duration_minutes=30 * 24 * 60,
        expires_at=began + dt.timedelta(days=30),
        started_at=began,
        ended_at=dt.datetime(2026, 3, 27, 1, tzinfo=dt.UTC),  # Fri 02:00 local
        last_activity=dt.datetime(2026, 3, 27, 1, tzinfo=dt.UTC),
    )
    ComputeSession.objects.filter(pk=s.pk).update(created_at=began)
    fig = lab_figures(Lab.objects.get(name="Physics"), FIRST, LAST, now=NOW)
    # Fri 00:00 CET (Thu 23:00 UTC) to 01:00 UTC: two more hours leased and used.
    assert fig.hours_leased == round(7.7833 + 2, 4)
    assert fig.hours_used == 6.5 + 2
    rep = report(FIRST, LAST, now=NOW)
    assert next(f for f in rep.labs if f.lab == "Physics").hours_leased == round(7.7833 + 2, 4)
