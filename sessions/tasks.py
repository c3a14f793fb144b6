"""Celery tasks of the lease policy: thin wrappers around ``sessions.policy``.

The sweeps run from the beat table (``CELERY_BEAT_SCHEDULE`` in nexcompute/settings.py). Every
one is idempotent and claims its work with conditional UPDATEs or unique INSERTs, so overlapping
beat runs, two workers and ``acks_late`` redelivery never stop a session twice nor send a
warning twice. A database hiccup is retried a few times; the next beat run would catch up anyway.
"""

from __future__ import annotations

import smtplib

from celery import shared_task
from django.db import InterfaceError, OperationalError

from sessions import notify, policy

# A lost database connection is worth a retry or two; the next beat run would catch up anyway.
_TRANSIENT = (OperationalError, InterfaceError)

# Every policy task: acknowledged after it ran (a lost worker's task is redelivered, which is
# harmless: each claims its work), retried a few times on a database hiccup.
policy_task = shared_task(
    acks_late=True,
    ignore_result=True,
    autoretry_for=_TRANSIENT,
    retry_backoff=True,
    retry_jitter=True,
    max_retries=3,
)


@policy_task
def expire_sessions() -> int:
    """Stop running sessions past ``expires_at`` (``expired``) or whose lab closed
    (``window_closed``)."""
    return policy.sweep_expiry()


@policy_task
def send_lease_warnings() -> int:
    """Warn owners before the lease ends or the lab closes, once per warning point."""
    return policy.sweep_warnings()


@policy_task
def stop_idle_sessions() -> int:
    """Warn, then stop (``idle``), sessions whose Jupyter has been idle past the policy."""
    return policy.sweep_idle()


@policy_task
def enforce_owner_returned() -> int:
    """Stop (``owner_returned``) sessions whose machine's owner has been back past the grace."""
    return policy.sweep_owner_returned()


@policy_task
def end_lost_sessions() -> int:
    """End (``agent_lost``) sessions on machines offline past the grace."""
    return policy.sweep_lost()


@policy_task
def enforce_cleanups() -> int:
    """Re-send stops without a receipt; quarantine the machine past the second deadline."""
    return policy.sweep_cleanup()


@policy_task
def enforce_starts() -> int:
    """Resend, then fail, starts that never finished; re-demand wipes that never came."""
    return policy.sweep_starts()


@shared_task(
    acks_late=True,
    ignore_result=True,
    # A database hiccup or an SMTP server that is away: the claim rolled back, try again.
    autoretry_for=(*_TRANSIENT, OSError, smtplib.SMTPException),
    retry_backoff=True,
    retry_jitter=True,
    max_retries=5,
)
def send_session_mail(session_id: int, kind: str, key: str) -> bool:
    """Mail the owner of ``session_id`` about ``kind`` (ready, ending, ended), once per
    ``key`` (``sessions.notify``); nothing for owners who did not opt in."""
    return notify.session_mail_send(session_id=session_id, kind=kind, key=key)
