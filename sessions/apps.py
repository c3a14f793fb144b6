from __future__ import annotations

from django.apps import AppConfig


class ComputeSessionsConfig(AppConfig):
    # Django derives labels from the last part of the path; "sessions" would collide with
    # django.contrib.sessions, which admin and Channels' AuthMiddlewareStack rely on.
    name = "sessions"
    label = "compute_sessions"
    verbose_name = "Compute sessions"
