from __future__ import annotations

from django.apps import AppConfig


class NexcomputeConfig(AppConfig):
    name = "nexcompute"
    verbose_name = "NexCompute"

    def ready(self) -> None:
        from nexcompute import checks  # noqa: F401  (registers the system checks)
