"""``manage.py report --from 2026-01-01 --to 2026-01-31 [--lab NAME] [--format csv|json]``:
the staff report (the same figures as ``GET /api/reports/utilisation``) for cron jobs."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from machines.models import Lab
from reports.figures import report
from reports.tables import summary_table, to_csv


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise CommandError(f"not a date (YYYY-MM-DD): {value!r}") from exc


class Command(BaseCommand):
    help = "Print the utilisation report of every lab (or one) for a period, as CSV or JSON."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--from", dest="first", required=True, help="first day, YYYY-MM-DD")
        parser.add_argument("--to", dest="last", required=True, help="last day (included)")
        parser.add_argument("--lab", default=None, help="one lab, by name")
        parser.add_argument("--format", choices=["csv", "json"], default="json")

    def handle(self, *args: Any, **options: Any) -> None:
        first, last = _date(options["first"]), _date(options["last"])
        try:
            rep = report(first, last, lab=options["lab"], detail=False)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        except Lab.DoesNotExist as exc:
            raise CommandError(f"no lab named {options['lab']!r}") from exc
        if options["format"] == "csv":
            self.stdout.write(to_csv(summary_table(rep)), ending="")
        else:
            self.stdout.write(json.dumps(rep.as_json(), indent=2))
