from __future__ import annotations

from django.apps import AppConfig


class ReportsConfig(AppConfig):
    name = "reports"
    verbose_name = "Reports"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from machines.heartbeats import metrics_flushed
        from reports.history import record_flush

        # The agent link's batched metrics write tells us each flush; we keep the history.
        metrics_flushed.connect(record_flush, dispatch_uid="reports.history")
