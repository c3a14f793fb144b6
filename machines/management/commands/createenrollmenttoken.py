from __future__ import annotations

import shlex
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from machines.services import enrollment_token_create, lab_get_or_create
from nexcompute.errors import ServiceError


class Command(BaseCommand):
    help = (
        "Create a join token for a lab (the lab is created if missing): one-time by default, "
        "--uses N for imaging a whole lab."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--lab", required=True, help="lab name")
        parser.add_argument(
            "--ttl-hours",
            type=float,
            default=settings.NEXCOMPUTE_ENROLLMENT_TOKEN_TTL_HOURS,
            help="hours until the token expires",
        )
        parser.add_argument(
            "--uses",
            type=int,
            default=1,
            help="how many computers may enroll with it (e.g. a whole lab being imaged)",
        )
        parser.add_argument(
            "--reclaim",
            action="store_true",
            help="a computer that enrolled in this lab before (same machine id, e.g. "
            "re-imaged) takes back its machine record instead of becoming a new machine",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        lab_name = options["lab"].strip()
        if not lab_name:
            raise CommandError("--lab must not be empty")
        lab = lab_get_or_create(name=lab_name)
        try:
            token, clear = enrollment_token_create(
                lab=lab,
                ttl_hours=options["ttl_hours"],
                uses=options["uses"],
                reclaim=options["reclaim"],
            )
        except ServiceError as exc:
            raise CommandError(exc.detail) from exc
        server = shlex.quote(settings.NEXCOMPUTE_PUBLIC_URL)
        uses = "usable once" if token.max_uses == 1 else f"usable by {token.max_uses} computers"
        if token.reclaim:
            uses += ", re-imaged computers take back their records"
        self.stdout.write(
            f"# Join token for lab {lab.name!r}, valid until {token.expires_at:%Y-%m-%d %H:%M} UTC,"
            f" {uses}. On the lab computer run:"
        )
        # --token=T: tokens never start with '-', but the = form is safe whatever they hold.
        self.stdout.write(f"nexcompute-agent enroll --server {server} --token={clear}")
        self.stdout.write(clear)
