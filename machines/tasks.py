from __future__ import annotations

import datetime as dt

from celery import shared_task
from django.conf import settings

from machines.services import machines_mark_silent_offline


@shared_task(acks_late=True, ignore_result=True)
def mark_silent_machines_offline() -> int:
    """Backstop for a server process that died without closing its agents' sockets.

    The agent link writes ``last_seen`` at least every NEXCOMPUTE_METRICS_WRITE_SECONDS, so a
    machine silent for that plus the grace has no live socket anywhere. Safe to run twice: the
    status change is a conditional UPDATE.
    """
    older = settings.NEXCOMPUTE_METRICS_WRITE_SECONDS + settings.NEXCOMPUTE_OFFLINE_GRACE_SECONDS
    return machines_mark_silent_offline(older_than=dt.timedelta(seconds=older))
