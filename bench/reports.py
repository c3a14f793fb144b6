#!/usr/bin/env python
"""Staff reports benchmark: a year of synthetic history for a 500-machine fleet.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/nexcompute .venv/bin/python bench/reports.py \
        [--machines 500] [--days 365] [--runs 5] [--keep]

It creates its own database (``<name>_reportbench``, dropped afterwards unless ``--keep``),
migrates it and fills it in SQL: 5 labs (Europe/Berlin, with weekday windows 08:00–22:00),
the machines, 2,000 students, two sessions per machine per day (each with the four status
rows a session leaves: reserved, busy, cleaning, available), a night offline per machine per
week, unmet requests, and the load history as the downsampling keeps it (1-minute rows for
the last week, packed days of 15-minute points back to 92 days, of hourly points before).

Runs the reports' rollup over the whole history (the backfill a first nightly run does) and
one nightly run, prints the storage of the load history, the rollups and the whole database,
then the median time of: the utilisation overview page for the last whole month (all labs,
every chart and table, rendered by a staff client), the API's JSON for that month, the same
month's figures computed live without the rollups, this month's overview so far (today
computed live) and a machine's page with a week of 1-minute load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time

from _common import bench_database_url, drop_database, fresh_django

LABS = ["Physics", "Chemistry", "Biology", "Maths", "Library"]


def fill(machines: int, days: int, now: dt.datetime, *, load: bool = True) -> None:
    from django.contrib.auth.hashers import make_password
    from django.db import connection

    from accounts.models import User
    from machines.models import AvailabilityWindow, Lab, Machine

    labs = []
    for name in LABS:
        lab = Lab.objects.create(name=name, timezone="Europe/Berlin")
        for weekday in range(5):
            AvailabilityWindow.objects.create(
                lab=lab, weekday=weekday, start=dt.time(8), end=dt.time(22)
            )
        labs.append(lab)
    start = now - dt.timedelta(days=days)
    Machine.objects.bulk_create(
        Machine(
            name=f"pc{n:04d}",
            lab=labs[n % len(labs)],
            status="available",
            memory_bytes=16 * 1024**3,
            agent_version="0.1.0",
        )
        for n in range(machines)
    )
    Machine.objects.update(created_at=start - dt.timedelta(days=1))
    password = make_password("x")
    User.objects.bulk_create(
        User(username=f"student{n:04d}", password=password) for n in range(2000)
    )
    with connection.cursor() as cur:
        cur.execute("SELECT min(id), max(id) FROM accounts_user")
        umin, umax = cur.fetchone()
        steps = [
            # Sessions: two a day per machine, 09:xx and 14:xx UTC.
            f"""
            INSERT INTO compute_sessions_computesession (
                owner_id, machine_id, state, end_reason, requirements, duration_minutes,
                created_at, started_at, expires_at, ended_at, jupyter_url, jupyter_token,
                last_activity, kernels_busy, connections, cleanup_verified, files_removed,
                bytes_removed, processes_killed, cleanup_finished_at, cleanup_details,
                cleanup_checks, cleanup_account)
            SELECT {umin} + floor(random() * ({umax} - {umin} + 1))::int, m.id, 'ended',
                (ARRAY['user','expired','idle','owner_returned','user','user'])
                    [1 + floor(random() * 6)::int],
                '{{}}', 120, c, c + interval '30 seconds' + random() * interval '30 seconds',
                c + interval '2 hours', c + interval '90 minutes', '', '',
                c + interval '60 minutes', 0, 0, random() > 0.001, 10, 1000, 1,
                c + interval '91 minutes', '[]', '[]', ''
            FROM machines_machine m,
                 generate_series(%s::timestamptz, %s::timestamptz, interval '1 day') d,
                 LATERAL (VALUES
                    (d + interval '9 hours' + random() * interval '50 minutes'),
                    (d + interval '14 hours' + random() * interval '50 minutes')) AS s(c)
            """,
            # The four status rows each session leaves (the report skips them in SQL).
            """
            INSERT INTO machines_machineevent
                (machine_id, at, kind, from_status, to_status, message)
            SELECT s.machine_id, s.created_at + e.off, e.kind, e.old, e.new, ''
            FROM compute_sessions_computesession s,
                 (VALUES (interval '0', 'reserved', 'available', 'reserved'),
                         (interval '40 seconds', 'status', 'reserved', 'busy'),
                         (interval '90 minutes', 'status', 'busy', 'cleaning'),
                         (interval '91 minutes', 'status', 'cleaning', 'available')
                 ) AS e(off, kind, old, new)
            """,
            # A night offline a week per machine.
            """
            INSERT INTO machines_machineevent
                (machine_id, at, kind, from_status, to_status, message)
            SELECT m.id, w + e.off, e.kind, e.old, e.new, ''
            FROM machines_machine m,
                 generate_series(%s::timestamptz, %s::timestamptz, interval '7 days') w,
                 (VALUES (interval '22 hours', 'offline', 'available', 'offline'),
                         (interval '30 hours', 'online', 'offline', 'available'))
                 AS e(off, kind, old, new)
            """,
            # Unmet demand: a few refusals a day per lab, at busy hours.
            f"""
            INSERT INTO compute_sessions_unmetrequest (user_id, at, lab_id, gpu, min_memory_gb)
            SELECT {umin} + floor(random() * ({umax} - {umin} + 1))::int,
                   d + interval '9 hours' + random() * interval '8 hours', l.id, false, 0
            FROM machines_lab l,
                 generate_series(%s::timestamptz, %s::timestamptz, interval '2 hours') d
            WHERE random() < 0.3
            """,
        ]
        for sql in steps:
            n = sql.count("%s") // 2
            cur.execute(sql, [start, now] * n)
        # The load history as the ageing leaves it: packed days of hourly points, then of
        # 15-minute points, then 1-minute rows for the last week.
        if load:
            minute_from = dt.datetime.combine(
                (now - dt.timedelta(days=7)).date(), dt.time(0), dt.UTC
            )
            quarter_from = (now - dt.timedelta(days=92)).date()
            for resolution, first_day, end_day in (
                (3600, start.date(), quarter_from),
                (900, max(start.date(), quarter_from), minute_from.date()),
            ):
                if first_day >= end_day:
                    continue
                samples = resolution // 10  # 10 s heartbeats
                cur.execute(
                    """
                    INSERT INTO reports_machineloadday (machine_id, day, resolution, points)
                    SELECT m.id, d::date, %s,
                           string_agg(int2send(s::int2) || int4send(%s)
                                      || float8send(%s * random() * 100)
                                      || float8send(%s * random() * 100)
                                      || int4send(0) || float8send(0), ''::bytea ORDER BY s)
                    FROM machines_machine m,
                         generate_series(%s::date, %s::date - 1, interval '1 day') d,
                         generate_series(0, 86400 / %s - 1) s
                    GROUP BY m.id, d
                    """,
                    [resolution, samples, samples, samples, first_day, end_day, resolution],
                )
            cur.execute(
                """
                INSERT INTO reports_machineload (machine_id, resolution, at, samples, cpu_sum,
                    memory_sum, gpu_samples, gpu_sum)
                SELECT m.id, 60, t, 6, 6 * random() * 100, 6 * random() * 100, 0, 0
                FROM machines_machine m,
                     generate_series(%s::timestamptz, %s::timestamptz - interval '1 second',
                                     interval '1 minute') t
                """,
                [max(start, minute_from), now],
            )
        cur.execute("ANALYZE")


def size(table: str) -> tuple[int, int]:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(f"SELECT pg_total_relation_size('{table}'), count(*) FROM {table}")
        total, rows = cur.fetchone()
    return int(total), int(rows)


def timed(fn: object, runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machines", type=int, default=500)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--reuse", action="store_true", help="reuse a kept database")
    parser.add_argument(
        "--fill-only",
        action="store_true",
        help="fill and keep the database, measure nothing (then --reuse: the fill takes minutes)",
    )
    parser.add_argument(
        "--skip-load", action="store_true", help="no load history (times the reports only)"
    )
    args = parser.parse_args()
    url = bench_database_url("reportbench")
    if args.reuse:
        import os

        import django

        os.environ["DATABASE_URL"] = url
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nexcompute.settings")
        django.setup()
    else:
        fresh_django(url)
    try:
        from django.conf import settings
        from django.db import connection
        from django.test import Client
        from django.utils import timezone

        from accounts.models import User
        from machines.models import Machine

        settings.ALLOWED_HOSTS = ["testserver", *settings.ALLOWED_HOSTS]
        now = timezone.now().replace(minute=0, second=0, microsecond=0)
        t0 = time.perf_counter()
        if not args.reuse:
            fill(args.machines, args.days, now, load=not args.skip_load)
        print(
            f"filled {args.machines} machines x {args.days} days "
            f"in {time.perf_counter() - t0:.0f} s"
        )
        with connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM compute_sessions_computesession")
            sessions = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM machines_machineevent")
            events = cur.fetchone()[0]
            cur.execute("SELECT pg_database_size(current_database())")
            db_bytes = cur.fetchone()[0]
        load_bytes, minute_rows = size("reports_machineload")
        day_bytes, day_rows = size("reports_machineloadday")
        with connection.cursor() as cur:
            cur.execute("SELECT coalesce(sum(length(points)), 0) / 34 FROM reports_machineloadday")
            packed_points = int(cur.fetchone()[0])
        load_bytes += day_bytes
        load_rows = minute_rows + packed_points
        mib = 1024 * 1024
        print(
            f"load history ({args.days} days): {load_rows:,} points ({minute_rows:,} 1-minute "
            f"rows, {packed_points:,} in {day_rows:,} packed days), {load_bytes / mib:.0f} MiB "
            f"with indexes ({load_bytes / args.machines / mib:.2f} MiB per machine, "
            f"{load_bytes / max(load_rows, 1):.0f} bytes per point)"
        )
        print(
            f"sessions {sessions:,}, machine status rows {events:,}; "
            f"whole database {db_bytes / mib:.0f} MiB"
        )

        if args.fill_only:
            args.keep = True
            return 0

        from reports.figures import report
        from reports.models import LabDayRollup
        from reports.rollup import rollup

        if args.reuse and LabDayRollup.objects.exists():
            print(f"rollups kept: {LabDayRollup.objects.count():,} lab days")
        else:
            t0 = time.perf_counter()
            stored = rollup(now=timezone.now())
            print(
                f"rollup backfill: {stored:,} lab days in {time.perf_counter() - t0:.1f} s "
                f"({LabDayRollup.objects.count():,} stored)"
            )
        t0 = time.perf_counter()
        stored = rollup(now=timezone.now())
        print(
            f"nightly rollup run (the last {settings.NEXCOMPUTE_REPORT_ROLLUP_RECENT_DAYS} days "
            f"of every lab): {stored} lab days in {time.perf_counter() - t0:.2f} s"
        )
        rollup_bytes, rollup_rows = size("reports_labdayrollup")
        print(f"rollup storage: {rollup_rows:,} lab days, {rollup_bytes / mib:.1f} MiB")

        staff, _ = User.objects.get_or_create(
            username="bench-staff", defaults={"is_staff": True, "is_superuser": True}
        )
        client = Client()
        client.force_login(staff)
        today = timezone.localdate()
        last = today.replace(day=1) - dt.timedelta(days=1)
        first = last.replace(day=1)
        period = {"start": first.isoformat(), "end": last.isoformat()}

        def overview() -> None:
            resp = client.get("/admin/reports/", period)
            assert resp.status_code == 200, resp.status_code
            assert resp.content.count(b'data-chart="hours-by-day"') == len(LABS)

        def api() -> None:
            resp = client.get(
                "/api/reports/utilisation", {"from": period["start"], "to": period["end"]}
            )
            assert resp.status_code == 200, resp.content[:200]

        machine = Machine.objects.order_by("pk").first()
        assert machine is not None

        def machine_page() -> None:
            week = {"start": (today - dt.timedelta(days=6)).isoformat(), "end": today.isoformat()}
            resp = client.get(f"/admin/reports/machine/{machine.pk}/", week)
            assert resp.status_code == 200

        overview()  # warm (templates, connections)
        med, worst = timed(overview, args.runs)
        print(
            f"month overview ({first}..{last}, {args.machines} machines, all labs): "
            f"median {med:.3f} s, max {worst:.3f} s over {args.runs} runs (target < 1 s)"
        )
        med, worst = timed(api, args.runs)
        print(f"month API JSON: median {med:.3f} s, max {worst:.3f} s")
        med, worst = timed(lambda: report(first, last, detail=False, rollups=False), args.runs)
        print(f"month figures computed live (no rollups): median {med:.3f} s, max {worst:.3f} s")
        this_month = {"start": today.replace(day=1).isoformat(), "end": today.isoformat()}

        def current() -> None:
            resp = client.get("/admin/reports/", this_month)
            assert resp.status_code == 200, resp.status_code

        med, worst = timed(current, args.runs)
        print(
            f"overview of this month so far (today computed live): median {med:.3f} s, "
            f"max {worst:.3f} s"
        )
        med, worst = timed(machine_page, args.runs)
        print(f"machine page, a week of 1-minute load: median {med:.3f} s, max {worst:.3f} s")
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            drop_database(url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
