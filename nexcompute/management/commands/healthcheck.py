"""`python manage.py healthcheck [CHECK ...]`: the /readyz checks from a shell, for container
health checks of processes that serve no HTTP (Celery worker and beat). Exit 0 when all pass."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from nexcompute.ops import CHECKS


class Command(BaseCommand):
    help = "Run /readyz's checks (database, redis, beat, worker); exit 1 if one fails."
    requires_system_checks: list[str] = []  # quick, every 30 s

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("checks", nargs="*", choices=sorted(CHECKS), metavar="CHECK")

    def handle(self, *args: Any, **options: Any) -> None:
        failed = []
        for name in options["checks"] or list(CHECKS):
            try:
                problem = CHECKS[name]()
            except Exception as exc:  # noqa: BLE001 - a failing check is the answer
                problem = f"{type(exc).__name__}: {exc}"
            self.stdout.write(f"{name}: {problem or 'ok'}")
            if problem:
                failed.append(name)
        if failed:
            raise CommandError(f"failed: {', '.join(failed)}")
