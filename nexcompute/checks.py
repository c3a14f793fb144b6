"""System checks with stable ids: bad combinations fail at start-up (`migrate`, `check`)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register


@register()
def check_settings(app_configs: Any, **kwargs: Any) -> list[Error | Warning]:
    problems: list[Error | Warning] = []
    if not settings.DEBUG and settings.SECRET_KEY == settings.INSECURE_DEFAULT_KEY:
        problems.append(
            Error(
                "SECRET_KEY is the public development default while DEBUG is off",
                hint="Set SECRET_KEY (or SECRET_KEY_FILE) to a long random value.",
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
