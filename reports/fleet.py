"""The fleet at a glance (admin's first page): machines by status per lab, live sessions,
quarantines needing action and agents older than this server's."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from django.db.models import Count
from packaging.version import InvalidVersion, Version

from machines.models import Machine, MachineStatus
from nexcompute_agent import __version__ as SERVER_AGENT_VERSION
from sessions.models import ComputeSession


def is_outdated(version: str, current: str = SERVER_AGENT_VERSION) -> bool:
    """True for a version older than ``current``; unknown or unparsable versions are not
    called outdated (they are listed as unknown instead)."""
    try:
        return Version(version) < Version(current)
    except InvalidVersion:
        return False


@dataclass
class Fleet:
    statuses: list[str]
    by_lab: list[dict[str, Any]]
    live_sessions: list[ComputeSession]
    live_count: int
    quarantined: list[Machine]
    outdated: list[Machine]
    unknown_version: int
    current_version: str


def fleet_overview(limit: int = 20) -> Fleet:
    statuses = [s.value for s in MachineStatus]
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for row in Machine.objects.values("lab__name", "status").annotate(n=Count("pk")).order_by():
        counts[row["lab__name"]][row["status"]] = row["n"]
    by_lab = [
        {
            "lab": lab,
            "cells": [(s, counts[lab].get(s, 0)) for s in statuses],
            "total": sum(counts[lab].values()),
        }
        for lab in sorted(counts)
    ]
    live = ComputeSession.objects.live().select_related("owner", "machine").order_by("created_at")
    versions = list(
        Machine.objects.filter(credential_revoked_at__isnull=True)
        .select_related("lab")
        .only("pk", "name", "agent_version", "lab__name", "status")
    )
    return Fleet(
        statuses=statuses,
        by_lab=by_lab,
        live_sessions=list(live[:limit]),
        live_count=live.count(),
        quarantined=list(
            Machine.objects.exclude(quarantine_reason="").select_related("lab").order_by("name")
        ),
        outdated=[m for m in versions if m.agent_version and is_outdated(m.agent_version)],
        unknown_version=sum(1 for m in versions if not m.agent_version),
        current_version=SERVER_AGENT_VERSION,
    )
