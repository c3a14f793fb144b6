"""Django settings for NexCompute.

Every setting comes from the environment (a `.env` file is read if present). The small typed
readers below raise ImproperlyConfigured on malformed values so that a typo fails at start-up,
not at 3 a.m. `.env.example` lists every variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv

# Lets ModelAdmin[Model], QuerySet[Model] etc. be subscripted at run time (django-stubs).
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent

# The real environment wins over the file. `make run` writes this file on its first run (DEBUG
# on, a random SECRET_KEY, its DATABASE_URL and REDIS_URL), so every `manage.py` command in the
# same checkout works afterwards; NEXCOMPUTE_ENV_FILE names another file.
ENV_FILE = Path(os.environ.get("NEXCOMPUTE_ENV_FILE") or BASE_DIR / ".env")
load_dotenv(ENV_FILE, override=False)


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_secret(name: str, default: str) -> str:
    """A secret from NAME, or from the file named by NAME_FILE (Docker/K8s secrets)."""
    file_name = os.environ.get(f"{name}_FILE")
    if file_name:
        try:
            return Path(file_name).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE: cannot read {file_name}: {exc}") from exc
    return os.environ.get(name) or default  # an empty line copied from .env.example: default


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0/true/false), got {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from exc


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_float_list(name: str, default: list[float]) -> list[float]:
    """Comma-separated numbers, e.g. ``10,2`` (an empty value means none)."""
    try:
        return [float(item) for item in env_list(name, [str(v) for v in default])]
    except ValueError as exc:
        raise ImproperlyConfigured(
            f"{name} must be comma-separated numbers, got {os.environ.get(name)!r}"
        ) from exc


def env_admins(name: str) -> list[tuple[str, str]]:
    """``ADMINS``: comma-separated ``Name <a@b>`` or bare addresses."""
    from email.utils import parseaddr

    admins = []
    for item in env_list(name, []):
        real, addr = parseaddr(item)
        if "@" not in addr:
            raise ImproperlyConfigured(f"{name}: {item!r} is not an e-mail address")
        admins.append((real or addr, addr))
    return admins


DEBUG = env_bool("DEBUG", False)
INSECURE_DEFAULT_KEY = "django-insecure-nexcompute-local-development-only"
# Refused by system check nexcompute.E001 (`migrate` fails) unless DEBUG is on.
SECRET_KEY = env_secret("SECRET_KEY", INSECURE_DEFAULT_KEY)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
NEXCOMPUTE_PUBLIC_URL = env_str("NEXCOMPUTE_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")

INSTALLED_APPS = [
    "daphne",
    "ninja",  # its bundled Swagger UI for /api/docs (static files, no CDN)
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "nexcompute.apps.NexcomputeConfig",
    "allauth",
    "allauth.account",
    "allauth.socialaccount",
    "allauth.socialaccount.providers.openid_connect",
    "allauth.socialaccount.providers.saml",
    "axes",
    "accounts",
    "machines",
    "sessions.apps.ComputeSessionsConfig",
    "reports",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "nexcompute.logcontext.RequestContextMiddleware",
    "nexcompute.middleware.ApiJsonErrorsMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a lockout into the page that says so.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "nexcompute.urls"
WSGI_APPLICATION = None
ASGI_APPLICATION = "nexcompute.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES: dict[str, Any] = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
        # No persistent connections: under ASGI every request runs in its own thread, and a
        # connection kept per thread leaks until PostgreSQL refuses more clients (seen with
        # bench/time_to_jupyter.py). PostgreSQL gets a connection pool instead, below.
        conn_max_age=0,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's psycopg pool: connections are reused across threads and bounded per process
    # (the agent link calls the database many times a second; a new connection costs ms).
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("DATABASE_POOL_MIN", 1),
        # Per process: the agent link's 12 + 4 database threads (NEXCOMPUTE_AGENT_DB_THREADS,
        # machines/auth.py), asyncio's default pool (6 on 2 cores) and Django's sync thread.
        "max_size": env_int("DATABASE_POOL_MAX", 24),
        "timeout": env_float("DATABASE_POOL_TIMEOUT", 10.0),
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # SQLite is for local runs only; give concurrent writers a chance instead of failing at once.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 20

AUTH_USER_MODEL = "accounts.User"
AUTHENTICATION_BACKENDS = [
    # First: refuses a locked-out username/address before any password is checked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",  # local password login (staff, the demo)
    "allauth.account.auth_backends.AuthenticationBackend",  # single sign-on (allauth)
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Request bodies: the API never needs more than a few KiB; larger bodies are refused with 413.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("NEXCOMPUTE_MAX_BODY_BYTES", 64 * 1024)

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

# Every web process shares one Redis (docs/deploy.md). NEXCOMPUTE_CHANNEL_LAYER picks the
# layer: "redis" (channels-redis' RedisChannelLayer with a waiting pool, nexcompute.channel_layer;
# the default, measured as the better one) or "pubsub" (RedisPubSubChannelLayer, kept for the
# comparison in bench/fleet.py --layer).
_LAYER_BACKENDS = {
    "redis": "nexcompute.channel_layer.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}
_layer_kind = env_str("NEXCOMPUTE_CHANNEL_LAYER", "redis")
if _layer_kind not in _LAYER_BACKENDS:
    raise ImproperlyConfigured(
        f"NEXCOMPUTE_CHANNEL_LAYER must be one of {sorted(_LAYER_BACKENDS)}, got {_layer_kind!r}"
    )
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": _LAYER_BACKENDS[_layer_kind],
        "CONFIG": {
            "hosts": [
                {
                    "address": REDIS_URL,
                    # PITFALLS: redis-py's pools raise MaxConnectionsError when full. Ours waits
                    # for a free connection (up to pool_timeout s) instead: a connect storm
                    # queues rather than failing, with few Redis connections per process.
                    "max_connections": env_int("NEXCOMPUTE_REDIS_POOL_SIZE", 200),
                    # redis-py 8 reads with a 5 s socket timeout by default, the same as
                    # channels-redis' blocking BZPOPMIN: the read then times out and the
                    # consumer dies with 1011. Give blocking reads room above 5 s.
                    "socket_timeout": 30,
                }
                | ({"pool_timeout": 20} if _layer_kind == "redis" else {})
            ],
            "prefix": env_str("NEXCOMPUTE_CHANNEL_PREFIX", "asgi"),
        }
        | ({"capacity": 1500, "expiry": 30} if _layer_kind == "redis" else {}),
    }
}
if env_bool("NEXCOMPUTE_INMEMORY_CHANNEL_LAYER", False):
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "") or REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TIMEZONE = "UTC"
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Tests give each run its own queue so that workers of concurrent runs on one Redis never take
# each other's tasks (which name rows of another database).
CELERY_TASK_DEFAULT_QUEUE = env_str("NEXCOMPUTE_CELERY_QUEUE", "") or "celery"

# --- NexCompute policy knobs -----------------------------------------------------------------
NEXCOMPUTE_DEFAULT_SESSION_MINUTES = env_int("NEXCOMPUTE_DEFAULT_SESSION_MINUTES", 120)
# Session requests allocating at once per process (the rest wait their turn, at most the wait).
NEXCOMPUTE_ALLOCATION_CONCURRENCY = env_int("NEXCOMPUTE_ALLOCATION_CONCURRENCY", 12)
NEXCOMPUTE_ALLOCATION_WAIT_SECONDS = env_float("NEXCOMPUTE_ALLOCATION_WAIT_SECONDS", 20.0)
NEXCOMPUTE_HEARTBEAT_SECONDS = env_float("NEXCOMPUTE_HEARTBEAT_SECONDS", 10.0)
# Reconnect storms (a web process restarted or killed): its agents spread their first
# reconnect over (agents it holds) / RATE seconds, at most WINDOW_MAX (welcome, protocol 4).
NEXCOMPUTE_RECONNECT_RATE = env_float("NEXCOMPUTE_RECONNECT_RATE", 100.0)
NEXCOMPUTE_RECONNECT_WINDOW_MAX = env_float("NEXCOMPUTE_RECONNECT_WINDOW_MAX", 120.0)
# How many web processes share the agents (the window counts this process's share of them).
NEXCOMPUTE_WEB_PROCESSES = env_int("NEXCOMPUTE_WEB_PROCESSES", 1)
# A web process collects its young objects this often (nexcompute/gc_pacer.py; 0: only by
# CPython's allocation count).
NEXCOMPUTE_GC_PACE_SECONDS = env_float("NEXCOMPUTE_GC_PACE_SECONDS", 0.5)
NEXCOMPUTE_OFFLINE_GRACE_SECONDS = env_float("NEXCOMPUTE_OFFLINE_GRACE_SECONDS", 35.0)
NEXCOMPUTE_ENROLLMENT_TOKEN_TTL_HOURS = env_int("NEXCOMPUTE_ENROLLMENT_TOKEN_TTL_HOURS", 24)
NEXCOMPUTE_METRICS_WRITE_SECONDS = env_float("NEXCOMPUTE_METRICS_WRITE_SECONDS", 60.0)
# The latest metrics of each machine go to Redis this often (the API reads them from there).
NEXCOMPUTE_METRICS_LIVE_SECONDS = env_float("NEXCOMPUTE_METRICS_LIVE_SECONDS", 1.0)
# Staff reports: the machines' load history keeps 1-minute points this many days, then
# 15-minute points until NEXCOMPUTE_METRICS_QUARTER_DAYS, then hourly points until the retention.
NEXCOMPUTE_METRICS_MINUTE_DAYS = env_int("NEXCOMPUTE_METRICS_MINUTE_DAYS", 7)
NEXCOMPUTE_METRICS_QUARTER_DAYS = env_int("NEXCOMPUTE_METRICS_QUARTER_DAYS", 92)
NEXCOMPUTE_METRICS_RETENTION_DAYS = env_int("NEXCOMPUTE_METRICS_RETENTION_DAYS", 730)
# The staff reports' rollup recomputes the last N finished days of each lab on every run
# (late data), and fills at most this many missing older days per run.
NEXCOMPUTE_REPORT_ROLLUP_RECENT_DAYS = env_int("NEXCOMPUTE_REPORT_ROLLUP_RECENT_DAYS", 3)
NEXCOMPUTE_REPORT_ROLLUP_BACKFILL_DAYS = env_int("NEXCOMPUTE_REPORT_ROLLUP_BACKFILL_DAYS", 400)
NEXCOMPUTE_DASHBOARD_BATCH_SECONDS = env_float("NEXCOMPUTE_DASHBOARD_BATCH_SECONDS", 0.5)
# Threads for the agent link's database calls (hello, reports), per server process. A hello is
# a handful of short queries, mostly waiting on PostgreSQL: asyncio's default pool (6 threads on
# 2 cores) held a 2,000-agent reconnect to ~90 hellos/s and connects queued for 15 s.
NEXCOMPUTE_AGENT_DB_THREADS = env_int("NEXCOMPUTE_AGENT_DB_THREADS", 12)
NEXCOMPUTE_AGENT_RATE_BURST = env_float("NEXCOMPUTE_AGENT_RATE_BURST", 20)
NEXCOMPUTE_AGENT_RATE_PER_SECOND = env_float("NEXCOMPUTE_AGENT_RATE_PER_SECOND", 5)

# Lease policy (sessions/policy.py, docs/policy.md). Minutes are floats so tests can use seconds.
NEXCOMPUTE_EXPIRY_WARNINGS_MINUTES = sorted(
    env_float_list("NEXCOMPUTE_EXPIRY_WARNINGS_MINUTES", [10, 2]), reverse=True
)
# Extend: one click adds the step; the other choices are offered beside it when the policy allows.
NEXCOMPUTE_EXTEND_STEP_MINUTES = env_int("NEXCOMPUTE_EXTEND_STEP_MINUTES", 30)
NEXCOMPUTE_IDLE_MINUTES = env_float("NEXCOMPUTE_IDLE_MINUTES", 60)  # 0 turns the idle stop off
NEXCOMPUTE_IDLE_WARNING_MINUTES = env_float("NEXCOMPUTE_IDLE_WARNING_MINUTES", 10)
NEXCOMPUTE_OWNER_GRACE_MINUTES = env_float("NEXCOMPUTE_OWNER_GRACE_MINUTES", 10)
NEXCOMPUTE_AGENT_LOST_MINUTES = env_float("NEXCOMPUTE_AGENT_LOST_MINUTES", 5)
NEXCOMPUTE_WINDOW_WARNING_MINUTES = env_float("NEXCOMPUTE_WINDOW_WARNING_MINUTES", 10)
NEXCOMPUTE_CLEANUP_RESEND_SECONDS = env_float("NEXCOMPUTE_CLEANUP_RESEND_SECONDS", 120)
# A start the agent has not finished: resend once, then fail the session (and wipe).
NEXCOMPUTE_START_RESEND_SECONDS = env_float("NEXCOMPUTE_START_RESEND_SECONDS", 90)
NEXCOMPUTE_START_TIMEOUT_SECONDS = env_float("NEXCOMPUTE_START_TIMEOUT_SECONDS", 300)
NEXCOMPUTE_CLEANUP_QUARANTINE_SECONDS = env_float("NEXCOMPUTE_CLEANUP_QUARANTINE_SECONDS", 600)
# Warm sandboxes (docs/sandbox.md): off here turns them off everywhere (per lab: Lab.warm_pool).
NEXCOMPUTE_WARM_POOLS = env_bool("NEXCOMPUTE_WARM_POOLS", True)
NEXCOMPUTE_WARM_MAX_AGE_SECONDS = env_int("NEXCOMPUTE_WARM_MAX_AGE_SECONDS", 3600)
# How often each agent link looks again whether its machine should keep one (lab hours).
NEXCOMPUTE_WARM_CHECK_SECONDS = env_float("NEXCOMPUTE_WARM_CHECK_SECONDS", 60)

# E-mail: staff are told when a machine is quarantined. Without EMAIL_HOST mail goes to the
# console (a local run); production sets EMAIL_HOST and friends.
EMAIL_HOST = env_str("EMAIL_HOST", "")
# (``or``: an empty line copied from .env.example means the default.)
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "") or (
    "django.core.mail.backends.smtp.EmailBackend"
    if EMAIL_HOST
    else "django.core.mail.backends.console.EmailBackend"
)
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_secret("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 10)
EMAIL_FILE_PATH = env_str("EMAIL_FILE_PATH", "") or str(BASE_DIR / "var" / "mail")
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "") or "NexCompute <nexcompute@localhost>"
SERVER_EMAIL = env_str("SERVER_EMAIL", "") or DEFAULT_FROM_EMAIL
ADMINS = env_admins("ADMINS")

# --- behind a TLS-terminating proxy (README "Deploy") ---------------------------------------
_HTTPS = NEXCOMPUTE_PUBLIC_URL.startswith("https://")
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", _HTTPS)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", SESSION_COOKIE_SECURE)
X_FRAME_OPTIONS = "DENY"


def env_proxy_header(name: str) -> tuple[str, str] | None:
    """``SECURE_PROXY_SSL_HEADER=X-Forwarded-Proto:https`` (header name and the value meaning
    the original request was https). Only set it when the proxy always sets that header."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    header, sep, value = raw.partition(":")
    if not sep or not header.strip() or not value.strip():
        raise ImproperlyConfigured(f"{name} must look like X-Forwarded-Proto:https, got {raw!r}")
    return "HTTP_" + header.strip().upper().replace("-", "_"), value.strip()


SECURE_PROXY_SSL_HEADER = env_proxy_header("SECURE_PROXY_SSL_HEADER")
# The proxy's Host header is the public name (needed for absolute SSO callback URLs).
USE_X_FORWARDED_HOST = env_bool("USE_X_FORWARDED_HOST", False)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
# Health and metrics are scraped over the private network, often in plain http.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# allauth builds callback URLs from the request; say https when the site is https.
ACCOUNT_DEFAULT_HTTP_PROTOCOL = "https" if _HTTPS else "http"

# --- operations: /metrics and /readyz (CONTRACT "Operations endpoints") ---------------------
NEXCOMPUTE_METRICS_TOKEN = env_secret("NEXCOMPUTE_METRICS_TOKEN", "")
NEXCOMPUTE_METRICS_ALLOWED_NETWORKS = env_list("NEXCOMPUTE_METRICS_ALLOWED_NETWORKS", [])
# /readyz: beat must have ticked within this many seconds (its heartbeat task runs every 10 s).
NEXCOMPUTE_READY_BEAT_MAX_AGE_SECONDS = env_float("NEXCOMPUTE_READY_BEAT_MAX_AGE_SECONDS", 60)
NEXCOMPUTE_READY_TIMEOUT_SECONDS = env_float("NEXCOMPUTE_READY_TIMEOUT_SECONDS", 2.0)

# --- login throttling (django-axes; README "Deploy") ------------------------------------------
AXES_ENABLED = env_bool("AXES_ENABLED", True)
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = env_float("AXES_COOLOFF_MINUTES", 15) / 60  # hours
# Lock the username, whatever the address: a lab shares one NAT address, and a guesser
# rotating addresses must not get more tries.
AXES_LOCKOUT_PARAMETERS = ["username"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
# axes.W006 asks to lock by address too. We lock by username on purpose: a lab shares one NAT
# address, so one student mistyping would lock out the whole room, while a guesser gets no
# more tries on a username by changing address, user agent or cookies.
SILENCED_SYSTEM_CHECKS = ["axes.W006"]

# --- logs ---------------------------------------------------------------------------------------
# LOG_FORMAT=json: one JSON object a line (python-json-logger), with the request, user, session
# and machine ids that nexcompute.logging puts on each record. Plain text is the default.
LOG_FORMAT = env_str("LOG_FORMAT", "plain")
LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_FORMAT not in {"plain", "json"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "context": {"()": "nexcompute.logcontext.ContextFilter"},
        "routine": {"()": "nexcompute.logcontext.RoutineToDebug"},
        "require_debug_false": {"()": "django.utils.log.RequireDebugFalse"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context"],
        },
        # As Django's default: server errors mailed to ADMINS when DEBUG is off.
        "mail_admins": {
            "class": "django.utils.log.AdminEmailHandler",
            "level": "ERROR",
            "filters": ["require_debug_false"],
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Replaces Django's own "django" handlers (a plain-text console), so that its lines
        # go through ours once, in LOG_FORMAT.
        "django": {"handlers": ["mail_admins"], "level": "INFO", "propagate": True},
        "django.db.backends": {"level": "WARNING"},
        # Every log-in and its clean-up at INFO; lockouts are WARNING and still show.
        "axes": {"level": "WARNING"},
        # Routine task lines at DEBUG (nexcompute.logcontext.RoutineToDebug).
        "celery.app.trace": {"filters": ["routine"]},
        "celery.worker.strategy": {"filters": ["routine"]},
        "celery.beat": {"filters": ["routine"]},
    },
}


def _beat(name: str, task: str, default_seconds: float) -> tuple[str, dict[str, Any]]:
    """One row of the beat table; the period can be overridden by NEXCOMPUTE_BEAT_<NAME>_SECONDS."""
    seconds = env_float(f"NEXCOMPUTE_BEAT_{name.upper()}_SECONDS", default_seconds)
    # `expires` just under the period: a backlog of stale runs is worthless.
    return name, {"task": task, "schedule": seconds, "options": {"expires": seconds * 0.9}}


CELERY_BEAT_SCHEDULE = dict(
    [
        _beat("silent_machines", "machines.tasks.mark_silent_machines_offline", 30),
        # Expiry every second: a lease ends within ~1 s of expires_at (the issue asks for 5 s).
        _beat("expire_sessions", "sessions.tasks.expire_sessions", 1),
        _beat("lease_warnings", "sessions.tasks.send_lease_warnings", 2),
        _beat("idle_sessions", "sessions.tasks.stop_idle_sessions", 10),
        _beat("owner_returned", "sessions.tasks.enforce_owner_returned", 2),
        _beat("lost_sessions", "sessions.tasks.end_lost_sessions", 5),
        _beat("stuck_cleanups", "sessions.tasks.enforce_cleanups", 5),
        _beat("stuck_starts", "sessions.tasks.enforce_starts", 5),
        # Proves beat ticks and a worker runs tasks (/readyz reads its time from Redis).
        _beat("beat_heartbeat", "nexcompute.tasks.beat_heartbeat", 10),
        _beat("metrics_history", "reports.tasks.downsample_metrics", 3600),
        # Hourly: each lab's finished local days are rolled up soon after its midnight.
        _beat("report_rollups", "reports.tasks.rollup_reports", 3600),
        # Hourly: the task sends each opted-in lab's report once, for the month just ended.
        _beat("monthly_reports", "reports.tasks.send_monthly_reports", 3600),
    ]
)

# Single sign-on (django-allauth: OIDC and SAML), from the SSO_* variables.
from nexcompute.sso_settings import *  # noqa: E402, F403
