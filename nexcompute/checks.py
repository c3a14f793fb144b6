"""System checks with stable ids: bad combinations fail at start-up (`migrate`, `check`)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register

# Values seen in examples and tutorials: anyone can sign sessions with them.
WELL_KNOWN_KEYS = frozenset(
    {
        "change-me",
        "changeme",
        "change_me",
        "secret",
        "secret-key",
        "secret_key",
        "django",
        "insecure",
        "development",
        "dev",
        "test",
        "password",
        "nexcompute",
        "your-secret-key",
        "please-change-me",
        "replace-me",
        "xxx",
    }
)
MIN_SECRET_KEY_LENGTH = 50
MIN_SECRET_KEY_UNIQUE = 5


def secret_key_problem(key: str) -> str | None:
    """Why ``key`` is unfit for production, or None. The same bar as Django's security.W009,
    plus the publicly known values (ours, Django's ``django-insecure-`` keys, examples)."""
    if key == settings.INSECURE_DEFAULT_KEY or key.startswith("django-insecure"):
        return "SECRET_KEY is a public development key"
    if key.strip().lower() in WELL_KNOWN_KEYS:
        return f"SECRET_KEY is the well-known example value {key!r}"
    if len(key) < MIN_SECRET_KEY_LENGTH or len(set(key)) < MIN_SECRET_KEY_UNIQUE:
        return (
            f"SECRET_KEY is too short or too plain (needs {MIN_SECRET_KEY_LENGTH}+ characters, "
            f"{MIN_SECRET_KEY_UNIQUE}+ different ones)"
        )
    return None


@register()
def check_settings(app_configs: Any, **kwargs: Any) -> list[Error | Warning]:
    problems: list[Error | Warning] = []
    weak = secret_key_problem(settings.SECRET_KEY)
    if not settings.DEBUG and weak:
        # An Error, not Django's deploy-only warning: `migrate` and every start refuse it.
        problems.append(
            Error(
                f"{weak} while DEBUG is off",
                hint="Set SECRET_KEY (or SECRET_KEY_FILE) to a long random value, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(50))'.",
                id="nexcompute.E001",
            )
        )
    layer = settings.CHANNEL_LAYERS["default"]["BACKEND"]
    if not settings.DEBUG and layer == "channels.layers.InMemoryChannelLayer":
        problems.append(
            Error(
                "the in-memory channel layer cannot reach agents connected to other processes",
                hint="Use Redis (REDIS_URL) in production.",
                id="nexcompute.E002",
            )
        )
    if settings.TIME_ZONE != "UTC" or not settings.USE_TZ:
        problems.append(
            Error("times are stored in UTC: keep TIME_ZONE=UTC and USE_TZ", id="nexcompute.E003")
        )
    if settings.NEXCOMPUTE_OFFLINE_GRACE_SECONDS <= settings.NEXCOMPUTE_HEARTBEAT_SECONDS:
        problems.append(
            Warning(
                "the offline grace is not longer than the heartbeat: machines will flap",
                hint="Make NEXCOMPUTE_OFFLINE_GRACE_SECONDS about 3x the heartbeat.",
                id="nexcompute.W001",
            )
        )
    return problems
