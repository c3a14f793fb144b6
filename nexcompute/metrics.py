"""Prometheus metrics (prometheus-client), served at ``/metrics`` (nexcompute.ops).

Why prometheus-client rather than django-prometheus: what operators need here is our own
domain figures (machines by status, sessions by state, time to ready, wipes, lease lag), not
per-view latency; django-prometheus adds middleware and database wrappers on every request
for figures we do not use, and its multi-process story is prometheus-client's anyway.
prometheus-client gives us its multiprocess mode: with ``PROMETHEUS_MULTIPROC_DIR`` set (one
directory shared by every daphne process and the Celery worker on a host; `make run` and the
compose file set it), each process writes its samples to files there and any one process's
``/metrics`` adds them all up. Without it each process reports its own figures.

Figures that live in the database (machines, sessions) are read at scrape time by
``nexcompute.ops.DatabaseCollector``: one grouped query each, never stale, nothing to keep in
sync. This module imports no app, so services anywhere can count into it.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

AGENTS_CONNECTED = Gauge(
    "nexcompute_agents_connected",
    "Agent websockets connected to this web process (label pid in multi-process mode).",
    multiprocess_mode="liveall",
)
TIME_TO_READY = Histogram(
    "nexcompute_session_time_to_ready_seconds",
    "From the session request to Jupyter Lab ready.",
    buckets=(1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300),
)
WIPE_DURATION = Histogram(
    "nexcompute_wipe_duration_seconds",
    "How long the agent took to wipe and verify a session (from its receipt).",
    buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 120),
)
WIPES = Counter(
    "nexcompute_wipes",
    "Wipe receipts by outcome (verified or unverified).",
    ["outcome"],
)
LEASE_LAG = Histogram(
    "nexcompute_lease_enforcement_lag_seconds",
    "From a lease's expiry to the stop being sent to the agent.",
    buckets=(0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60),
)
TASK_FAILURES = Counter(
    "nexcompute_celery_task_failures",
    "Celery tasks that raised, by task name.",
    ["task"],
)
EVENT_LOOP_LAG = Histogram(
    "nexcompute_event_loop_lag_seconds",
    "How late a web process's event loop ran a timer (nexcompute.gc_pacer, every 0.5 s).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
GC_PAUSE = Histogram(
    "nexcompute_gc_pause_seconds",
    "Cyclic garbage collections in a web process, by generation and by who started them "
    "(pacer: nexcompute.gc_pacer; threshold: CPython's allocation count).",
    ["generation", "by"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CHANNEL_SEND_FAILURES = Counter(
    "nexcompute_channel_layer_send_failures",
    "Channel-layer sends (pushes to dashboards, commands to agents) that failed.",
    ["kind"],
)


def count_channel_failure(kind: str) -> None:
    CHANNEL_SEND_FAILURES.labels(kind=kind).inc()
