from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from dashboard.consumers import DashboardConsumer
from machines.auth import AgentAuthMiddleware
from sessions.agent_link import AgentConsumer

websocket_urlpatterns: list[Any] = [
    # Agents are not browsers: no cookies, no Origin check; the Bearer credential decides.
    path("ws/agent/", AgentAuthMiddleware(AgentConsumer.as_asgi())),
    path(
        "ws/dashboard/",
        AllowedHostsOriginValidator(AuthMiddlewareStack(DashboardConsumer.as_asgi())),
    ),
]

websocket_application = URLRouter(websocket_urlpatterns)
