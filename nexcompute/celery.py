from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import setup_logging, task_failure, worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nexcompute.settings")

app = Celery("nexcompute")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
app.autodiscover_tasks(["nexcompute"])


@setup_logging.connect
def _use_django_logging(**kwargs: Any) -> None:
    """Workers and beat log as the web does (settings.LOGGING: LOG_FORMAT, LOG_LEVEL, and
    routine task lines at DEBUG) instead of Celery's own set-up, which would put every
    "Task ... received/succeeded" line at INFO."""
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)


@task_failure.connect
def _count_failure(sender: Any = None, **kwargs: Any) -> None:
    from nexcompute.metrics import TASK_FAILURES

    TASK_FAILURES.labels(task=getattr(sender, "name", "unknown")).inc()


@worker_ready.connect
def _serve_metrics(**kwargs: Any) -> None:
    """NEXCOMPUTE_WORKER_METRICS_PORT: the worker's own /metrics (task failures, lease lag) for
    Prometheus, when the worker runs where the web processes cannot read its samples (another
    container). Serve it on a private network only: it has no token."""
    port = os.environ.get("NEXCOMPUTE_WORKER_METRICS_PORT")
    if not port:
        return
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    from nexcompute.metrics import MULTIPROCESS

    if MULTIPROCESS:  # the prefork children's samples too
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(int(port), registry=registry)
    else:
        start_http_server(int(port))
