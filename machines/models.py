from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

if TYPE_CHECKING:
    from accounts.models import EffectivePolicy


def validate_timezone(value: str) -> None:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValidationError(f"unknown time zone {value!r}") from exc


class Lab(models.Model):
    name = models.CharField(max_length=100, unique=True)
    building = models.CharField(max_length=100, blank=True)
    room = models.CharField(max_length=50, blank=True)
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    # Cloudflare Access in front of this lab's named tunnels (optional; docs/security.md):
    # both set, or neither. The session's Jupyter then demands an Access token for the owner.
    access_team_domain = models.CharField(
        max_length=253,
        blank=True,
        help_text="Cloudflare Zero Trust team domain, e.g. myuni.cloudflareaccess.com",
    )
    access_audience = models.CharField(
        max_length=255, blank=True, help_text="The Access application's AUD tag"
    )
    # Owner presence (machines/presence.py).
    owner_idle_minutes = models.PositiveIntegerField(
        default=30,
        help_text="An owner idle (or with the screen locked) this long counts as away; 0: never.",
    )
    owner_reoffer_minutes = models.PositiveIntegerField(
        default=0,
        help_text="After the owner leaves, offer the machine again only after this many minutes.",
    )
    # Warm sandboxes (docs/sandbox.md): a free machine keeps one session sandbox ready.
    warm_pool = models.BooleanField(
        default=True,
        help_text="Free machines keep one session sandbox ready (instant connect; costs the "
        "idle Jupyter's memory). Off: none is kept, and ready ones are wiped.",
    )

    def __str__(self) -> str:
        return self.name

    @property
    def access_enabled(self) -> bool:
        return bool(self.access_team_domain and self.access_audience)

    def clean(self) -> None:
        from nexcompute_jupyter.access import team_issuer

        if bool(self.access_team_domain) != bool(self.access_audience):
            raise ValidationError("Cloudflare Access needs both the team domain and the AUD tag.")
        if self.access_team_domain:
            try:
                team_issuer(self.access_team_domain)
            except ValueError as exc:
                raise ValidationError({"access_team_domain": str(exc)}) from None

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


class AvailabilityWindow(models.Model):
    """A weekly interval, in the lab's local time, when its machines may be lent.

    A lab without any window is always open. ``end`` may be ``00:00`` to mean midnight;
    an interval may not cross midnight (add two rows instead).
    """

    class Weekday(models.IntegerChoices):
        MONDAY = 0
        TUESDAY = 1
        WEDNESDAY = 2
        THURSDAY = 3
        FRIDAY = 4
        SATURDAY = 5
        SUNDAY = 6

    lab = models.ForeignKey(Lab, on_delete=models.CASCADE, related_name="windows")
    weekday = models.IntegerField(choices=Weekday.choices)
    start = models.TimeField()
    end = models.TimeField(help_text="00:00 means midnight at the end of the day.")

    class Meta:
        ordering = ["lab", "weekday", "start"]

    def __str__(self) -> str:
        return f"{self.get_weekday_display()} {self.start:%H:%M}-{self.end:%H:%M}"

    def clean(self) -> None:
        if self.end != dt.time(0) and self.end <= self.start:
            raise ValidationError("end must be after start (use two rows across midnight)")


class ClosedDate(models.Model):
    """A whole local day on which the lab lends nothing (holiday, exams, maintenance)."""

    lab = models.ForeignKey(Lab, on_delete=models.CASCADE, related_name="closed_dates")
    date = models.DateField()
    reason = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["lab", "date"]
        constraints = [models.UniqueConstraint(fields=["lab", "date"], name="one_closure_per_day")]

    def __str__(self) -> str:
        return f"{self.lab} closed {self.date}"


class MachineStatus(models.TextChoices):
    OFFLINE = "offline"
    AVAILABLE = "available"
    RESERVED = "reserved"
    BUSY = "busy"
    CLEANING = "cleaning"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"
    OWNER_PRESENT = "owner_present"
    QUARANTINED = "quarantined"


def version_key(version: str) -> tuple[int, ...]:
    """``"0.10.2"`` → ``(0, 10, 2)``; the leading numbers of each part, for ordering agent
    versions (``"0.2.0rc1"`` → ``(0, 2, 0)``). Unreadable parts count as 0."""
    key = []
    for part in version.split(".")[:4]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        key.append(int(digits or 0))
    return tuple(key)


def current_agent_version() -> str:
    """The agent version this server ships (the ``nexcompute_agent`` package it imports)."""
    from nexcompute_agent import __version__

    return __version__


class MachineQuerySet(models.QuerySet["Machine"]):
    def usable_by(self, policy: EffectivePolicy) -> MachineQuerySet:
        """Machines a quota policy allows: its labs, and GPU machines only if it allows GPUs.
        The API, the dashboard and allocation all ask this one question."""
        qs = self
        if policy.lab_ids is not None:
            qs = qs.filter(lab_id__in=policy.lab_ids)
        if not policy.allow_gpu:
            qs = qs.filter(gpu_count=0)
        return qs

    def free(self) -> MachineQuerySet:
        """Machines that may be claimed now (the allocation index covers these columns)."""
        return self.filter(status=MachineStatus.AVAILABLE, enabled=True, draining=False)


class Machine(models.Model):
    name = models.CharField(max_length=100, unique=True)
    hostname = models.CharField(max_length=255, blank=True)
    lab = models.ForeignKey(Lab, on_delete=models.PROTECT, related_name="machines")
    status = models.CharField(
        max_length=20, choices=MachineStatus.choices, default=MachineStatus.OFFLINE
    )
    enabled = models.BooleanField(default=True, help_text="Off means maintenance.")
    draining = models.BooleanField(
        default=False, help_text="Finish the current session, then stop."
    )
    owner_present = models.BooleanField(default=False)
    # The agent reports a warm sandbox ready (heartbeat.warm): allocation prefers the machine.
    warm_ready = models.BooleanField(default=False)
    quarantine_reason = models.CharField(
        max_length=500,
        blank=True,
        help_text="Set when a wipe could not be verified; staff clear it.",
    )
    specs = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    # Denormalised from ``specs`` so allocation can filter in SQL.
    memory_bytes = models.BigIntegerField(default=0)
    gpu_count = models.PositiveIntegerField(default=0)
    last_seen = models.DateTimeField(null=True, blank=True)
    agent_version = models.CharField(max_length=50, blank=True)
    # sha256 of the lab and the host's machine id as the agent hashed it (never the id itself):
    # lets a re-imaged PC take back this record when its join token allows it.
    host_key = models.CharField(max_length=64, blank=True, db_index=True)
    credential_lookup = models.CharField(max_length=32, blank=True, db_index=True)
    credential_digest = models.CharField(max_length=64, blank=True)
    credential_revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = MachineQuerySet.as_manager()

    class Meta:
        ordering = ["lab__name", "name"]
        indexes = [
            # Allocation scans free machines; keep that a small index range scan.
            models.Index(fields=["status", "enabled", "draining"], name="machine_alloc_idx"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def agent_outdated(self) -> bool:
        """The agent is older than the one this server ships (it still works while it speaks
        the current or the previous protocol; upgrade it before the next server release)."""
        if not self.agent_version:
            return False
        return version_key(self.agent_version) < version_key(current_agent_version())

    def set_specs(self, specs: dict[str, Any]) -> None:
        self.specs = specs
        self.memory_bytes = int(specs.get("memory_bytes") or 0)
        self.gpu_count = len(specs.get("gpus") or [])


class EnrollmentToken(models.Model):
    """A join token that lab computers trade for their machine credentials: once by default,
    or up to ``max_uses`` times before ``expires_at`` (imaging a whole lab with one token)."""

    lab = models.ForeignKey(Lab, on_delete=models.CASCADE, related_name="enrollment_tokens")
    lookup = models.CharField(max_length=32, db_index=True)
    digest = models.CharField(max_length=64)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)  # first use
    machine = models.ForeignKey(
        Machine, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )  # the last machine enrolled with it
    max_uses = models.PositiveIntegerField(default=1)
    uses = models.PositiveIntegerField(default=0)
    reclaim = models.BooleanField(
        default=False,
        help_text="A host that enrolled in this lab before (same machine id, e.g. re-imaged) "
        "takes back its machine record instead of becoming a new machine.",
    )

    def __str__(self) -> str:
        return f"{self.lab} token {self.lookup}…"


class MachineEvent(models.Model):
    """Audit trail of a machine: status changes and every staff action."""

    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(auto_now_add=True, db_index=True)
    kind = models.CharField(max_length=40)
    from_status = models.CharField(max_length=20, blank=True)
    to_status = models.CharField(max_length=20, blank=True)
    message = models.CharField(max_length=500, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )

    class Meta:
        ordering = ["-at", "-pk"]
        indexes = [
            # A machine's status at a moment (the staff reports' status history) is its last
            # row before it: one index probe per machine instead of a scan of its history.
            models.Index(fields=["machine", "at"], name="machineevent_machine_at_idx"),
            # ...and whether someone sat at it then: the last presence row, which may be far
            # back behind thousands of status rows.
            models.Index(
                fields=["machine", "at"],
                condition=models.Q(kind__in=["owner_present", "owner_left"]),
                name="machineevent_presence_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.machine} {self.kind} {self.at:%Y-%m-%d %H:%M}"
