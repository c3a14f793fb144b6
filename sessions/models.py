from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q

from machines.models import Machine
from sessions.states import LIVE, TERMINAL, EndReason, SessionState


class ComputeSessionQuerySet(models.QuerySet["ComputeSession"]):
    def live(self) -> ComputeSessionQuerySet:
        return self.filter(state__in=LIVE)

    def for_owner(self, user: Any) -> ComputeSessionQuerySet:
        return self.filter(owner_id=user.pk)

    def uncleaned(self, machine_id: int) -> ComputeSessionQuerySet:
        """The machine's sessions whose cleanup has not finished: every live one and every
        :meth:`unwiped` one among them (a receipt ends a live session in the same transaction),
        so none of these means neither (one indexed query; a fleet's hellos and reconciliation
        ask it for every machine)."""
        return self.filter(machine_id=machine_id, cleanup_finished_at__isnull=True)

    def unwiped(self, machine_id: int | None = None) -> ComputeSessionQuerySet:
        """Ended sessions that may have left something on their machine and have no wipe
        receipt yet: the machine is offered again only after one (``sessions.occupancy``)."""
        qs = self if machine_id is None else self.filter(machine_id=machine_id)
        return qs.filter(state__in=TERMINAL, cleanup_finished_at__isnull=True).filter(
            Q(started_at__isnull=False)
            | Q(state=SessionState.FAILED)
            | Q(end_reason=EndReason.AGENT_LOST)
            | Q(events__to_state=SessionState.STARTING)
        )


class ComputeSession(models.Model):
    """A lease of one machine by one user, with its Jupyter Lab."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="compute_sessions"
    )
    machine = models.ForeignKey(Machine, on_delete=models.PROTECT, related_name="sessions")
    state = models.CharField(
        max_length=20, choices=SessionState.choices, default=SessionState.REQUESTED
    )
    end_reason = models.CharField(max_length=20, choices=EndReason.choices, blank=True)
    requirements = models.JSONField(default=dict, blank=True)
    duration_minutes = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(db_index=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    # Jupyter access; both erased when the session ends.
    jupyter_url = models.CharField(max_length=500, blank=True)
    jupyter_token = models.CharField(max_length=100, blank=True)
    # SHA-256 of the session-scoped capability (sessions/capability.py), set when the start
    # is sent and erased when the session ends; the capability itself is never stored.
    capability_hash = models.CharField(max_length=64, blank=True)
    # The session's activity as last reported by the agent (idle policy, docs/policy.md):
    # what it was (kernel, terminal, lab, cpu, start; blank from a protocol-2 agent) and the
    # session's CPU use in percent of one core over the agent's window.
    last_activity = models.DateTimeField(null=True, blank=True)
    kernels_busy = models.PositiveIntegerField(default=0)
    connections = models.PositiveIntegerField(default=0)
    activity_source = models.CharField(max_length=20, blank=True)
    activity_cpu_percent = models.FloatField(null=True, blank=True)
    # Cleanup receipt from the agent.
    cleanup_verified = models.BooleanField(null=True, blank=True)
    files_removed = models.BigIntegerField(null=True, blank=True)
    bytes_removed = models.BigIntegerField(null=True, blank=True)
    processes_killed = models.IntegerField(null=True, blank=True)
    cleanup_finished_at = models.DateTimeField(null=True, blank=True)
    cleanup_details = models.JSONField(default=list, blank=True)
    # The wipe's proof: each check the agent ran ({name, ok, detail}), and the session account.
    cleanup_checks = models.JSONField(default=list, blank=True)
    cleanup_account = models.CharField(max_length=256, blank=True)

    objects = ComputeSessionQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            # The database itself refuses a machine in two live sessions: the last line of
            # defence behind the conditional UPDATE that claims the machine.
            models.UniqueConstraint(
                fields=["machine"],
                condition=Q(state__in=sorted(s.value for s in LIVE)),
                name="one_live_session_per_machine",
            ),
        ]
        indexes = [
            models.Index(fields=["owner", "state"], name="session_owner_state_idx"),
            # The staff reports select the sessions overlapping a period: "ended after its
            # start, or not ended" (with created_at alone, a year of history is read).
            models.Index(fields=["ended_at"], name="session_ended_at_idx"),
            # Wipe failures in a period: the few unverified receipts, by time.
            models.Index(
                fields=["cleanup_finished_at"],
                condition=Q(cleanup_verified=False),
                name="session_wipe_failed_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"session {self.pk} ({self.state}) on {self.machine_id}"

    @property
    def is_live(self) -> bool:
        return self.state in LIVE


class SessionEvent(models.Model):
    """The session timeline: every state change, start progress step and warning."""

    class Kind(models.TextChoices):
        STATE = "state"
        PROGRESS = "progress"
        WARNING = "warning"

    session = models.ForeignKey(ComputeSession, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(auto_now_add=True, db_index=True)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    from_state = models.CharField(max_length=20, blank=True)
    to_state = models.CharField(max_length=20, blank=True)
    reason = models.CharField(max_length=40, blank=True)
    message = models.CharField(max_length=500, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    # Set on events that must happen at most once per session (a warning point, a resend of
    # the stop): inserting the row is the claim, and the constraint refuses a second one, so
    # two Celery workers cannot both send it.
    key = models.CharField(max_length=80, blank=True)

    class Meta:
        ordering = ["at", "pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["session", "key"], condition=~Q(key=""), name="one_event_per_key"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.session_id} {self.kind} {self.to_state or self.message}"


class UnmetRequest(models.Model):
    """A request refused because no free machine fitted it: the demand the fleet did not meet
    (staff reports show it by hour of week). Written outside the refused request's
    transaction, so the refusal itself stays a plain 409."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="unmet_requests"
    )
    at = models.DateTimeField(db_index=True)
    # The lab asked for, or the one lab the user's policy allows; null: any lab would have done.
    lab = models.ForeignKey(
        "machines.Lab", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    gpu = models.BooleanField(default=False)
    min_memory_gb = models.FloatField(default=0)

    class Meta:
        ordering = ["-at", "-pk"]

    def __str__(self) -> str:
        return f"unmet request by {self.user_id} at {self.at:%Y-%m-%d %H:%M}"


class SessionMail(models.Model):
    """One e-mail sent about a session (ready, ending soon, ended): the claim that keeps a
    redelivered or duplicated task from sending it twice (``sessions.notify``)."""

    session = models.ForeignKey(ComputeSession, on_delete=models.CASCADE, related_name="mails")
    # ``ready``, ``ended``, or the key of the warning event (``expiry:10:...``, ``window:...``).
    key = models.CharField(max_length=80)
    to = models.CharField(max_length=254)
    sent_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["sent_at", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["session", "key"], name="one_mail_per_session_key"),
        ]

    def __str__(self) -> str:
        return f"mail {self.key} of session {self.session_id} to {self.to}"
