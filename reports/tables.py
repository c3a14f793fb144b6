"""Every table of the staff pages, defined once: the HTML pages, their CSV exports, the API's
CSV and ``manage.py report`` all come from here."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reports.figures import END_REASON_KEYS, Report

WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
SUMMARY_SCALARS = [
    "hours_available",
    "hours_leased",
    "hours_used",
    "idle_hours_reclaimed",
    "sessions",
    "unmet_requests",
    "waiting_users",
    "time_to_ready_median_s",
    "time_to_ready_p90_s",
    "wipe_failures",
    "timezone",
]


@dataclass(frozen=True)
class Table:
    slug: str
    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    note: str = ""


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    for row in table.rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def summary_table(rep: Report) -> Table:
    """One row per lab: the API's JSON, flattened (``end_reason_<reason>`` columns)."""
    columns = ["from", "to", "lab", *SUMMARY_SCALARS, *(f"end_reason_{k}" for k in END_REASON_KEYS)]
    rows = []
    for lab in rep.labs:
        s = lab.summary()
        rows.append(
            [
                rep.first.isoformat(),
                rep.last.isoformat(),
                lab.lab,
                *(s[k] for k in SUMMARY_SCALARS),
                *(s["end_reasons"].get(k, 0) for k in END_REASON_KEYS),
            ]
        )
    return Table("labs", "Labs", columns, rows)


def tables(rep: Report) -> list[Table]:
    labs = rep.labs
    out = [summary_table(rep)]
    out.append(
        Table(
            "days",
            "Hours by day",
            ["lab", "date", "hours_available", "hours_leased", "hours_used"],
            [
                [
                    lab.lab,
                    d["date"].isoformat(),
                    d["hours_available"],
                    d["hours_leased"],
                    d["hours_used"],
                ]
                for lab in labs
                for d in lab.days
            ],
        )
    )
    out.append(
        Table(
            "end_reasons",
            "Sessions by end reason",
            ["lab", "end_reason", "sessions"],
            [[lab.lab, k, n] for lab in labs for k, n in lab.end_reasons.items()],
        )
    )
    out.append(
        Table(
            "unmet",
            "Unmet demand: requests refused for \u201cno machine fits\u201d, by local hour of week",
            ["lab", "weekday", "hour", "requests"],
            [
                [lab.lab, WEEKDAYS[d], h, n]
                for lab in labs
                for d, row in enumerate(lab.unmet_by_hour_of_week)
                for h, n in enumerate(row)
                if n
            ],
            note=f"Requests for any lab (counted in UTC): {rep.unmet_any_lab}.",
        )
    )
    out.append(
        Table(
            "machines",
            "Machines",
            [
                "lab",
                "machine",
                "hours_available",
                "hours_leased",
                "hours_used",
                "sessions",
                "wipe_failures",
            ],
            [
                [
                    lab.lab,
                    m.name,
                    m.hours_available,
                    m.hours_leased,
                    m.hours_used,
                    m.sessions,
                    m.wipe_failures,
                ]
                for lab in labs
                for m in lab.machines
            ],
        )
    )
    privacy = (
        "Staff only. Names of people are personal data: use these figures to plan capacity, "
        "not to watch individuals, and do not pass them on."
    )
    out.append(
        Table(
            "top_users",
            "Top users by leased hours",
            ["lab", "user", "hours", "sessions"],
            [
                [lab.lab, u["user"], u["hours"], u["sessions"]]
                for lab in labs
                for u in lab.top_users
            ],
            note=privacy,
        )
    )
    out.append(
        Table(
            "top_groups",
            "Top groups by leased hours",
            ["lab", "group", "hours"],
            [[lab.lab, g["group"], g["hours"]] for lab in labs for g in lab.top_groups],
            note=privacy + " A user in several groups counts in each.",
        )
    )
    out.append(
        Table(
            "weekly_quota",
            "Weekly quota use (all labs; quota weeks start Monday 00:00 UTC)",
            ["week", "users", "hours", "users_over_80_percent", "users_at_quota"],
            [
                [
                    w["week"].isoformat(),
                    w["users"],
                    w["hours"],
                    w["users_over_80_percent"],
                    w["users_at_quota"],
                ]
                for w in rep.weekly_quota
            ],
        )
    )
    return out
