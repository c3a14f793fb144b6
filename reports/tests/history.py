"""A small, known history, every figure of which is computed by hand in ``EXPECTED``.

Lab "Physics" in Europe/Berlin, reported for Fri 27 – Mon 30 March 2026. On Sunday 29 March
the clocks jump from 02:00 CET to 03:00 CEST (a 23-hour day).

Windows (local): every day 08:00–20:00; Saturday also 20:00–24:00; Sunday also 00:00–04:00
(only 3 real hours on the DST night). Window hours: Fri 12, Sat 16, Sun 3 + 12 = 15, Mon 12:
55 h per machine.

* pc-a: online all along; its owner sat at it Fri 10:00–11:30 local (1.5 h): 53.5 h available.
* pc-b: offline for all of Saturday (local), so 55 − 16 = 39 h available.

Sessions (UTC):
* S1 pc-a, owner: requested Sat 21:00, ready 21:01 (60 s), last activity Sun 01:31, ended
  01:45 (idle). Crosses local midnight (Sat 23:00 UTC) and the DST jump. Leased 4.75 h, used
  4.5 h: Sat 1 h 59 min, Sun 2 h 31 min. By local hour: Sat 22 (59 min), Sat 23, Sun 00, Sun 01
  (60 min each), Sun 03 (31 min); Sun 02 does not exist.
* S2 pc-b, other: Fri 13:00–15:00, ready 13:00:20 (20 s), last activity 14:30:20 (user).
  Leased 2 h, used 1.5 h (Fri 14:00–15:30 local).
* S3 pc-a, owner: Mon 07:00, failed 07:02 (start_failed). Leased 2 min, never ready.
* S4 pc-b, other: Mon 08:00–09:00, ready 08:01:30 (90 s), last activity 08:31:30 (expired),
  wipe not verified at 09:01. Leased 1 h, used 0.5 h.
* S0 pc-a ended before the period: not counted.

Unmet: Mon 09:15 and 09:40 CEST (users owner, other), Fri 18:10 CET (owner); one before the
period; one for any lab (Mon, UTC).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib.auth.models import Group

from accounts.models import User
from machines.models import AvailabilityWindow, Lab, Machine, MachineEvent, MachineStatus
from sessions.models import ComputeSession, UnmetRequest
from sessions.states import EndReason, SessionState

UTC = dt.UTC
FIRST, LAST = dt.date(2026, 3, 27), dt.date(2026, 3, 30)
NOW = dt.datetime(2026, 4, 10, 12, 0, tzinfo=UTC)


def t(day: int, hour: int, minute: int = 0, second: int = 0) -> dt.datetime:
    return dt.datetime(2026, 3, day, hour, minute, second, tzinfo=UTC)


def _event(machine: Machine, at: dt.datetime, kind: str, old: str, new: str) -> None:
    ev = MachineEvent.objects.create(machine=machine, kind=kind, from_status=old, to_status=new)
    MachineEvent.objects.filter(pk=ev.pk).update(at=at)  # `at` is auto_now_add


def _session(
    machine: Machine,
    owner: User,
    *,
    created: dt.datetime,
    started: dt.datetime | None,
    activity: dt.datetime | None,
    ended: dt.datetime,
    reason: EndReason,
    verified: bool | None = True,
) -> ComputeSession:
    s = ComputeSession.objects.create(
        owner=owner,
        machine=machine,
        state=SessionState.ENDED if started else SessionState.FAILED,
        end_reason=reason,
        duration_minutes=240,
        expires_at=created + dt.timedelta(hours=4),
        started_at=started,
        ended_at=ended,
        last_activity=activity,
        cleanup_verified=verified,
        cleanup_finished_at=ended + dt.timedelta(minutes=1),
    )
    ComputeSession.objects.filter(pk=s.pk).update(created_at=created)
    return s


def build(owner: User, other: User) -> Lab:
    lab = Lab.objects.create(name="Physics", timezone="Europe/Berlin")
    for day in range(7):
        AvailabilityWindow.objects.create(lab=lab, weekday=day, start=dt.time(8), end=dt.time(20))
    AvailabilityWindow.objects.create(lab=lab, weekday=5, start=dt.time(20), end=dt.time(0))
    AvailabilityWindow.objects.create(lab=lab, weekday=6, start=dt.time(0), end=dt.time(4))
    # Another lab's machine and refusal must not leak into Physics.
    elsewhere = Lab.objects.create(name="Chemistry", timezone="UTC")
    Machine.objects.create(name="chem-1", lab=elsewhere, status=MachineStatus.AVAILABLE)

    a = Machine.objects.create(name="pc-a", lab=lab, status=MachineStatus.AVAILABLE)
    b = Machine.objects.create(name="pc-b", lab=lab, status=MachineStatus.AVAILABLE)
    Machine.objects.filter(lab=lab).update(created_at=dt.datetime(2026, 1, 1, tzinfo=UTC))
    for m in (a, b):
        _event(m, dt.datetime(2026, 3, 1, tzinfo=UTC), "online", "offline", "available")
    # The owner at pc-a, Fri 10:00-11:30 CET: presence rows and the status changes they cause.
    _event(a, t(27, 9), "owner_present", "available", "available")
    _event(a, t(27, 9), "presence", "available", "owner_present")
    _event(a, t(27, 10, 30), "owner_left", "owner_present", "owner_present")
    _event(a, t(27, 10, 30), "presence", "owner_present", "available")
    # pc-b offline for the whole local Saturday (00:00 CET = 23:00 UTC the day before).
    _event(b, t(27, 23), "offline", "available", "offline")
    _event(b, t(28, 23), "online", "offline", "available")
    # Session churn (reserved, busy, cleaning) does not change availability.
    _event(b, t(27, 13), "reserved", "available", "reserved")
    _event(b, t(27, 13, 0, 20), "status", "reserved", "busy")
    _event(b, t(27, 15), "status", "busy", "cleaning")
    _event(b, t(27, 15, 0, 30), "status", "cleaning", "available")

    physics, chem = Group.objects.create(name="physics"), Group.objects.create(name="chem")
    owner.groups.add(physics)
    other.groups.add(physics, chem)

    _session(
        a, owner, created=t(20, 9), started=t(20, 9, 1), activity=t(20, 10),
        ended=t(20, 11), reason=EndReason.USER,
    )  # fmt: skip
    _session(
        a, owner, created=t(28, 21), started=t(28, 21, 1), activity=t(29, 1, 31),
        ended=t(29, 1, 45), reason=EndReason.IDLE,
    )  # fmt: skip
    _session(
        b, other, created=t(27, 13), started=t(27, 13, 0, 20), activity=t(27, 14, 30, 20),
        ended=t(27, 15), reason=EndReason.USER,
    )  # fmt: skip
    _session(
        a, owner, created=t(30, 7), started=None, activity=None, ended=t(30, 7, 2),
        reason=EndReason.START_FAILED, verified=None,
    )  # fmt: skip
    _session(
        b, other, created=t(30, 8), started=t(30, 8, 1, 30), activity=t(30, 8, 31, 30),
        ended=t(30, 9), reason=EndReason.EXPIRED, verified=False,
    )  # fmt: skip

    for user, at, where in (
        (owner, t(30, 7, 15), lab),
        (other, t(30, 7, 40), lab),
        (owner, t(27, 17, 10), lab),
        (owner, t(26, 12), lab),  # Thu: before the period
        (other, t(30, 12), None),  # any lab
        (other, t(30, 12), elsewhere),
    ):
        UnmetRequest.objects.create(user=user, at=at, lab=where)
    return lab


EXPECTED: dict[str, Any] = {
    "lab": "Physics",
    "hours_available": 92.5,
    "hours_leased": 7.7833,  # 4.75 + 2 + 2/60 + 1
    "hours_used": 6.5,
    "sessions": 4,
    "end_reasons": {"idle": 1, "user": 1, "start_failed": 1, "expired": 1},
    "unmet_requests": 3,
    "timezone": "Europe/Berlin",
    "idle_hours_reclaimed": 0.0703,  # 6.5 / 92.5
    "time_to_ready_median_s": 60.0,
    "time_to_ready_p90_s": 90.0,
    "wipe_failures": 1,
    "waiting_users": 2,
}
EXPECTED_DAYS = [
    # date, available, leased, used
    ("2026-03-27", 22.5, 2.0, 1.5),
    ("2026-03-28", 16.0, 2.0, 1.9833),
    ("2026-03-29", 30.0, 2.75, 2.5167),
    ("2026-03-30", 24.0, 1.0333, 0.5),
]
EXPECTED_MACHINES = [
    # name, available, leased, used, sessions, wipe failures
    ("pc-a", 53.5, 4.7833, 4.5, 2, 0),
    ("pc-b", 39.0, 3.0, 2.0, 2, 1),
]
# Local (weekday, hour) -> hours used.
EXPECTED_USE_BY_HOUR = {
    (4, 14): round(3580 / 3600, 4),  # S2 ready 14:00:20 CET
    (4, 15): round(1820 / 3600, 4),
    (5, 22): round(59 / 60, 4),
    (5, 23): 1.0,
    (6, 0): 1.0,
    (6, 1): 1.0,
    (6, 3): round(31 / 60, 4),
    (0, 10): 0.5,
}
EXPECTED_UNMET_BY_HOUR = {(0, 9): 2, (4, 18): 1}
