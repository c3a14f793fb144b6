from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandParser

from accounts.models import STAFF_GROUP, STUDENT_GROUP, User
from accounts.services import default_policy


class Command(BaseCommand):
    help = "Create the demo accounts `admin` (staff) and `student` if missing; print passwords."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--password", default="", help="use this password for new accounts (default: random)"
        )
        parser.add_argument(
            "--reset",
            action="store_true",
            help="also set --password on existing demo accounts (make run prints it)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        default_policy()
        staff, _ = Group.objects.get_or_create(name=STAFF_GROUP)
        students, _ = Group.objects.get_or_create(name=STUDENT_GROUP)
        for username, is_staff, group in (("admin", True, staff), ("student", False, students)):
            existing = User.objects.filter(username=username).first()
            if existing is not None:
                if options["reset"] and options["password"]:
                    existing.set_password(options["password"])
                    existing.save(update_fields=["password"])
                    self.stdout.write(f"{username}: exists, password reset")
                else:
                    self.stdout.write(f"{username}: exists (password unchanged)")
                continue
            password = options["password"] or secrets.token_urlsafe(9)
            user = User.objects.create_user(
                username=username,
                password=password,
                is_staff=is_staff,
                is_superuser=is_staff,
            )
            user.groups.add(group)
            self.stdout.write(f"{username}: created, password {password}")
