"""``manage.py createaccessapp --lab LAB --team T --domain D --allow-email-domain E``: create the
lab's Cloudflare Access application and policy and store its AUD tag on the lab. The API token
comes from ``CLOUDFLARE_API_TOKEN`` (never an argument: argv shows in ``ps``)."""

from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from machines.cloudflare_access import (
    API_URL,
    AccessApiError,
    CloudflareAccessApi,
    lab_access_provision,
)
from machines.models import Lab


class Command(BaseCommand):
    help = "Create a Cloudflare Access application for a lab's named tunnels."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--lab", required=True)
        parser.add_argument("--team", required=True, help="e.g. myuni.cloudflareaccess.com")
        parser.add_argument("--domain", required=True, help="e.g. *.lab1.example.edu")
        parser.add_argument("--account-id", required=True)
        parser.add_argument("--allow-email-domain", action="append", required=True)
        parser.add_argument("--api-url", default=API_URL)

    def handle(self, *args: Any, **opts: Any) -> None:
        token = os.environ.get("CLOUDFLARE_API_TOKEN", "")
        if not token:
            raise CommandError("set CLOUDFLARE_API_TOKEN (an API token with Access: Apps edit)")
        lab = Lab.objects.filter(name=opts["lab"]).first()
        if lab is None:
            raise CommandError(f"no lab named {opts['lab']!r}")
        api = CloudflareAccessApi(
            api_token=token, account_id=opts["account_id"], api_url=opts["api_url"]
        )
        try:
            app = lab_access_provision(
                lab=lab,
                api=api,
                team_domain=opts["team"],
                domain=opts["domain"],
                allow_email_domains=opts["allow_email_domain"],
            )
        except (AccessApiError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Access application {app.id} for {app.domain}")
        self.stdout.write(f"lab {lab.name}: AUD tag {app.aud}")
