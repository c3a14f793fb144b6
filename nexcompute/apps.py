from __future__ import annotations

from django.apps import AppConfig


class NexcomputeConfig(AppConfig):
    name = "nexcompute"
    verbose_name = "NexCompute"

    def ready(self) -> None:
        from nexcompute import (
            checks,  # noqa: F401  (registers the system checks)
            realtime,
        )

        # Started before the first push, not by it: a rush of requests would otherwise queue
        # behind the thread's start (bench/allocate.py).
        realtime.start_sender()
