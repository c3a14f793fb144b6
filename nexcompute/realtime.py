"""Channel-layer group names and the after-commit senders every service uses.

Messages carry dotted, feature-prefixed types (``session.updated``, ``dashboard.machines``;
the events for an agent's connection are built in ``nexcompute.agent_events``). Nothing that
must not be lost depends on a group message alone: the database is the truth, and agents and
browsers resync it when they (re)connect.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

DASHBOARD_GROUP = "dashboard"


def machine_group(machine_id: int) -> str:
    return f"machine.{machine_id}"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


def _send_now(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, message)
    except Exception:  # the push is best effort; the database already holds the truth
        log.exception("channel layer send to %s failed", group)
        from nexcompute.metrics import count_channel_failure

        count_channel_failure(group.split(".", 1)[0])


def send_on_commit(group: str, message: dict[str, Any]) -> None:
    """Send ``message`` to ``group`` once the current transaction commits (at once if none)."""
    transaction.on_commit(lambda: _send_now(group, message))


def session_updated_on_commit(user_id: int, session_id: int) -> None:
    send_on_commit(
        user_group(user_id),
        {"type": "session.updated", "session_id": session_id, "owner_id": user_id},
    )


def machine_updated_on_commit(snapshot: dict[str, Any]) -> None:
    """Tell dashboards a machine changed (status, presence); ``snapshot`` is its public view."""
    send_on_commit(DASHBOARD_GROUP, {"type": "dashboard.machines", "machines": [snapshot]})
