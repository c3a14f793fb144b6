from __future__ import annotations

import difflib
import shlex
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from machines.models import Lab
from machines.services import enrollment_token_create, lab_get_or_create
from nexcompute.errors import ServiceError


class Command(BaseCommand):
    help = (
        "Create a one-time join token for a lab. A lab not yet known is an error (a typo must "
        "not make a new lab) unless --create-lab, or unless there is no lab at all yet."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--lab", required=True, help="lab name")
        parser.add_argument(
            "--create-lab", action="store_true", help="create the lab if it does not exist"
        )
        parser.add_argument(
            "--ttl-hours",
            type=float,
            default=settings.NEXCOMPUTE_ENROLLMENT_TOKEN_TTL_HOURS,
            help="hours until the token expires",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        lab_name = options["lab"].strip()
        if not lab_name:
            raise CommandError("--lab must not be empty")
        known = list(Lab.objects.order_by("name").values_list("name", flat=True))
        # CONTRACT: "The lab is created if missing". Kept for a fresh install (no lab at all,
        # so no typo is possible) and with --create-lab; once labs exist, an unknown name is
        # almost always a typo, which used to create a stray lab silently.
        if known and lab_name not in known and not options["create_lab"]:
            close = difflib.get_close_matches(lab_name, known, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise CommandError(
                f"no lab named {lab_name!r}.{hint} Known labs: {', '.join(known)}. "
                "Add --create-lab to create it."
            )
        if lab_name not in known:
            self.stderr.write(f"creating lab {lab_name!r}")
        lab = lab_get_or_create(name=lab_name)
        try:
            token, clear = enrollment_token_create(lab=lab, ttl_hours=options["ttl_hours"])
        except ServiceError as exc:
            raise CommandError(exc.detail) from exc
        server = shlex.quote(settings.NEXCOMPUTE_PUBLIC_URL)
        self.stdout.write(
            f"# Join token for lab {lab.name!r}, valid until {token.expires_at:%Y-%m-%d %H:%M} UTC,"
            " usable once. On the lab computer run:"
        )
        # --token=T: tokens never start with '-', but the = form is safe whatever they hold.
        self.stdout.write(f"nexcompute-agent enroll --server {server} --token={clear}")
        self.stdout.write(clear)
