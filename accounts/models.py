from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib.auth.models import AbstractUser, Group
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

if TYPE_CHECKING:
    from machines.models import Lab

STAFF_GROUP = "staff"
STUDENT_GROUP = "student"


class User(AbstractUser):
    """Custom user from the first migration; roles come from groups (``student``, ``staff``)."""

    # The profile page (/accounts/profile/). Mail is opt-in: nothing is sent without it.
    email_notifications = models.BooleanField(
        default=False,
        help_text="E-mail when a session is ready, is about to end, and has ended (with the "
        "wipe receipt).",
    )
    time_zone = models.CharField(
        max_length=64,
        blank=True,
        help_text="IANA zone for times on the pages and in mails; empty: the browser's zone "
        "on the pages, the lab's zone in mails.",
    )

    @property
    def role(self) -> str:
        if self.is_staff or self.groups.filter(name=STAFF_GROUP).exists():
            return STAFF_GROUP
        return STUDENT_GROUP


class QuotaPolicy(models.Model):
    """What members of a group may use. Users in no policy group get the default policy."""

    name = models.CharField(max_length=100, unique=True)
    group = models.OneToOneField(
        Group, null=True, blank=True, on_delete=models.CASCADE, related_name="quota_policy"
    )
    is_default = models.BooleanField(
        default=False, help_text="Applies to users whose groups have no policy."
    )
    max_concurrent_sessions = models.PositiveIntegerField(default=1)
    max_session_minutes = models.PositiveIntegerField(default=240)
    max_hours_per_week = models.PositiveIntegerField(default=20)
    allow_gpu = models.BooleanField(default=True)
    allow_terminals = models.BooleanField(
        default=True, help_text="Jupyter terminals (a shell) inside sessions."
    )
    labs = models.ManyToManyField(
        "machines.Lab", blank=True, help_text="Labs this policy may use; none means every lab."
    )
    # Limits of one session on the machine, enforced by the agent's sandbox (docs/sandbox.md).
    memory_percent = models.PositiveSmallIntegerField(
        default=75,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="Memory of one session, in % of the machine's RAM.",
    )
    cpu_weight = models.PositiveIntegerField(
        default=20,
        validators=[MinValueValidator(1), MaxValueValidator(10000)],
        help_text="CPU share under contention (cgroup v2 scale 1..10000; 100 = a normal "
        "process). Low keeps the console responsive.",
    )
    cpu_quota = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.01), MaxValueValidator(65536)],
        help_text="At most this many CPUs' worth of time; empty: all CPUs.",
    )
    max_tasks = models.PositiveIntegerField(
        default=1024,
        validators=[MinValueValidator(16), MaxValueValidator(2**31 - 1)],
        help_text="Processes and threads of one session at once.",
    )
    workspace_gb = models.PositiveIntegerField(
        default=20,
        validators=[MinValueValidator(1), MaxValueValidator(1_000_000)],
        help_text="Size of one session's workspace, in GB.",
    )

    class Meta:
        verbose_name_plural = "quota policies"
        constraints = [
            # At most one default policy: "the" default must be unambiguous.
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="one_default_policy"
            ),
        ]

    def __str__(self) -> str:
        return self.name


def _most_or_unlimited(values: list[Any]) -> Any:
    """The largest of ``values`` (the union, for sets), or None (unlimited) if any is None."""
    if any(value is None for value in values):
        return None
    if isinstance(values[0], set):
        return set().union(*values)
    return max(values)


class EffectivePolicy:
    """The union of a user's group policies (the most generous value of each limit)."""

    def __init__(self, policies: list[QuotaPolicy]) -> None:
        self.policies = policies

        def most(name: str) -> Any:
            return max(getattr(policy, name) for policy in policies)

        self.max_concurrent_sessions: int = most("max_concurrent_sessions")
        self.max_session_minutes: int = most("max_session_minutes")
        self.max_hours_per_week: int = most("max_hours_per_week")
        self.allow_gpu: bool = most("allow_gpu")
        self.allow_terminals: bool = most("allow_terminals")
        self.memory_percent: int = most("memory_percent")
        self.cpu_weight: int = most("cpu_weight")
        self.max_tasks: int = most("max_tasks")
        self.workspace_gb: int = most("workspace_gb")
        # Unset (no quota: all CPUs) is the most generous, as a policy without labs allows
        # every lab, which makes the union "every lab".
        self.cpu_quota: float | None = _most_or_unlimited([p.cpu_quota for p in policies])
        self.lab_ids: set[int] | None = _most_or_unlimited(
            [{lab.pk for lab in p.labs.all()} or None for p in policies]
        )

    def allows_lab(self, lab: Lab) -> bool:
        return self.lab_ids is None or lab.pk in self.lab_ids


class ApiToken(models.Model):
    """A personal API token: shown once, stored as lookup prefix + SHA-256 digest."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, default="api")
    lookup = models.CharField(max_length=32, db_index=True)
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.user} / {self.name} ({self.lookup}…)"
