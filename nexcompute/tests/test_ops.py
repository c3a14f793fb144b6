"""Operations endpoints (CONTRACT "Operations endpoints"): /healthz, /readyz, /metrics."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.test import Client
from prometheus_client import REGISTRY

from machines.models import Lab, MachineStatus
from nexcompute import ops
from nexcompute.tasks import beat_heartbeat
from sessions.services import session_mark_running, session_request
from tests.factories import MachineFactory, record_receipt
from tests.procs import free_port, process_set, wait_for

METRICS_TOKEN = "metrics-token-for-tests-0123456789"


@pytest.fixture(autouse=True)
def _fresh_networks() -> Iterator[None]:
    ops._allowed_networks.cache_clear()
    yield
    ops._allowed_networks.cache_clear()


# --- /healthz --------------------------------------------------------------------------------


def test_healthz_answers_while_the_process_serves(db: Any) -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True}


# --- /metrics: protection ---------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-token", f"Basic {METRICS_TOKEN}", f"Bearer {METRICS_TOKEN}x", "Bearer "],
)
def test_metrics_are_refused_without_the_token(header: str | None, settings: Any) -> None:
    settings.NEXCOMPUTE_METRICS_TOKEN = METRICS_TOKEN
    settings.NEXCOMPUTE_METRICS_ALLOWED_NETWORKS = ["10.0.0.0/8"]  # not the test client's
    client = Client(**({"HTTP_AUTHORIZATION": header} if header else {}))

    response = client.get("/metrics")

    assert response.status_code == 401
    assert "NEXCOMPUTE_METRICS_TOKEN" in response.json()["detail"]
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"nexcompute_machines" not in response.content


@pytest.mark.django_db
def test_metrics_without_any_protection_configured_are_refused(settings: Any) -> None:
    settings.NEXCOMPUTE_METRICS_TOKEN = ""
    settings.NEXCOMPUTE_METRICS_ALLOWED_NETWORKS = []

    assert Client().get("/metrics").status_code == 401
    # An empty token must not match an empty bearer either.
    assert Client(HTTP_AUTHORIZATION="Bearer ").get("/metrics").status_code == 401


@pytest.mark.django_db
def test_metrics_with_the_token(settings: Any) -> None:
    settings.NEXCOMPUTE_METRICS_TOKEN = METRICS_TOKEN
    response = Client(HTTP_AUTHORIZATION=f"Bearer {METRICS_TOKEN}").get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("networks", "address", "allowed"),
    [
        (["127.0.0.0/8"], "127.0.0.1", True),
        (["10.1.0.0/16", "192.168.5.7"], "192.168.5.7", True),
        (["10.1.0.0/16"], "10.2.0.1", False),
        (["::1/128"], "127.0.0.1", False),
        (["10.0.0.0/8"], "not-an-address", False),
    ],
)
def test_metrics_from_an_allowed_network(
    networks: list[str], address: str, allowed: bool, settings: Any
) -> None:
    settings.NEXCOMPUTE_METRICS_TOKEN = ""
    settings.NEXCOMPUTE_METRICS_ALLOWED_NETWORKS = networks

    response = Client(REMOTE_ADDR=address).get("/metrics")

    assert response.status_code == (200 if allowed else 401)


@pytest.mark.django_db
def test_metrics_through_a_proxy_never_pass_by_address(settings: Any) -> None:
    """daphne --proxy-headers takes X-Forwarded-For's first entry, which a client writes when
    the proxy appends: an address in the allowed network that came through a proxy is refused
    (the token still works)."""
    settings.NEXCOMPUTE_METRICS_TOKEN = "t" * 40
    settings.NEXCOMPUTE_METRICS_ALLOWED_NETWORKS = ["10.0.0.0/8"]
    direct = Client(REMOTE_ADDR="10.0.0.5")
    assert direct.get("/metrics").status_code == 200  # the address alone does pass

    spoofed = direct.get("/metrics", HTTP_X_FORWARDED_FOR="10.0.0.5, 203.0.113.9")
    assert spoofed.status_code == 401
    with_token = direct.get(
        "/metrics", HTTP_X_FORWARDED_FOR="203.0.113.9", HTTP_AUTHORIZATION="Bearer " + "t" * 40
    )
    assert with_token.status_code == 200


# --- /metrics: content ------------------------------------------------------------------------


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.django_db
def test_metrics_count_machines_sessions_readiness_and_wipes(
    settings: Any, owner: Any, other: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.NEXCOMPUTE_METRICS_TOKEN = METRICS_TOKEN
    physics, chem = Lab.objects.create(name="Physics"), Lab.objects.create(name="Chem")
    MachineFactory.create_batch(2, lab=physics, status=MachineStatus.AVAILABLE)
    MachineFactory.create(lab=physics, status=MachineStatus.MAINTENANCE)
    MachineFactory.create(lab=chem, status=MachineStatus.OFFLINE)
    ready_before = _value("nexcompute_session_time_to_ready_seconds_count")
    wipes_before = _value("nexcompute_wipes_total", outcome="verified")
    wipe_time_before = _value("nexcompute_wipe_duration_seconds_count")

    with django_capture_on_commit_callbacks(execute=True):
        session = session_request(user=owner)
        assert session_mark_running(session=session, url="http://pc:8888/lab")
    with django_capture_on_commit_callbacks(execute=True):
        second = session_request(user=other)
    text = Client(HTTP_AUTHORIZATION=f"Bearer {METRICS_TOKEN}").get("/metrics").content.decode()

    assert 'nexcompute_machines{lab="Physics",status="available"} 0.0' in text  # both leased
    assert 'nexcompute_machines{lab="Physics",status="busy"} 1.0' in text
    assert 'nexcompute_machines{lab="Physics",status="reserved"} 1.0' in text
    assert 'nexcompute_machines{lab="Physics",status="maintenance"} 1.0' in text
    assert 'nexcompute_machines{lab="Chem",status="offline"} 1.0' in text
    assert 'nexcompute_sessions{state="running"} 1.0' in text
    assert 'nexcompute_sessions{state="requested"} 1.0' in text
    assert "nexcompute_agents_connected" in text
    assert "nexcompute_lease_enforcement_lag_seconds_bucket" in text
    assert "nexcompute_celery_task_failures" in text
    assert "nexcompute_channel_layer_send_failures" in text
    assert _value("nexcompute_session_time_to_ready_seconds_count") == ready_before + 1
    assert second.pk != session.pk

    from sessions.services import session_stop
    from sessions.states import EndReason

    session_stop(session=session, reason=EndReason.USER)
    with django_capture_on_commit_callbacks(execute=True):
        record_receipt(session)
    assert _value("nexcompute_wipes_total", outcome="verified") == wipes_before + 1
    assert _value("nexcompute_wipe_duration_seconds_count") == wipe_time_before + 1


# --- /readyz against a real Redis, a real worker and the beat heartbeat -----------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private redis-server this test starts and stops."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not on PATH (Debian: apt-get install redis-server)"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: redis.Redis.from_url(url).ping(), timeout=10, what="redis-server")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.mark.integration
def test_readyz_names_what_is_down(
    redis_server: tuple[str, subprocess.Popen[bytes]],
    live_env: dict[str, str],
    settings: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, server = redis_server
    settings.REDIS_URL = url
    settings.CELERY_BROKER_URL = url
    settings.NEXCOMPUTE_READY_TIMEOUT_SECONDS = 1.0
    from nexcompute.celery import app

    monkeypatch.setattr(app.conf, "broker_url", url)
    # control.ping() publishes through the app's producer pool, which the process makes once:
    # an earlier test in this process may have made it for the default broker, and the ping
    # then never reached this test's worker. The test gets pools of its own (to ``url``), and
    # the earlier ones come back after it.
    monkeypatch.setattr(app, "_pool", None)
    monkeypatch.setattr(app.amqp, "_producer_pool", None)
    client = Client()

    # No worker yet and beat has never ticked.
    first = client.get("/readyz")
    assert first.status_code == 503
    assert first.json()["failed"] == ["beat", "worker"]
    assert first.json()["checks"]["database"] == "ok"
    assert first.json()["checks"]["redis"] == "ok"

    env = {**live_env, "REDIS_URL": url, "CELERY_BROKER_URL": url}
    (tmp_path / "logs").mkdir()
    with process_set(env, tmp_path / "logs") as ps:
        ps.celery_worker()
        # The worker answers (its first ping reply can miss the 1 s deadline on a loaded
        # machine, so this waits for it), beat still has not ticked.
        wait_for(
            lambda: client.get("/readyz").json()["failed"] == ["beat"], what="the worker answers"
        )

        # Beat's heartbeat task, run by the worker, proves both.
        with app.connection_for_write(url) as conn:
            beat_heartbeat.apply_async(queue=env["NEXCOMPUTE_CELERY_QUEUE"], connection=conn)
        ready = wait_for(
            lambda: (r := client.get("/readyz")).status_code == 200 and r, what="ready"
        )
        assert ready.json() == {
            "ok": True,
            "checks": {"database": "ok", "redis": "ok", "beat": "ok", "worker": "ok"},
            "failed": [],
        }

        # A beat that stopped ticking a while ago.
        redis.Redis.from_url(url).set(ops.BEAT_KEY, repr(time.time() - 600))
        stale = client.get("/readyz")
        assert stale.status_code == 503
        assert stale.json()["failed"] == ["beat"]
        assert "ago" in stale.json()["checks"]["beat"]

        # Redis goes away: the attack really happened (the port is closed) and readyz says so.
        server.terminate()
        server.wait(timeout=10)
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        down = client.get("/readyz")
        assert down.status_code == 503
        assert down.json()["failed"] == ["beat", "redis", "worker"]
        assert down.json()["checks"]["database"] == "ok"


@pytest.mark.django_db
def test_the_healthcheck_command_runs_the_same_checks(settings: Any) -> None:
    from django.core.management import call_command
    from django.core.management.base import CommandError

    call_command("healthcheck", "database")  # passes: exit 0
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings.NEXCOMPUTE_READY_TIMEOUT_SECONDS = 0.5
    with pytest.raises(CommandError, match="failed: redis"):
        call_command("healthcheck", "database", "redis")
