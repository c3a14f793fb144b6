"""Operations endpoints (CONTRACT "Operations endpoints"): ``/healthz``, ``/readyz``, ``/metrics``.

``/readyz`` in the style of django-health-check: one small check per dependency, each bounded by
NEXCOMPUTE_READY_TIMEOUT_SECONDS, the answer naming every check and what failed. Beat proves it
ticks through ``nexcompute.tasks.beat_heartbeat``: beat sends it every 10 s, a worker runs it and
writes the time into Redis, so a fresh time also says the queue is being worked.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from nexcompute import metrics

log = logging.getLogger(__name__)

BEAT_KEY = "nexcompute:beat:last"


def redis_client() -> redis.Redis:
    timeout = settings.NEXCOMPUTE_READY_TIMEOUT_SECONDS
    return redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=timeout, socket_connect_timeout=timeout
    )


@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers. Dependencies are /readyz's business (a database outage
    must not get every web process restarted)."""
    return JsonResponse({"ok": True})


def _check_database() -> str | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return None


def _check_redis() -> str | None:
    redis_client().ping()
    return None


def _check_beat() -> str | None:
    raw = redis_client().get(BEAT_KEY)
    if raw is None:
        return "beat has not ticked (no heartbeat task has run)"
    age = time.time() - float(raw)
    if age > settings.NEXCOMPUTE_READY_BEAT_MAX_AGE_SECONDS:
        return f"beat's last tick ran {age:.0f} s ago"
    return None


def _check_worker() -> str | None:
    from nexcompute.celery import app

    replies = app.control.ping(timeout=settings.NEXCOMPUTE_READY_TIMEOUT_SECONDS, limit=1)
    return None if replies else "no Celery worker answered a ping"


CHECKS: dict[str, Callable[[], str | None]] = {
    "database": _check_database,
    "redis": _check_redis,
    "beat": _check_beat,
    "worker": _check_worker,
}


@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    """200 only when every check passes, else 503; the body names each check's result."""
    results: dict[str, str] = {}
    for name, check in CHECKS.items():
        if name in ("beat", "worker") and results.get("redis") != "ok":
            results[name] = "not checked: Redis is unreachable"
            continue
        try:
            problem = check()
        except Exception as exc:  # noqa: BLE001 - a failing check is the answer, not a 500
            problem = f"{type(exc).__name__}: {exc}"[:300]
        results[name] = problem or "ok"
    failed = sorted(name for name, result in results.items() if result != "ok")
    if failed:
        log.warning("not ready: %s", ", ".join(f"{n} ({results[n]})" for n in failed))
    return JsonResponse(
        {"ok": not failed, "checks": results, "failed": failed}, status=503 if failed else 200
    )


@cache
def _allowed_networks() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(
            ipaddress.ip_network(item, strict=False)
            for item in settings.NEXCOMPUTE_METRICS_ALLOWED_NETWORKS
        )
    except ValueError as exc:
        raise ImproperlyConfigured(f"NEXCOMPUTE_METRICS_ALLOWED_NETWORKS: {exc}") from exc


def metrics_allowed(request: HttpRequest) -> bool:
    """The metrics token (constant-time compare) or a client address in an allowed network.

    The address is the socket's peer as the ASGI server saw it. A request that came through a
    proxy (it carries X-Forwarded-For) never passes by address: with --proxy-headers daphne
    takes the header's first entry, which the client writes whenever the proxy appends to it
    rather than replacing it. Scrape the web processes directly, or send the token."""
    token = settings.NEXCOMPUTE_METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if token and scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token):
        return True
    if "X-Forwarded-For" in request.headers or "Forwarded" in request.headers:
        return False
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in network for network in _allowed_networks())


class DatabaseCollector(Collector):
    """Machines by status and lab, and sessions by state, counted at scrape time."""

    def collect(self) -> Iterator[Metric]:
        from django.db.models import Count

        from machines.models import Machine, MachineStatus
        from sessions.models import ComputeSession
        from sessions.states import SessionState

        machines = GaugeMetricFamily(
            "nexcompute_machines", "Machines by status and lab.", labels=["status", "lab"]
        )
        rows = Machine.objects.values_list("status", "lab__name").annotate(n=Count("pk"))
        seen: set[tuple[str, str]] = set()
        labs: set[str] = set()
        for status, lab, n in rows:
            machines.add_metric([status, lab], n)
            seen.add((status, lab))
            labs.add(lab)
        for lab in labs:  # every status per lab, so a panel shows 0 rather than no data
            for status in MachineStatus.values:
                if (status, lab) not in seen:
                    machines.add_metric([status, lab], 0)
        yield machines

        sessions = GaugeMetricFamily("nexcompute_sessions", "Sessions by state.", labels=["state"])
        counts = dict(
            ComputeSession.objects.exclude(state__in=[SessionState.ENDED, SessionState.FAILED])
            .values_list("state")
            .annotate(n=Count("pk"))
        )
        for state in SessionState.values:
            if state in (SessionState.ENDED, SessionState.FAILED):
                continue  # ever-growing history: not a gauge (see the wipes counter)
            sessions.add_metric([state], counts.get(state, 0))
        yield sessions


def render() -> tuple[bytes, str]:
    """The Prometheus text for one scrape: every process's samples plus the database's."""
    if metrics.MULTIPROCESS:
        registry: Any = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        for collector in list(REGISTRY._collector_to_names):  # this process's own metrics
            registry.register(collector)
    registry.register(DatabaseCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST


@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not metrics_allowed(request):
        response = JsonResponse(
            {
                "detail": "metrics need Authorization: Bearer <NEXCOMPUTE_METRICS_TOKEN> "
                "or a client address in NEXCOMPUTE_METRICS_ALLOWED_NETWORKS"
            },
            status=401,
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body, content_type = render()
    return HttpResponse(body, content_type=content_type)
