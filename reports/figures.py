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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import connection
from django.db.models import (
    DurationField,
    ExpressionWrapper,
    FloatField,
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

Interval = tuple[float, float]
"""Seconds since the epoch (UTC): a month of a big fleet is ~10^5 intervals, and float
arithmetic, unlike datetimes, keeps the overview under a second."""
HOUR = 3600.0
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


def seconds(ivs: Iterable[Interval]) -> float:
    return sum(b - a for a, b in ivs)


class Epoch(Func):
    """A datetime column as float seconds since the epoch, computed by the database (parsing
    10^5 timestamps in Python cost more than the whole rest of the report)."""

    output_field = FloatField()
    arity = 1

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(
            compiler, connection, template="EXTRACT(EPOCH FROM %(expressions)s)::float8", **extra
        )

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(
            compiler,
            connection,
            template="(julianday(%(expressions)s) - 2440587.5) * 86400.0",
            **extra,
        )


def ts(at: dt.datetime) -> float:
    return at.timestamp()


@dataclass(frozen=True)
class Buckets:
    """Consecutive UTC buckets, each with a key (a local day, an hour of the week)."""

    starts: list[float]
    ends: list[float]
    keys: list[Any]

    def add_one(self, a: float, b: float, into: dict[Any, float]) -> None:
        """``add`` of one interval, with a fast path for one inside a single bucket (most
        sessions stay inside one day and touch two hours)."""
        i = bisect.bisect_right(self.ends, a)
        if i < len(self.ends) and b <= self.ends[i] and a >= self.starts[i]:
            key = self.keys[i]
            into[key] = into.get(key, 0.0) + (b - a)
        else:
            self.add(((a, b),), into)

    def add(self, ivs: Iterable[Interval], into: dict[Any, float]) -> None:
        """Add the seconds of ``ivs`` falling in each bucket to ``into[key]``."""
        for a, b in ivs:
            i = bisect.bisect_right(self.ends, a)
            while i < len(self.starts) and self.starts[i] < b:
                overlap = min(b, self.ends[i]) - max(a, self.starts[i])
                if overlap > 0:
                    into[self.keys[i]] = into.get(self.keys[i], 0.0) + overlap
                i += 1


def local_midnight(day: dt.date, tz: zoneinfo.ZoneInfo | dt.timezone) -> float:
    return dt.datetime.combine(day, dt.time(0), tz).timestamp()


def days_of(first: dt.date, last: dt.date) -> list[dt.date]:
    return [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]


def day_buckets(first: dt.date, last: dt.date, tz: zoneinfo.ZoneInfo) -> Buckets:
    days = days_of(first, last)
    starts = [local_midnight(d, tz) for d in days]
    ends = [*starts[1:], local_midnight(last + dt.timedelta(days=1), tz)]
    return Buckets(starts, ends, days)


def hour_of_week_buckets(first: dt.date, last: dt.date, tz: zoneinfo.ZoneInfo) -> Buckets:
    """Local hours keyed (weekday, hour). A skipped hour (spring forward) is an empty bucket;
    the repeated hour (fall back) is one two-hour bucket of its local hour."""
    starts: list[float] = []
    keys: list[tuple[int, int]] = []
    for day in days_of(first, last):
        for hour in range(24):
            starts.append(dt.datetime.combine(day, dt.time(hour), tz).timestamp())
            keys.append((day.weekday(), hour))
    end = local_midnight(last + dt.timedelta(days=1), tz)
    ends = [max(s, e) for s, e in zip(starts, [*starts[1:], end], strict=True)]
    return Buckets(starts, ends, keys)


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least p % at or below it)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def hours(secs: float) -> float:
    return round(secs / HOUR, 4)


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
) -> dict[int, list[tuple[float, str, str, str]]]:
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
    events: dict[int, list[tuple[float, str, str, str]]] = defaultdict(list)
    for machine_id, at, kind, from_status, to_status in rows:
        events[machine_id].append((at.timestamp(), kind, from_status, to_status))
    return events


def _status_timelines(
    lab: Lab,
    machines: list[Machine],
    start: float,
    end: float,
    events: dict[int, list[tuple[float, str, str, str]]] | None = None,
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
        begin = max(start, machine.created_at.timestamp())
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
    floats. One query for every lab: per lab, each scan read every lab's sessions."""
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


def _at(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def _windows(lab: Lab, first: dt.date, last: dt.date) -> list[Interval]:
    return merge(
        (a.timestamp(), b.timestamp())
        for day in days_of(first - dt.timedelta(days=1), last)
        for a, b in availability.open_intervals(lab, day)
    )


def lab_figures(
    lab: Lab,
    first: dt.date,
    last: dt.date,
    *,
    now: dt.datetime | None = None,
    top: int = 10,
    people: People | None = None,
    session_rows: dict[int, list[tuple[Any, ...]]] | None = None,
    status_rows: dict[int, list[tuple[float, str, str, str]]] | None = None,
) -> LabFigures:
    """Every figure of ``lab`` for its local days ``first``..``last`` (both included)."""
    now_ts = (now or timezone.now()).timestamp()
    tz = lab.tz
    start = local_midnight(first, tz)
    end = min(local_midnight(last + dt.timedelta(days=1), tz), max(now_ts, start))
    start_at, end_at = _at(start), _at(end)
    out = LabFigures(
        lab=lab.name,
        lab_id=lab.pk,
        timezone=lab.timezone,
        first=first,
        last=last,
        always_open=not lab.windows.all(),
    )
    days = day_buckets(first, last, tz)
    how = hour_of_week_buckets(first, last, tz)
    machines = list(Machine.objects.filter(lab=lab).order_by("name"))
    per_machine = {m.pk: MachineFigures(m.pk, m.name) for m in machines}
    span = [(start, end)] if start < end else []
    windows = intersect(_windows(lab, first, last), span)
    timelines = _status_timelines(lab, machines, start, end, status_rows) if span else {}

    by_day: dict[str, dict[Any, float]] = {"available": {}, "leased": {}, "used": {}}
    used_how: dict[Any, float] = {}
    for machine in machines:
        offered, owner = timelines.get(machine.pk, ([], []))
        avail = subtract(intersect(windows, offered), owner)
        per_machine[machine.pk].hours_available = seconds(avail)
        days.add(avail, by_day["available"])

    user_secs: dict[int, float] = defaultdict(float)
    user_sessions: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    ready: list[float] = []
    if session_rows is None:
        rows = _session_rows(start_at, end_at, lab=lab).get(lab.pk, [])
    else:
        rows = session_rows.get(lab.pk, [])
    leased_by_day, used_by_day = by_day["leased"], by_day["used"]
    for _lab, machine_id, owner_id, created, started, ended, activity, reason in rows:
        if created >= end or (ended is not None and ended <= start):
            continue  # the rows may span a wider period (labs in other time zones)
        stop = now_ts if ended is None else ended
        fig = per_machine[machine_id]
        a, b = max(created, start), min(stop, end)
        if a < b:
            fig.hours_leased += b - a
            user_secs[owner_id] += b - a
            days.add_one(a, b, leased_by_day)
        if started is not None and activity is not None:
            a, b = max(started, start), min(stop, max(activity, started), end)
            if a < b:
                fig.hours_used += b - a
                days.add_one(a, b, used_by_day)
                how.add_one(a, b, used_how)
        if start <= created < end:
            fig.sessions += 1
            user_sessions[owner_id] += 1
            reasons[reason or (LIVE_KEY if ended is None else UNKNOWN_KEY)] += 1
            if started is not None:
                ready.append(round(started - created, 6))

    failures = Counter(
        ComputeSession.objects.filter(
            machine__lab=lab,
            cleanup_verified=False,
            cleanup_finished_at__gte=start_at,
            cleanup_finished_at__lt=end_at,
        ).values_list("machine_id", flat=True)
    )
    for machine_id, count in failures.items():
        per_machine[machine_id].wipe_failures = count

    unmet = list(
        UnmetRequest.objects.filter(lab=lab, at__gte=start_at, at__lt=end_at).values_list(
            "user_id", "at"
        )
    )
    grid = [[0] * 24 for _ in range(7)]
    for _user, at in unmet:
        local = at.astimezone(tz)
        grid[local.weekday()][local.hour] += 1

    for fig in per_machine.values():
        out.hours_available += fig.hours_available
        out.hours_leased += fig.hours_leased
        out.hours_used += fig.hours_used
        fig.hours_available = hours(fig.hours_available)
        fig.hours_leased = hours(fig.hours_leased)
        fig.hours_used = hours(fig.hours_used)
    out.hours_available = hours(out.hours_available)
    out.hours_leased = hours(out.hours_leased)
    out.hours_used = hours(out.hours_used)
    out.sessions = sum(f.sessions for f in per_machine.values())
    out.end_reasons = {k: reasons[k] for k in END_REASON_KEYS if reasons[k]}
    out.time_to_ready_median_s = round(statistics.median(ready), 3) if ready else None
    p90 = percentile(ready, 90)
    out.time_to_ready_p90_s = None if p90 is None else round(p90, 3)
    out.wipe_failures = sum(failures.values())
    out.unmet_requests = len(unmet)
    out.waiting_users = len({u for u, _ in unmet})
    out.unmet_by_hour_of_week = grid
    out.used_by_hour_of_week = [
        [hours(used_how.get((d, h), 0.0)) for h in range(24)] for d in range(7)
    ]
    out.days = [
        {
            "date": day,
            "hours_available": hours(by_day["available"].get(day, 0.0)),
            "hours_leased": hours(by_day["leased"].get(day, 0.0)),
            "hours_used": hours(by_day["used"].get(day, 0.0)),
        }
        for day in days.keys
    ]
    out.machines = list(per_machine.values())
    out.top_users, out.top_groups = _top(user_secs, user_sessions, top, people or People.load())
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
    user_secs: dict[int, float], user_sessions: Counter[int], top: int, people: People
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The heaviest users and groups by leased hours (staff-only figures)."""
    names = people.names
    group_secs: dict[str, float] = defaultdict(float)
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
) -> Report:
    """The utilisation report of every lab (or the one named) for ``first``..``last``.

    Raises ``ValueError`` for an empty or too long period and ``Lab.DoesNotExist`` for an
    unknown lab. ``detail=False`` skips the fleet-wide weekly quota table (the API's answer)."""
    if not (first >= EARLIEST and last <= LATEST):
        raise ValueError(f"dates must lie between {EARLIEST} and {LATEST}")
    if last < first:
        raise ValueError("'to' is before 'from'")
    if (last - first).days >= MAX_DAYS:
        raise ValueError(f"the period is longer than {MAX_DAYS} days")
    now = now or timezone.now()
    labs = Lab.objects.prefetch_related("windows", "closed_dates").order_by("name")
    if lab is not None:
        labs = labs.filter(name=lab)
        if not labs:
            raise Lab.DoesNotExist(f"no lab named {lab!r}")
    people = People.load()
    # One session query for all labs, over the union of their local periods.
    bounds = [
        (local_midnight(first, one.tz), local_midnight(last + dt.timedelta(days=1), one.tz))
        for one in labs
    ]
    rows: dict[int, list[tuple[Any, ...]]] = {}
    changes: dict[int, list[tuple[float, str, str, str]]] = {}
    if bounds:
        union = _at(min(b[0] for b in bounds)), _at(max(b[1] for b in bounds))
        rows, changes = _session_rows(*union), _status_changes(*union)
    figures = [
        lab_figures(
            one, first, last, now=now, people=people, session_rows=rows, status_rows=changes
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
    now_at = _at(now.timestamp())
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
        used = {u: s / HOUR for (w, u), s in per.items() if w == week}
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
