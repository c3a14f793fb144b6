from __future__ import annotations

from django.db import models

from machines.models import Lab, Machine


class MachineLoad(models.Model):
    """One recent 1-minute point of a machine's load history: the sums of the samples that
    fell into the bucket ``[at, at + resolution)``. Sums, not averages, so downsampling (adding
    buckets together) keeps every total exact; the average is ``sum / samples``. Once aged,
    points are folded into ``MachineLoadDay`` rows (15-minute, then hourly)."""

    class Resolution(models.IntegerChoices):
        MINUTE = 60
        QUARTER = 900
        HOUR = 3600

    # The key is the bucket: the flush upserts into it (ON CONFLICT), and a machine's page
    # reads its range. No surrogate id and no second index: at a year of 500 machines
    # (~12 million points) each would cost more than the data (see README, Performance).
    pk = models.CompositePrimaryKey("machine", "at", "resolution")
    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="+")
    at = models.DateTimeField()
    resolution = models.PositiveSmallIntegerField(choices=Resolution.choices)
    samples = models.PositiveIntegerField(default=0)
    cpu_sum = models.FloatField(default=0)
    memory_sum = models.FloatField(default=0)
    gpu_samples = models.PositiveIntegerField(default=0)
    gpu_sum = models.FloatField(default=0)

    def __str__(self) -> str:
        return f"{self.machine_id} {self.at:%Y-%m-%d %H:%M} /{self.resolution}s"

    @property
    def cpu(self) -> float | None:
        return self.cpu_sum / self.samples if self.samples else None

    @property
    def memory(self) -> float | None:
        return self.memory_sum / self.samples if self.samples else None

    @property
    def gpu(self) -> float | None:
        return self.gpu_sum / self.gpu_samples if self.gpu_samples else None


class MachineLoadDay(models.Model):
    """The aged load history of one machine for one UTC day at one resolution (15-minute or
    hourly), packed: ``points`` holds each bucket that has samples as a 34-byte record
    (``reports.history.POINT``: slot in the day, samples, CPU sum, memory sum, GPU samples,
    GPU sum). One row a machine-day instead of 96 or 24 rows: the per-row header and index
    entry cost more than a point's data (see README, Performance)."""

    pk = models.CompositePrimaryKey("machine", "day", "resolution")
    machine = models.ForeignKey(Machine, on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    resolution = models.PositiveSmallIntegerField(choices=MachineLoad.Resolution.choices)
    points = models.BinaryField()

    def __str__(self) -> str:
        return f"{self.machine_id} {self.day} /{self.resolution}s"


class LabReportSubscription(models.Model):
    """Opt-in, per lab: the lab's owners get a monthly e-mail of what the lab gave."""

    lab = models.OneToOneField(Lab, on_delete=models.CASCADE, related_name="report_subscription")
    monthly_email = models.BooleanField(default=False, help_text="Send the monthly report.")
    recipients = models.TextField(
        blank=True, help_text="The lab owners' e-mail addresses, one per line or comma-separated."
    )
    last_sent_month = models.DateField(
        null=True, blank=True, help_text="First day of the last month reported (set by the task)."
    )

    def __str__(self) -> str:
        return f"monthly report of {self.lab}"

    @property
    def recipient_list(self) -> list[str]:
        return [a.strip() for a in self.recipients.replace(",", "\n").splitlines() if a.strip()]


class LabDayRollup(models.Model):
    """What one local day of one lab adds to every report figure (``figures.DayPart``),
    written by the nightly rollup (``reports.rollup``) once the day is over and no session
    over it is still running. A report adds up the stored days and computes the rest live;
    a stored day no longer matching the lab (its time zone, open hours or machines changed)
    is ignored and computed live instead."""

    lab = models.ForeignKey(Lab, on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    timezone = models.CharField(max_length=64)
    computed_at = models.DateTimeField()
    parts = models.JSONField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["lab", "day"], name="reports_rollup_lab_day"),
        ]

    def __str__(self) -> str:
        return f"{self.lab_id} {self.day}"
