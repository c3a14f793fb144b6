"""Fixtures for integration tests that start real processes against the test database
(``session_env``, ``live_env``, ``procs``) and the report hook that prints the processes' logs
when a test fails. Loaded once for the whole suite by the root conftest (``pytest_plugins``)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from channels.layers import channel_layers
from django.conf import settings as django_settings
from django.db import connection

from tests.procs import ROOT, ProcessSet, process_set

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
SESSION_ENV = Path(os.environ.get("NEXCOMPUTE_SESSION_ENV", "/var/tmp/nexcompute-session-env"))


@pytest.fixture(scope="session")
def session_env() -> Path:
    """The read-only Python environment sessions run Jupyter from (`make test` builds it before
    pytest; this is then a quick check, and the build itself when pytest runs alone)."""
    proc = subprocess.run(
        [str(ROOT / "scripts" / "make-session-env.sh"), str(SESSION_ENV)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, f"cannot build the session environment: {proc.stderr[-800:]}"
    return SESSION_ENV


def _database_url() -> str:
    s = connection.settings_dict
    if s["ENGINE"] != "django.db.backends.postgresql":
        raise RuntimeError("integration tests need PostgreSQL (set DATABASE_URL)")
    auth = s["USER"] or "postgres"
    if s.get("PASSWORD"):
        auth += f":{s['PASSWORD']}"
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


@pytest.fixture
def live_env(
    transactional_db: Any, settings: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> dict[str, str]:
    """Environment for server processes: the test database, a private channel-layer prefix,
    short heartbeats and grace periods. The test process itself uses the same layer."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    layer = {
        "BACKEND": django_settings.CHANNEL_LAYERS["default"]["BACKEND"],
        "CONFIG": {
            **django_settings.CHANNEL_LAYERS["default"]["CONFIG"],
            "prefix": prefix,
        },
    }
    settings.CHANNEL_LAYERS = {"default": layer}
    channel_layers.backends.clear()
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "NEXCOMPUTE_CHANNEL_PREFIX": prefix,
        # A private Celery queue: workers of concurrent test runs on one Redis never take this
        # run's tasks (which name rows of this run's database).
        "NEXCOMPUTE_CELERY_QUEUE": f"celery.{prefix}",
        "NEXCOMPUTE_HEARTBEAT_SECONDS": "0.5",
        "NEXCOMPUTE_OFFLINE_GRACE_SECONDS": "3",
        "NEXCOMPUTE_METRICS_WRITE_SECONDS": "1",
        "NEXCOMPUTE_DASHBOARD_BATCH_SECONDS": "0.2",
        "NEXCOMPUTE_WARM_POOLS": "0",  # on only in the tests of warm sandboxes
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    env.pop("NEXCOMPUTE_INMEMORY_CHANNEL_LAYER", None)
    # Run from a systemd unit, the test run would pass INVOCATION_ID on, and agents would then
    # leave running sessions behind when a test stops them (keep_sessions_on_stop = "auto").
    env.pop("INVOCATION_ID", None)
    return env


@pytest.fixture
def procs(
    live_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ProcessSet]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    with process_set(live_env, log_dir) as ps:
        yield ps
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            for proc in ps.procs:
                sys.stderr.write(f"\n----- {proc.name} log -----\n{proc.log()[-4000:]}\n")
    channel_layers.backends.clear()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
