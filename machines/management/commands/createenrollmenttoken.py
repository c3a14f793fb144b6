from __future__ import annotations

import shlex
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from machines.models import Lab
from machines.services import enrollment_token_create, lab_get_or_create
from nexcompute.errors import ServiceError


class Command(BaseCommand):
    help = (
        "Create a join token for a lab: one-time by default, --uses N for imaging a whole lab. "
        "A lab not yet known is created (CONTRACT), unless its name looks like a typo of a "
        "known lab's: then it is an error unless --create-lab."
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
        known = list(Lab.objects.order_by("name").values_list("name", flat=True))
        # CONTRACT: "The lab is created if missing", kept. But a name that is nearly a known
        # lab's ("Phsyics 101") is a typo far more often than a new lab, and used to create a
        # stray lab silently: that one needs --create-lab.
        close = None if lab_name in known else likely_typo_of(lab_name, known)
        if close is not None and not options["create_lab"]:
            raise CommandError(
                f"no lab named {lab_name!r}. Did you mean {close!r}? Known labs: "
                f"{', '.join(known)}. Add --create-lab to create it anyway."
            )
        if lab_name not in known:
            self.stderr.write(f"creating lab {lab_name!r}")
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


def likely_typo_of(name: str, known: list[str]) -> str | None:
    """The known lab name that ``name`` is most likely a typo of: the same but for case, spaces
    or punctuation, two swapped neighbours, or one letter left out or doubled. A different digit
    or letter ("Lab B" beside "Lab A", "Room 102" beside "Room 101") is a new lab, not a typo."""

    def plain(text: str) -> str:
        return "".join(ch for ch in text.casefold() if ch.isalnum())

    def one_letter_apart(a: str, b: str) -> bool:  # b is a with one letter more
        if len(b) != len(a) + 1:
            return False
        return any(b[:i] + b[i + 1 :] == a and b[i].isalpha() for i in range(len(b)))

    def swapped(a: str, b: str) -> bool:
        diff = [i for i in range(len(a)) if a[i] != b[i]] if len(a) == len(b) else []
        return (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and (a[diff[1]] == b[diff[0]])
        )

    wanted = plain(name)
    for lab in known:
        have = plain(lab)
        if wanted == have or swapped(wanted, have):
            return lab
        if one_letter_apart(wanted, have) or one_letter_apart(have, wanted):
            return lab
    return None
