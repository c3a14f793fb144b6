"""The staff report's figures, added up from what is recorded: session rows, the machines'
status history (``MachineEvent``), lab availability windows and unmet requests.

Definitions (README "Staff reports" says the same to staff):

* **available**: inside the lab's availability windows, the machine online and offered
  (not offline, in maintenance, quarantined or draining idle) and nobody at its keyboard;
* **leased**: from the request to the end of a session (the machine is out of the pool);
* **used**: from Jupyter being ready to the session's last reported activity (the idle tail
  before an idle end, or a session never touched, is not use);
* **reclaimed** = used / available: the share of lendable idle time students really used.

All day, hour and week-day boundaries are the lab's local time; the period ``from``..``to``
is whole local days, both included. Arithmetic is done in UTC (aware datetimes of one zone
subtract as wall-clock times, wrong across a DST change).
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
import statistics
import zoneinfo
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import connection
from django.db.models import (
    BigIntegerField,
    DurationField,
    ExpressionWrapper,
    Func,
    Max,
    OuterRef,
    Q,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce, Greatest, Least
from django.utils import timezone

from accounts.models import EffectivePolicy, QuotaPolicy, User
from accounts.services import default_policy
from machines import availability
from machines.models import Lab, Machine, MachineEvent, MachineStatus
from sessions.models import ComputeSession, UnmetRequest
from sessions.states import EndReason

Interval = tuple[int, int]
"""Whole microseconds since the epoch (UTC), as PostgreSQL keeps them: integer sums are exact
in any order, so a period added up from nightly rollups of its days (``reports.rollup``) gives
the very figures of the same period added up in one pass; a month of a big fleet is ~10^5
intervals, and plain ints, unlike datetimes, keep that cheap."""
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MICROSECOND = dt.timedelta(microseconds=1)
SECOND = 1_000_000
HOUR = 3600 * SECOND
LIVE_KEY = "live"
"""``end_reasons`` key of sessions not ended yet (``unknown``: ended without a reason)."""
UNKNOWN_KEY = "unknown"
END_REASON_KEYS = [r.value for r in EndReason] + [UNKNOWN_KEY, LIVE_KEY]

# Statuses in which a machine is not lendable: what "online and no owner present" leaves out.
NOT_OFFERED = frozenset(
    {
        MachineStatus.OFFLINE,
        MachineStatus.MAINTENANCE,
        MachineStatus.QUARANTINED,
        MachineStatus.OWNER_PRESENT,
        MachineStatus.DRAINING,
    }
)
# Changes between these statuses (a session's reserve/busy/clean churn) do not change
# availability: the query leaves them out, which keeps a month of a big fleet cheap.
_OFFERED_CHURN = [
    MachineStatus.AVAILABLE,
    MachineStatus.RESERVED,
    MachineStatus.BUSY,
    MachineStatus.CLEANING,
]
_PRESENCE = ("owner_present", "owner_left")
MAX_DAYS = 732
# Dates outside these overflow datetime arithmetic at the edges of the calendar.
EARLIEST, LATEST = dt.date(2000, 1, 1), dt.date(2199, 12, 31)


# --- interval arithmetic (sorted, disjoint lists of UTC intervals) -----------------------------


def merge(ivs: Iterable[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(ivs):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def intersect(xs: Sequence[Interval], ys: Sequence[Interval]) -> list[Interval]:
    out: list[Interval] = []
    i = j = 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(xs: Sequence[Interval], ys: Sequence[Interval]) -> list[Interval]:
    out: list[Interval] = []
    j = 0
    for a, b in xs:
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k, cur = j, a
        while k < len(ys) and ys[k][0] < b:
            if ys[k][0] > cur:
                out.append((cur, ys[k][0]))
            cur = max(cur, ys[k][1])
            k += 1
        if cur < b:
            out.append((cur, b))
    return out


class Epoch(Func):
    """A datetime column as whole microseconds since the epoch, computed by the database
    (parsing 10^5 timestamps in Python cost more than the whole rest of the report)."""

    output_field = BigIntegerField()
    arity = 1

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(
            compiler,
            connection,
            template="(EXTRACT(EPOCH FROM %(expressions)s) * 1000000)::int8",
            **extra,
        )

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(
            compiler,
            connection,
            template="CAST(round((julianday(%(expressions)s) - 2440587.5) * 86400000000.0)"
            " AS INTEGER)",
            **extra,
        )


def ts(at: dt.datetime) -> int:
    """``at`` (aware) as whole microseconds since the epoch."""
    return (at - EPOCH) // MICROSECOND


@dataclass(frozen=True)
class Buckets:
    """Consecutive UTC buckets, each with a key (a local day, an hour of the week)."""

    starts: list[int]
    ends: list[int]
    keys: list[Any]

    def key_at(self, at: int) -> Any:
        """The key of the bucket holding ``at`` (which must lie inside the buckets)."""
        return self.keys[bisect.bisect_right(self.ends, at)]

    def pieces(self, a: int, b: int) -> Iterator[tuple[Any, int]]:
        """(key, microseconds) of each bucket ``[a, b)`` overlaps."""
        i = bisect.bisect_right(self.ends, a)
        if i < len(self.ends) and b <= self.ends[i] and a >= self.starts[i]:
            yield self.keys[i], b - a  # the common case: inside one bucket
            return
        while i < len(self.starts) and self.starts[i] < b:
            overlap = min(b, self.ends[i]) - max(a, self.starts[i])
            if overlap > 0:
                yield self.keys[i], overlap
            i += 1


def local_midnight(day: dt.date, tz: zoneinfo.ZoneInfo | dt.timezone) -> int:
    return ts(dt.datetime.combine(day, dt.time(0), tz))


def days_of(first: dt.date, last: dt.date) -> list[dt.date]:
    return [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]


def day_buckets(first: dt.date, last: dt.date, tz: zoneinfo.ZoneInfo) -> Buckets:
    days = days_of(first, last)
    starts = [local_midnight(d, tz) for d in days]
    ends = [*starts[1:], local_midnight(last + dt.timedelta(days=1), tz)]
    return Buckets(starts, ends, days)


def hour_buckets(first: dt.date, last: dt.date, tz: zoneinfo.ZoneInfo) -> Buckets:
    """Local hours keyed (day, hour). A skipped hour (spring forward) is an empty bucket;
    the repeated hour (fall back) is one two-hour bucket of its local hour. Each day's hours
    end at the next local midnight, so every hour lies inside its day."""
    starts: list[int] = []
    keys: list[tuple[dt.date, int]] = []
    for day in days_of(first, last):
        for hour in range(24):
            starts.append(ts(dt.datetime.combine(day, dt.time(hour), tz)))
            keys.append((day, hour))
    end = local_midnight(last + dt.timedelta(days=1), tz)
    ends = [max(s, e) for s, e in zip(starts, [*starts[1:], end], strict=True)]
    return Buckets(starts, ends, keys)


def hour_of_week_buckets(first: dt.date, last: dt.date, tz: zoneinfo.ZoneInfo) -> Buckets:
    """``hour_buckets`` keyed (weekday, hour)."""
    hrs = hour_buckets(first, last, tz)
    return Buckets(hrs.starts, hrs.ends, [(d.weekday(), h) for d, h in hrs.keys])


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least p % at or below it)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def hours(us: float) -> float:
    return round(us / HOUR, 4)


# --- the figures -------------------------------------------------------------------------------


@dataclass
class MachineFigures:
    machine_id: int
    name: str
    hours_available: float = 0.0
    hours_leased: float = 0.0
    hours_used: float = 0.0
    sessions: int = 0
    wipe_failures: int = 0


@dataclass
class LabFigures:
    lab: str
    lab_id: int
    timezone: str
    first: dt.date
    last: dt.date
    always_open: bool
    hours_available: float = 0.0
    hours_leased: float = 0.0
    hours_used: float = 0.0
    sessions: int = 0
    end_reasons: dict[str, int] = field(default_factory=dict)
    time_to_ready_median_s: float | None = None
    time_to_ready_p90_s: float | None = None
    wipe_failures: int = 0
    unmet_requests: int = 0
    waiting_users: int = 0
    unmet_by_hour_of_week: list[list[int]] = field(default_factory=list)
    used_by_hour_of_week: list[list[float]] = field(default_factory=list)
    days: list[dict[str, Any]] = field(default_factory=list)
    machines: list[MachineFigures] = field(default_factory=list)
    top_users: list[dict[str, Any]] = field(default_factory=list)
    top_groups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reclaimed(self) -> float | None:
        """Used / available (None when nothing was available)."""
        return round(self.hours_used / self.hours_available, 4) if self.hours_available else None

    def summary(self) -> dict[str, Any]:
        """The lab's row of the API answer and of the CSV (contract keys first)."""
        return {
            "lab": self.lab,
            "hours_available": self.hours_available,
            "hours_leased": self.hours_leased,
            "hours_used": self.hours_used,
            "sessions": self.sessions,
            "end_reasons": dict(self.end_reasons),
            "unmet_requests": self.unmet_requests,
            "timezone": self.timezone,
            "idle_hours_reclaimed": self.reclaimed,
            "time_to_ready_median_s": self.time_to_ready_median_s,
            "time_to_ready_p90_s": self.time_to_ready_p90_s,
            "wipe_failures": self.wipe_failures,
            "waiting_users": self.waiting_users,
        }


def _status_changes(
    start_at: dt.datetime, end_at: dt.datetime, *, lab: Lab | None = None
) -> dict[int, list[tuple[int, str, str, str]]]:
    """The status rows that can change availability in ``[start_at, end_at)``, by machine:
    (at, kind, from, to). One query for every lab (per lab, each read every lab's rows)."""
    qs = MachineEvent.objects.filter(at__gte=start_at, at__lt=end_at)
    if lab is not None:
        qs = qs.filter(machine__lab=lab)
    rows = (
        qs.filter(
            Q(kind__in=_PRESENCE) | ~Q(from_status__in=_OFFERED_CHURN, to_status__in=_OFFERED_CHURN)
        )
        .order_by("at", "pk")
        .values_list("machine_id", "at", "kind", "from_status", "to_status")
    )
    events: dict[int, list[tuple[int, str, str, str]]] = defaultdict(list)
    for machine_id, at, kind, from_status, to_status in rows:
        events[machine_id].append((ts(at), kind, from_status, to_status))
    return events


def _status_timelines(
    lab: Lab,
    machines: list[Machine],
    start: int,
    end: int,
    events: dict[int, list[tuple[int, str, str, str]]] | None = None,
) -> dict[int, tuple[list[Interval], list[Interval]]]:
    """Per machine: (intervals offered, intervals with someone at the keyboard) in
    ``[start, end)``, from the status history."""
    start_at, end_at = _at(start), _at(end)
    before = MachineEvent.objects.filter(machine=OuterRef("pk"), at__lt=start_at).order_by(
        "-at", "-pk"
    )
    initial = {
        m["pk"]: m
        for m in Machine.objects.filter(lab=lab)
        .annotate(
            status_before=Subquery(before.exclude(to_status="").values("to_status")[:1]),
            presence_before=Subquery(before.filter(kind__in=_PRESENCE).values("kind")[:1]),
        )
        .values("pk", "status_before", "presence_before", "status", "owner_present")
    }
    if events is None:
        events = _status_changes(start_at, end_at, lab=lab)

    out: dict[int, tuple[list[Interval], list[Interval]]] = {}
    for machine in machines:
        begin = max(start, ts(machine.created_at))
        # The rows may span a wider period (labs in other time zones): keep this lab's.
        evs = [e for e in events.get(machine.pk, ()) if start <= e[0] < end]
        init = initial[machine.pk]
        status = init["status_before"]
        if status is None:  # no history before the period: where its first change came from
            first = next((e for e in evs if e[3]), None)
            status = (first[2] or MachineStatus.OFFLINE) if first else init["status"]
        if init["presence_before"] is not None:
            present = init["presence_before"] == "owner_present"
        else:
            first_presence = next((e for e in evs if e[1] in _PRESENCE), None)
            present = first_presence[1] == "owner_left" if first_presence else init["owner_present"]
        offered: list[Interval] = []
        owner: list[Interval] = []
        t_status = t_owner = begin
        for when, kind, _from, to in evs:
            moment = max(when, begin)
            if kind in _PRESENCE:
                now_present = kind == "owner_present"
                if now_present != present:
                    if present:
                        owner.append((t_owner, moment))
                    present, t_owner = now_present, moment
            if to and to != status:
                if status not in NOT_OFFERED:
                    offered.append((t_status, moment))
                status, t_status = to, moment
        if status not in NOT_OFFERED:
            offered.append((t_status, end))
        if present:
            owner.append((t_owner, end))
        out[machine.pk] = (merge(offered), merge(owner))
    return out


def longest_session() -> dt.timedelta:
    """How long before a period a session overlapping it can have begun: the longest lease
    any policy allows (a lease never outlives ``max_session_minutes`` from its start), and at
    least 8 days. Bounds the reports' session scans to the period instead of all history."""
    most = QuotaPolicy.objects.aggregate(m=Max("max_session_minutes"))["m"] or 0
    return max(dt.timedelta(minutes=most), dt.timedelta(days=8)) + dt.timedelta(hours=1)


def _session_rows(
    start_at: dt.datetime, end_at: dt.datetime, *, lab: Lab | None = None
) -> dict[int, list[tuple[Any, ...]]]:
    """The sessions overlapping ``[start_at, end_at)`` (of one lab, or all), by lab id, as
    (lab, machine, owner, created, ready, ended, last activity, end reason), times as epoch
    microseconds. One query for every lab: per lab, each scan read every lab's sessions."""
    qs = ComputeSession.objects.filter(created_at__lt=end_at).filter(
        Q(ended_at__isnull=True)
        | Q(ended_at__gt=start_at, created_at__gte=start_at - longest_session())
    )
    if lab is not None:
        qs = qs.filter(machine__lab=lab)
    sql, params = (
        qs.annotate(
            c=Epoch("created_at"),
            s=Epoch("started_at"),
            e=Epoch("ended_at"),
            a=Epoch("last_activity"),
        )
        .values_list("machine__lab_id", "machine_id", "owner_id", "c", "s", "e", "a", "end_reason")
        .query.sql_with_params()
    )
    # Straight from the cursor: the ORM's per-value converters cost a third of the report.
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    out: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
    for row in rows:
        out[row[0]].append(row)
    return out


def _at(us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=us)


def _windows(lab: Lab, first: dt.date, last: dt.date) -> list[Interval]:
    return merge(
        (ts(a), ts(b))
        for day in days_of(first - dt.timedelta(days=1), last)
        for a, b in availability.open_intervals(lab, day)
    )


@dataclass
class DayPart:
    """What one local day of one lab adds to every figure, in integers (microseconds and
    counts), so that the parts of any period's days add up to that period's figures exactly.
    The nightly rollup (``reports.rollup``) stores one per lab and day; a report adds the
    stored days and computes only the others live."""

    machines: dict[int, list[int]] = field(default_factory=dict)
    """machine id -> [available, leased, used, sessions, wipe failures]; every machine of the
    lab that existed before the day's end, so a stored day knows which machines it covers."""
    used_by_hour: dict[int, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    ready: list[int] = field(default_factory=list)
    unmet_by_hour: dict[int, int] = field(default_factory=dict)
    unmet_users: list[int] = field(default_factory=list)
    users: dict[int, list[int]] = field(default_factory=dict)
    """user id -> [leased microseconds, sessions requested]"""
    windows: list[Interval] = field(default_factory=list)
    """The lab's open intervals inside the day, as they were when it was computed."""
    live: bool = False
    """A session overlapping the day was still running (its use may still grow): not final."""

    def machine(self, machine_id: int) -> list[int]:
        acc = self.machines.get(machine_id)
        if acc is None:
            acc = self.machines[machine_id] = [0, 0, 0, 0, 0]
        return acc

    def user(self, user_id: int) -> list[int]:
        acc = self.users.get(user_id)
        if acc is None:
            acc = self.users[user_id] = [0, 0]
        return acc

    def as_json(self) -> dict[str, Any]:
        """The stored form: machines and users as small arrays (``[id, values...]``), which
        PostgreSQL adds up over a period itself (``_stored_sums``); ``mi`` repeats the
        machine ids for the cheap validity check."""
        return {
            "mi": list(self.machines),
            "m": [[k, *v] for k, v in self.machines.items()],
            "h": [v for kv in self.used_by_hour.items() for v in kv],
            "r": self.reasons,
            "t": self.ready,
            "u": [v for kv in self.unmet_by_hour.items() for v in kv],
            "w": self.unmet_users,
            "p": [[k, *v] for k, v in self.users.items()],
            "o": [v for iv in self.windows for v in iv],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DayPart:
        part = cls.small_from_json(data)
        part.machines = {m[0]: m[1:] for m in data["m"]}
        part.users = {p[0]: p[1:] for p in data["p"]}
        return part

    @classmethod
    def small_from_json(cls, data: dict[str, Any]) -> DayPart:
        """All but the machines and users (which the database adds up)."""
        h, u, o = data["h"], data["u"], data["o"]
        return cls(
            used_by_hour=dict(zip(h[::2], h[1::2], strict=True)),
            reasons=data["r"],
            ready=data["t"],
            unmet_by_hour=dict(zip(u[::2], u[1::2], strict=True)),
            unmet_users=data["w"],
            windows=list(zip(o[::2], o[1::2], strict=True)),
        )


class Totals:
    """A period's sums, from its days' parts (``add``) or from the database's sums of
    stored days (``add_sums``): integers, so the order of adding does not matter."""

    def __init__(self, machines: list[Machine]) -> None:
        self.per_machine = {m.pk: [0, 0, 0, 0, 0] for m in machines}
        self.by_day: dict[dt.date, list[int]] = {}
        self.used_how: dict[tuple[int, int], int] = defaultdict(int)
        self.grid = [[0] * 24 for _ in range(7)]
        self.unmet = 0
        self.reasons: Counter[str] = Counter()
        self.ready: list[int] = []
        self.waiting: set[int] = set()
        self.user_us: dict[int, int] = defaultdict(int)
        self.user_sessions: Counter[int] = Counter()

    def add_small(self, day: dt.date, part: DayPart) -> None:
        weekday = day.weekday()
        for hour, us in part.used_by_hour.items():
            self.used_how[(weekday, hour)] += us
        for hour, count in part.unmet_by_hour.items():
            self.grid[weekday][hour] += count
            self.unmet += count
        self.waiting.update(part.unmet_users)
        self.reasons.update(part.reasons)
        self.ready.extend(part.ready)

    def add(self, day: dt.date, part: DayPart) -> None:
        self.add_small(day, part)
        self.add_big(day, part)

    def add_big(self, day: dt.date, part: DayPart) -> None:
        """The machines and users of ``part``."""
        avail_day = leased_day = used_day = 0
        for machine_id, (avail, leased, used, sessions, wipes) in part.machines.items():
            acc = self.per_machine.get(machine_id)
            if acc is None:
                continue  # not in the lab any more (a stored day covering it is not used)
            acc[0] += avail
            acc[1] += leased
            acc[2] += used
            acc[3] += sessions
            acc[4] += wipes
            avail_day += avail
            leased_day += leased
            used_day += used
        self.by_day[day] = [avail_day, leased_day, used_day]
        for user_id, (us, sessions) in part.users.items():
            self.add_user(user_id, us, sessions)

    def add_user(self, user_id: int, us: int, sessions: int) -> None:
        if us:
            self.user_us[user_id] += us
        if sessions:
            self.user_sessions[user_id] += sessions

    def add_machine(self, machine_id: int, values: Sequence[int]) -> None:
        acc = self.per_machine[machine_id]
        for i, value in enumerate(values):
            acc[i] += value


def _lab_machines(lab: Lab) -> list[Machine]:
    return list(Machine.objects.filter(lab=lab).order_by("name"))


def day_parts(
    lab: Lab,
    first: dt.date,
    last: dt.date,
    *,
    now: dt.datetime,
    machines: list[Machine] | None = None,
    session_rows: dict[int, list[tuple[Any, ...]]] | None = None,
    status_rows: dict[int, list[tuple[int, str, str, str]]] | None = None,
) -> dict[dt.date, DayPart]:
    """The live path: each local day of ``lab`` from ``first`` to ``last``, from the recorded
    sessions, status history, windows and unmet requests, in one pass over the period."""
    now_us = ts(now)
    tz = lab.tz
    start = local_midnight(first, tz)
    end = min(local_midnight(last + dt.timedelta(days=1), tz), max(now_us, start))
    start_at, end_at = _at(start), _at(end)
    if machines is None:
        machines = _lab_machines(lab)
    days = day_buckets(first, last, tz)
    hrs = hour_buckets(first, last, tz)
    parts = {day: DayPart() for day in days.keys}
    for day, day_end in zip(days.keys, days.ends, strict=True):
        for machine in machines:
            if ts(machine.created_at) < day_end:
                parts[day].machine(machine.pk)
    all_windows = _windows(lab, first, last)
    for day, a, b in zip(days.keys, days.starts, days.ends, strict=True):
        parts[day].windows = intersect(all_windows, [(a, b)])
    span = [(start, end)] if start < end else []
    windows = intersect(all_windows, span)
    timelines = _status_timelines(lab, machines, start, end, status_rows) if span else {}
    for machine in machines:
        offered, owner = timelines.get(machine.pk, ([], []))
        for a, b in subtract(intersect(windows, offered), owner):
            for day, us in days.pieces(a, b):
                parts[day].machine(machine.pk)[0] += us

    if session_rows is None:
        rows = _session_rows(start_at, end_at, lab=lab).get(lab.pk, [])
    else:
        rows = session_rows.get(lab.pk, [])
    for _lab, machine_id, owner_id, created, started, ended, activity, reason in rows:
        if created >= end or (ended is not None and ended <= start):
            continue  # the rows may span a wider period (labs in other time zones)
        stop = now_us if ended is None else ended
        a, b = max(created, start), min(stop, end)
        if a < b:
            for day, us in days.pieces(a, b):
                part = parts[day]
                part.machine(machine_id)[1] += us
                part.user(owner_id)[0] += us
                if ended is None:
                    part.live = True
        if started is not None and activity is not None:
            a, b = max(started, start), min(stop, max(activity, started), end)
            if a < b:
                for day, us in days.pieces(a, b):
                    parts[day].machine(machine_id)[2] += us
                for (day, hour), us in hrs.pieces(a, b):
                    by_hour = parts[day].used_by_hour
                    by_hour[hour] = by_hour.get(hour, 0) + us
        if start <= created < end:
            part = parts[days.key_at(created)]
            part.machine(machine_id)[3] += 1
            part.user(owner_id)[1] += 1
            key = reason or (LIVE_KEY if ended is None else UNKNOWN_KEY)
            part.reasons[key] = part.reasons.get(key, 0) + 1
            if started is not None:
                part.ready.append(started - created)

    failures = (
        ComputeSession.objects.filter(
            machine__lab=lab,
            cleanup_verified=False,
            cleanup_finished_at__gte=start_at,
            cleanup_finished_at__lt=end_at,
        )
        .annotate(f=Epoch("cleanup_finished_at"))
        .values_list("machine_id", "f")
    )
    for machine_id, finished in failures:
        parts[days.key_at(finished)].machine(machine_id)[4] += 1

    for user_id, at in UnmetRequest.objects.filter(
        lab=lab, at__gte=start_at, at__lt=end_at
    ).values_list("user_id", "at"):
        local = at.astimezone(tz)
        part = parts[local.date()]
        part.unmet_by_hour[local.hour] = part.unmet_by_hour.get(local.hour, 0) + 1
        part.unmet_users.append(user_id)
    return parts


def lab_figures(
    lab: Lab,
    first: dt.date,
    last: dt.date,
    *,
    now: dt.datetime | None = None,
    top: int = 10,
    people: People | None = None,
    session_rows: dict[int, list[tuple[Any, ...]]] | None = None,
    status_rows: dict[int, list[tuple[int, str, str, str]]] | None = None,
    rollups: bool = True,
    stored: Stored | None = None,
) -> LabFigures:
    """Every figure of ``lab`` for its local days ``first``..``last`` (both included): the
    days rolled up already (``stored``, or read here when ``rollups``) added to the others,
    computed live."""
    now = now or timezone.now()
    machines = _lab_machines(lab)
    if stored is None:
        stored = stored_days([lab], first, last, now=now) if rollups else Stored({}, {})
    totals = Totals(machines)
    done = stored.add_to(lab.pk, totals)
    for run_first, run_last in _runs([d for d in days_of(first, last) if d not in done]):
        for day, part in day_parts(
            lab,
            run_first,
            run_last,
            now=now,
            machines=machines,
            session_rows=session_rows,
            status_rows=status_rows,
        ).items():
            totals.add(day, part)
    return _finish(lab, first, last, machines, totals, top, people or People.load())


def _runs(days: list[dt.date]) -> list[tuple[dt.date, dt.date]]:
    """Consecutive days as (first, last) runs."""
    out: list[tuple[dt.date, dt.date]] = []
    for day in days:
        if out and out[-1][1] + dt.timedelta(days=1) == day:
            out[-1] = (out[-1][0], day)
        else:
            out.append((day, day))
    return out


def _finish(
    lab: Lab,
    first: dt.date,
    last: dt.date,
    machines: list[Machine],
    totals: Totals,
    top: int,
    people: People,
) -> LabFigures:
    """The figures of the period from its sums."""
    out = LabFigures(
        lab=lab.name,
        lab_id=lab.pk,
        timezone=lab.timezone,
        first=first,
        last=last,
        always_open=not lab.windows.all(),
    )
    for day in days_of(first, last):
        avail, leased, used = totals.by_day[day]
        out.days.append(
            {
                "date": day,
                "hours_available": hours(avail),
                "hours_leased": hours(leased),
                "hours_used": hours(used),
            }
        )
    per_machine = totals.per_machine
    for machine in machines:
        avail, leased, used, sessions, wipes = per_machine[machine.pk]
        out.machines.append(
            MachineFigures(
                machine.pk, machine.name, hours(avail), hours(leased), hours(used), sessions, wipes
            )
        )
    out.hours_available = hours(sum(v[0] for v in per_machine.values()))
    out.hours_leased = hours(sum(v[1] for v in per_machine.values()))
    out.hours_used = hours(sum(v[2] for v in per_machine.values()))
    out.sessions = sum(v[3] for v in per_machine.values())
    out.wipe_failures = sum(v[4] for v in per_machine.values())
    reasons = totals.reasons
    out.end_reasons = {k: reasons[k] for k in END_REASON_KEYS if reasons[k]}
    ready = totals.ready
    out.time_to_ready_median_s = round(statistics.median(ready) / SECOND, 3) if ready else None
    p90 = percentile(ready, 90)
    out.time_to_ready_p90_s = None if p90 is None else round(p90 / SECOND, 3)
    out.unmet_requests = totals.unmet
    out.waiting_users = len(totals.waiting)
    out.unmet_by_hour_of_week = totals.grid
    out.used_by_hour_of_week = [
        [hours(totals.used_how.get((d, h), 0)) for h in range(24)] for d in range(7)
    ]
    out.top_users, out.top_groups = _top(totals.user_us, totals.user_sessions, top, people)
    return out


@dataclass
class Stored:
    """The stored days of a report that still hold, by lab: {lab id: {day: (row id, the
    day's small parts)}}, and the database's sums of their machines and users."""

    days: dict[int, dict[dt.date, tuple[int, DayPart]]]
    sums: dict[int, dict[str, Any]]

    def add_to(self, lab_id: int, totals: Totals) -> set[dt.date]:
        """Add ``lab_id``'s stored days to ``totals``; returns those days."""
        days = self.days.get(lab_id, {})
        sums = self.sums.get(lab_id)
        for day, (_row, part) in days.items():
            totals.add_small(day, part)
            if sums is None:
                totals.add_big(day, part)  # no database sums (other databases): in Python
        if sums is not None:
            for machine_id, values in sums["machines"]:
                totals.add_machine(machine_id, values)
            for user_id, us, sessions in sums["users"]:
                totals.add_user(user_id, us, sessions)
            for day, values in sums["days"].items():
                totals.by_day[day] = values
        return set(days)


def stored_days(
    labs: Iterable[Lab], first: dt.date, last: dt.date, *, now: dt.datetime, sums: bool = True
) -> Stored:
    """The rolled-up days of ``labs`` in ``first``..``last`` that still hold: the day ended
    before ``now``, no session was running over it when it was computed, it covers exactly
    the lab's machines of that day and the lab's time zone and open hours are unchanged.
    On PostgreSQL the database adds up their machines and users (unless ``sums`` is off);
    elsewhere Python does."""
    from reports.models import LabDayRollup

    labs = list(labs)
    by_id = {lab.pk: lab for lab in labs}
    now_us = ts(now)
    on_postgres = _sums_in_database()
    fields = ["pk", "lab_id", "day", "timezone"]
    if on_postgres:
        fields += [f"parts__{key}" for key in ("mi", "h", "r", "t", "u", "w", "o")]
    else:
        fields.append("parts")
    rows = LabDayRollup.objects.filter(
        lab_id__in=list(by_id), day__gte=first, day__lte=last
    ).values_list(*fields)
    found: dict[int, dict[dt.date, tuple[int, dict[str, Any]]]] = defaultdict(dict)
    for row in rows:
        pk, lab_id, day, tz_name = row[:4]
        if tz_name != by_id[lab_id].timezone:
            continue
        if on_postgres:
            data = dict(zip(("mi", "h", "r", "t", "u", "w", "o"), row[4:], strict=True))
        else:
            data = row[4]
        found[lab_id][day] = (pk, data)
    out: dict[int, dict[dt.date, tuple[int, DayPart]]] = {}
    for lab_id, days in found.items():
        lab = by_id[lab_id]
        created = sorted(
            (ts(c), pk) for pk, c in Machine.objects.filter(lab=lab).values_list("pk", "created_at")
        )
        current = {pk for _c, pk in created}
        windows = _windows(lab, min(days), max(days))
        buckets = day_buckets(min(days), max(days), lab.tz)
        good: dict[dt.date, tuple[int, DayPart]] = {}
        for day, a, b in zip(buckets.keys, buckets.starts, buckets.ends, strict=True):
            if day not in days or b > now_us:
                continue
            pk, data = days[day]
            part = DayPart.from_json(data) if not on_postgres else DayPart.small_from_json(data)
            # Every machine of the lab by the day's end, and none that left the lab since.
            if {m for c, m in created if c < b} <= set(data["mi"]) <= current and (
                part.windows == intersect(windows, [(a, b)])
            ):
                good[day] = (pk, part)
        out[lab_id] = good
    return Stored(out, _stored_sums(out) if on_postgres and sums else {})


def _sums_in_database() -> bool:
    return connection.vendor == "postgresql"


def _stored_sums(days: dict[int, dict[dt.date, tuple[int, DayPart]]]) -> dict[int, dict[str, Any]]:
    """PostgreSQL adds up the stored days' machines (per machine and per day) and users."""
    ids = [pk for lab_days in days.values() for pk, _part in lab_days.values()]
    day_of = {pk: (lab_id, day) for lab_id, d in days.items() for day, (pk, _p) in d.items()}
    out: dict[int, dict[str, Any]] = {
        lab_id: {"machines": [], "users": [], "days": {}} for lab_id in days
    }
    if not ids:
        return out
    table = "reports_labdayrollup"
    with connection.cursor() as cur:
        # One pass over the machines' arrays: sums per machine, and per day (row).
        cur.execute(
            f"""
            SELECT lab_id, row_id, machine_id, sum(a), sum(l), sum(u), sum(s), sum(w)
            FROM (
                SELECT r.lab_id, r.id AS row_id, (e->>0)::int8 AS machine_id,
                       (e->>1)::int8 AS a, (e->>2)::int8 AS l, (e->>3)::int8 AS u,
                       (e->>4)::int8 AS s, (e->>5)::int8 AS w
                FROM {table} r CROSS JOIN LATERAL jsonb_array_elements(r.parts->'m') e
                WHERE r.id = ANY(%s)
            ) x
            GROUP BY GROUPING SETS ((lab_id, machine_id), (row_id))
            """,
            [ids],
        )
        for lab_id, row_id, machine_id, *values in cur.fetchall():
            if row_id is None:
                out[lab_id]["machines"].append((machine_id, [int(v) for v in values]))
            else:
                row_lab, day = day_of[row_id]
                out[row_lab]["days"][day] = [int(v) for v in values[:3]]
        for lab_id, day in day_of.values():
            out[lab_id]["days"].setdefault(day, [0, 0, 0])  # a day without machines
        cur.execute(
            f"""
            SELECT r.lab_id, (e->>0)::int8, sum((e->>1)::int8), sum((e->>2)::int8)
            FROM {table} r CROSS JOIN LATERAL jsonb_array_elements(r.parts->'p') e
            WHERE r.id = ANY(%s) GROUP BY 1, 2
            """,
            [ids],
        )
        for lab_id, user_id, us, sessions in cur.fetchall():
            out[lab_id]["users"].append((user_id, int(us), int(sessions)))
    return out


@dataclass(frozen=True)
class People:
    """Usernames and group names of everyone, loaded once per report: two plain scans are
    cheaper than lists of thousands of ids sent to the database for each lab."""

    names: dict[int, str]
    groups: dict[int, list[str]]

    @classmethod
    def load(cls) -> People:
        groups: dict[int, list[str]] = defaultdict(list)
        for user_id, group in User.groups.through.objects.values_list("user_id", "group__name"):
            groups[user_id].append(group)
        return cls(dict(User.objects.values_list("pk", "username")), groups)


def _top(
    user_secs: dict[int, int], user_sessions: Counter[int], top: int, people: People
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The heaviest users and groups by leased hours (staff-only figures)."""
    names = people.names
    group_secs: dict[str, int] = defaultdict(int)
    for user_id, secs in user_secs.items():
        for group in people.groups.get(user_id, ()):
            group_secs[group] += secs
    ranked = sorted(user_secs.items(), key=lambda kv: (-kv[1], names[kv[0]]))
    top_users = [
        {"user": names[u], "hours": hours(s), "sessions": user_sessions[u]} for u, s in ranked[:top]
    ]
    top_groups = [
        {"group": g, "hours": hours(s)}
        for g, s in sorted(group_secs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    ]
    return top_users, top_groups


# --- the whole report --------------------------------------------------------------------------


@dataclass
class Report:
    first: dt.date
    last: dt.date
    labs: list[LabFigures]
    unmet_any_lab: int
    weekly_quota: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {
            "from": self.first.isoformat(),
            "to": self.last.isoformat(),
            "labs": [lab.summary() for lab in self.labs],
            "unmet_requests_any_lab": self.unmet_any_lab,
        }


def report(
    first: dt.date,
    last: dt.date,
    *,
    lab: str | None = None,
    now: dt.datetime | None = None,
    detail: bool = True,
    rollups: bool = True,
) -> Report:
    """The utilisation report of every lab (or the one named) for ``first``..``last``.

    Raises ``ValueError`` for an empty or too long period and ``Lab.DoesNotExist`` for an
    unknown lab. ``detail=False`` skips the fleet-wide weekly quota table (the API's answer).
    ``rollups=False`` computes every day live, ignoring the nightly rollups (the same figures,
    slower: the tests compare the two)."""
    if not (first >= EARLIEST and last <= LATEST):
        raise ValueError(f"dates must lie between {EARLIEST} and {LATEST}")
    if last < first:
        raise ValueError("'to' is before 'from'")
    if (last - first).days >= MAX_DAYS:
        raise ValueError(f"the period is longer than {MAX_DAYS} days")
    now = now or timezone.now()
    query = Lab.objects.prefetch_related("windows", "closed_dates").order_by("name")
    if lab is not None:
        query = query.filter(name=lab)
    labs = list(query)
    if lab is not None and not labs:
        raise Lab.DoesNotExist(f"no lab named {lab!r}")
    people = People.load()
    stored = stored_days(labs, first, last, now=now) if rollups else Stored({}, {})
    # One session query for all labs, over the union of the days left to compute live.
    bounds = []
    for one in labs:
        missing = [d for d in days_of(first, last) if d not in stored.days.get(one.pk, {})]
        if missing:
            bounds.append(
                (
                    local_midnight(missing[0], one.tz),
                    local_midnight(missing[-1] + dt.timedelta(days=1), one.tz),
                )
            )
    rows: dict[int, list[tuple[Any, ...]]] = {}
    changes: dict[int, list[tuple[int, str, str, str]]] = {}
    if bounds:
        union = _at(min(b[0] for b in bounds)), _at(max(b[1] for b in bounds))
        rows, changes = _session_rows(*union), _status_changes(*union)
    figures = [
        lab_figures(
            one,
            first,
            last,
            now=now,
            people=people,
            session_rows=rows,
            status_rows=changes,
            stored=stored,
        )
        for one in labs
    ]
    start = _at(local_midnight(first, dt.UTC))  # lab-less figures are in UTC
    end = _at(local_midnight(last + dt.timedelta(days=1), dt.UTC))
    unmet_any = (
        0
        if lab is not None
        else UnmetRequest.objects.filter(lab__isnull=True, at__gte=start, at__lt=end).count()
    )
    weekly = weekly_quota_use(first, last, now=now) if detail and lab is None else []
    return Report(first, last, figures, unmet_any, weekly)


def weekly_limits(user_ids: set[int]) -> dict[int, int]:
    """Each user's weekly hours, as ``policy_for`` decides them, in three queries for any
    number of users (one ``policy_for`` per user cost seconds for a term's students)."""
    default = default_policy()  # first: it is made if missing, and must be among the policies
    policies = list(QuotaPolicy.objects.prefetch_related("labs"))
    by_group = {p.group_id: p for p in policies if p.group_id is not None}
    fallback = [p for p in policies if p.pk == default.pk]
    groups: dict[int, list[int]] = defaultdict(list)
    for user_id, group_id in User.groups.through.objects.filter(user_id__in=user_ids).values_list(
        "user_id", "group_id"
    ):
        groups[user_id].append(group_id)
    cache: dict[frozenset[int], int] = {}
    out = {}
    for user_id in user_ids:
        mine = [by_group[g] for g in groups.get(user_id, []) if g in by_group] or fallback
        key = frozenset(p.pk for p in mine)
        if key not in cache:
            cache[key] = EffectivePolicy(mine).max_hours_per_week
        out[user_id] = cache[key]
    return out


def weekly_quota_use(
    first: dt.date, last: dt.date, *, now: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """Per quota week (Monday 00:00 UTC, as the quota counts) touching the period: users who
    ran sessions, their hours, and how many used at least 80 % and all of their weekly hours.
    Hours as the quota counts them: from ready to the end of the session."""
    now = now or timezone.now()
    monday = first - dt.timedelta(days=first.weekday())
    weeks = []
    while monday <= last:
        weeks.append(monday)
        monday += dt.timedelta(days=7)
    now_at = _at(ts(now))
    horizon = longest_session()
    per: dict[tuple[dt.date, int], float] = defaultdict(float)
    for week in weeks:
        # The overlap of each session with the week, added up by the database per user.
        w_start = _at(local_midnight(week, dt.UTC))
        w_end = _at(local_midnight(week + dt.timedelta(days=7), dt.UTC))
        overlap = ExpressionWrapper(
            Least(Coalesce("ended_at", Value(now_at)), Value(w_end))
            - Greatest("started_at", Value(w_start)),
            output_field=DurationField(),
        )
        rows = (
            ComputeSession.objects.filter(started_at__isnull=False, started_at__lt=w_end)
            .filter(
                Q(ended_at__isnull=True)
                | Q(ended_at__gt=w_start, created_at__gte=w_start - horizon)
            )
            .values("owner_id")
            .annotate(held=Sum(overlap))
            .values_list("owner_id", "held")
        )
        for owner_id, held in rows:
            if held is not None and held.total_seconds() > 0:
                per[(week, owner_id)] += held.total_seconds()
    limits = weekly_limits({u for _, u in per})
    out = []
    for week in weeks:
        used = {u: s / 3600 for (w, u), s in per.items() if w == week}
        out.append(
            {
                "week": week,
                "users": len(used),
                "hours": round(sum(used.values()), 4),
                "users_over_80_percent": sum(
                    1 for u, h in used.items() if limits[u] and h >= 0.8 * limits[u] - 1e-9
                ),
                "users_at_quota": sum(
                    1 for u, h in used.items() if limits[u] and h >= limits[u] - 1e-9
                ),
            }
        )
    return out
