"""Project-level Celery tasks."""

from __future__ import annotations

import time

from celery import shared_task


@shared_task(ignore_result=True)
def beat_heartbeat() -> None:
    """Beat's proof of life for /readyz: beat sends it, a worker runs it, Redis keeps the time
    (an hour at most: an old value must not outlive a Redis that forgot beat)."""
    from nexcompute.ops import BEAT_KEY, redis_client

    redis_client().set(BEAT_KEY, repr(time.time()), ex=3600)
