"""Warm sandboxes, the server's side (docs/sandbox.md, "Warm sandboxes"): whether a machine
should keep one, and with what. The agent keeps it (``nexcompute_agent.sessions.warm``); the
agent link tells it :func:`warm_settings` after ``welcome`` and whenever the answer changes.

A machine keeps one while warm pools are on (``NEXCOMPUTE_WARM_POOLS``, the lab's
``warm_pool``), its lab is open, and it is in service with nobody at its keyboard (the agent
also checks its own owner presence and keeps none while it runs a session). The sandbox is
built with the default quota policy's limits and terminals: sessions of users under that
policy get it; others (other limits) start cold, and the agent discards it.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.utils import timezone

from accounts.models import EffectivePolicy, QuotaPolicy
from accounts.services import default_policy
from machines import availability
from machines.models import Machine, MachineStatus
from nexcompute_agent import protocol
from sessions.services import session_limits

# Statuses in which a machine keeps no warm sandbox (the others: free, or a session's, which
# the agent handles itself).
OUT_OF_SERVICE = frozenset(
    {
        MachineStatus.DRAINING,
        MachineStatus.MAINTENANCE,
        MachineStatus.QUARANTINED,
        MachineStatus.OWNER_PRESENT,
        MachineStatus.OFFLINE,
    }
)


def warm_settings(*, machine_id: int, now: dt.datetime | None = None) -> protocol.WarmSet:
    """The ``warm.set`` for ``machine_id`` now (a fresh msgid each call)."""
    now = now or timezone.now()
    machine = Machine.objects.select_related("lab").get(pk=machine_id)
    reason = ""
    if not settings.NEXCOMPUTE_WARM_POOLS:
        reason = "warm pools are turned off on this server"
    elif not machine.lab.warm_pool:
        reason = f"lab {machine.lab.name}'s warm pool is turned off"
    elif not machine.enabled or machine.draining or machine.status in OUT_OF_SERVICE:
        reason = f"the machine is {machine.status}"
    elif machine.owner_present:
        reason = "the owner is present"
    elif availability.lab_closes_at(machine.lab_id, now) is None:
        reason = f"lab {machine.lab.name} is closed"
    if reason:
        return protocol.WarmSet(msgid=protocol.new_msgid(), enabled=False, reason=reason)
    policy = EffectivePolicy(
        [QuotaPolicy.objects.prefetch_related("labs").get(pk=default_policy().pk)]
    )
    return protocol.WarmSet(
        msgid=protocol.new_msgid(),
        enabled=True,
        limits=session_limits(policy, machine),
        terminals=policy.allow_terminals,
        nexus_url=settings.NEXCOMPUTE_PUBLIC_URL,
        max_age_seconds=max(60, settings.NEXCOMPUTE_WARM_MAX_AGE_SECONDS),
    )


def same(a: protocol.WarmSet | None, b: protocol.WarmSet) -> bool:
    """Equal but for the msgid."""
    return a is not None and a.model_dump(exclude={"msgid"}) == b.model_dump(exclude={"msgid"})
