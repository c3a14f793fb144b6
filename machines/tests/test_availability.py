"""When is a lab open? ``availability.open_until`` over windows, closures and time zones."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest
from django.core.exceptions import ValidationError

from machines import availability
from machines.models import AvailabilityWindow, ClosedDate, Lab
from tests.factories import LabFactory

pytestmark = pytest.mark.django_db

UTC = dt.UTC
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
MON, TUE, SAT, SUN = 0, 1, 5, 6
MONDAY = dt.date(2026, 3, 2)  # a Monday; Europe/Berlin is on CET (UTC+1) then


def at(day: dt.date, hh: int, mm: int = 0, tz: dt.tzinfo = UTC) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hh, mm), tz)


def window(lab: Lab, weekday: int, start: str, end: str) -> AvailabilityWindow:
    return AvailabilityWindow.objects.create(
        lab=lab, weekday=weekday, start=dt.time.fromisoformat(start), end=dt.time.fromisoformat(end)
    )


def fresh(lab: Lab) -> Lab:
    """The lab as allocation loads it (windows and closures prefetched)."""
    return Lab.objects.prefetch_related("windows", "closed_dates").get(pk=lab.pk)


def test_a_lab_without_windows_is_always_open_for_the_horizon() -> None:
    lab = LabFactory()
    now = at(MONDAY, 10, 30)

    until = availability.open_until(fresh(lab), now)

    assert until is not None
    assert until - now >= dt.timedelta(days=7)
    assert availability.is_open(fresh(lab), now)


def test_it_is_open_inside_a_weekday_window_until_its_end() -> None:
    lab = LabFactory()
    window(lab, MON, "09:00", "17:00")

    assert availability.open_until(fresh(lab), at(MONDAY, 9)) == at(MONDAY, 17)
    assert availability.open_until(fresh(lab), at(MONDAY, 16, 59)) == at(MONDAY, 17)


@pytest.mark.parametrize(
    "moment",
    [
        at(MONDAY, 8, 59),  # before the window
        at(MONDAY, 17),  # the end is exclusive
        at(MONDAY + dt.timedelta(days=1), 10),  # another weekday has no window
        at(MONDAY - dt.timedelta(days=7), 8),  # last week, before hours
    ],
)
def test_it_is_closed_outside_the_windows(moment: dt.datetime) -> None:
    lab = LabFactory()
    window(lab, MON, "09:00", "17:00")

    assert availability.open_until(fresh(lab), moment) is None
    assert not availability.is_open(fresh(lab), moment)


def test_it_is_closed_on_a_closed_date_even_inside_a_window() -> None:
    lab = LabFactory()
    window(lab, MON, "09:00", "17:00")
    ClosedDate.objects.create(lab=lab, date=MONDAY, reason="holiday")

    assert availability.open_until(fresh(lab), at(MONDAY, 10)) is None
    # The next Monday is open again.
    next_monday = MONDAY + dt.timedelta(days=7)
    assert availability.open_until(fresh(lab), at(next_monday, 10)) == at(next_monday, 17)


def test_a_closed_date_cuts_short_a_lab_without_windows() -> None:
    lab = LabFactory()
    ClosedDate.objects.create(lab=lab, date=MONDAY + dt.timedelta(days=2))

    assert availability.open_until(fresh(lab), at(MONDAY, 10)) == at(
        MONDAY + dt.timedelta(days=2), 0
    )
    assert availability.open_until(fresh(lab), at(MONDAY + dt.timedelta(days=2), 10)) is None


def test_an_end_of_midnight_means_the_end_of_the_day() -> None:
    lab = LabFactory()
    window(lab, MON, "18:00", "00:00")

    assert availability.open_until(fresh(lab), at(MONDAY, 23, 59)) == at(
        MONDAY + dt.timedelta(days=1), 0
    )
    assert availability.open_until(fresh(lab), at(MONDAY, 17)) is None


def test_it_merges_adjacent_and_overlapping_windows() -> None:
    lab = LabFactory()
    window(lab, MON, "09:00", "12:00")
    window(lab, MON, "12:00", "14:00")
    window(lab, MON, "13:00", "15:00")  # overlaps the one before
    window(lab, MON, "16:00", "17:00")  # after a gap: not merged

    assert availability.open_until(fresh(lab), at(MONDAY, 10)) == at(MONDAY, 15)
    assert availability.open_until(fresh(lab), at(MONDAY, 12)) == at(MONDAY, 15)
    assert availability.open_until(fresh(lab), at(MONDAY, 15, 30)) is None
    assert availability.open_until(fresh(lab), at(MONDAY, 16, 30)) == at(MONDAY, 17)


def test_it_merges_windows_across_midnight() -> None:
    lab = LabFactory()
    window(lab, MON, "20:00", "00:00")
    window(lab, TUE, "00:00", "08:00")

    assert availability.open_until(fresh(lab), at(MONDAY, 21)) == at(
        MONDAY + dt.timedelta(days=1), 8
    )
    # Asked after midnight, the opening that began the day before still counts.
    assert availability.open_until(fresh(lab), at(MONDAY + dt.timedelta(days=1), 1)) == at(
        MONDAY + dt.timedelta(days=1), 8
    )


def test_it_reads_windows_in_the_labs_time_zone() -> None:
    lab = LabFactory(timezone="Europe/Berlin")
    window(lab, MON, "09:00", "17:00")

    # Winter (CET, UTC+1): 09:00-17:00 local is 08:00-16:00 UTC.
    assert availability.open_until(fresh(lab), at(MONDAY, 7, 59)) is None
    assert availability.open_until(fresh(lab), at(MONDAY, 8, 30)) == at(MONDAY, 16)
    # Summer (CEST, UTC+2): 07:00-15:00 UTC.
    july = dt.date(2026, 7, 6)
    assert availability.open_until(fresh(lab), at(july, 7, 30)) == at(july, 15)
    assert availability.open_until(fresh(lab), at(july, 15, 30)) is None


def test_it_counts_the_short_day_when_the_clocks_go_forward() -> None:
    lab = LabFactory(timezone="Europe/Berlin")
    window(lab, SAT, "20:00", "00:00")
    window(lab, SUN, "00:00", "00:00")  # all of Sunday 29 March 2026, which has 23 hours
    sunday = dt.date(2026, 3, 29)

    until = availability.open_until(fresh(lab), at(sunday, 0, 30, BERLIN))

    assert until is not None
    # Monday 00:00 CEST is Sunday 22:00 UTC; Saturday 20:00 CET was 19:00 UTC.
    assert until.astimezone(UTC) == dt.datetime(2026, 3, 29, 22, 0, tzinfo=UTC)
    saturday_evening = dt.datetime(2026, 3, 28, 19, 0, tzinfo=UTC)
    assert availability.open_until(fresh(lab), saturday_evening) == until
    assert until - saturday_evening == dt.timedelta(hours=27)


def test_it_counts_the_long_day_when_the_clocks_go_back() -> None:
    lab = LabFactory(timezone="Europe/Berlin")
    window(lab, SUN, "00:00", "00:00")  # Sunday 25 October 2026 has 25 hours
    sunday = dt.date(2026, 10, 25)
    start = at(sunday, 0, 0, BERLIN)

    until = availability.open_until(fresh(lab), start)

    assert until is not None
    assert until.astimezone(UTC) == dt.datetime(2026, 10, 25, 23, 0, tzinfo=UTC)
    # (Aware datetimes in one zone subtract as wall times; convert to count real hours.)
    assert until.astimezone(UTC) - start.astimezone(UTC) == dt.timedelta(hours=25)


def test_a_window_must_end_after_it_starts_unless_it_ends_at_midnight() -> None:
    lab = LabFactory()
    with pytest.raises(ValidationError):
        AvailabilityWindow(lab=lab, weekday=MON, start=dt.time(17), end=dt.time(9)).clean()
    AvailabilityWindow(lab=lab, weekday=MON, start=dt.time(17), end=dt.time(0)).clean()
