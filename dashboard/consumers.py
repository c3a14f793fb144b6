"""The browser's live feed at ``/ws/dashboard/``: machine changes and the user's own sessions."""

from __future__ import annotations

import time
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from accounts.services import policy_for
from machines.models import Machine
from nexcompute.realtime import DASHBOARD_GROUP, user_group


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # refused before the socket opens
            return
        self.user = user
        self.hidden: set[int] = set()  # ids seen in batches that this user may not see
        await self._load_visible()
        self.groups_joined = [DASHBOARD_GROUP, user_group(user.pk)]
        for group in self.groups_joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "refresh":
            await self._load_visible()
            self.hidden = set()

    async def _load_visible(self) -> None:
        """Which machines this user may see (their quota policy's labs and GPUs)."""
        self.visible: set[int] = await database_sync_to_async(
            lambda: set(
                Machine.objects.usable_by(policy_for(self.user)).values_list("pk", flat=True)
            )
        )()
        self.visible_loaded = time.monotonic()

    async def dashboard_machines(self, event: dict[str, Any]) -> None:
        unknown = {m["id"] for m in event["machines"]} - self.visible - self.hidden
        # A machine enrolled after this socket opened: reload the visible set (at most twice a
        # second per socket) so a new lab computer appears on open dashboards right away. Ids
        # still not visible are remembered, so other labs' heartbeats cause no more lookups.
        if unknown and time.monotonic() - self.visible_loaded >= 0.5:
            await self._load_visible()
            self.hidden |= unknown - self.visible
        machines = [m for m in event["machines"] if m["id"] in self.visible]
        if not machines and not self.user.is_staff:
            return
        await self.send_json({"type": "machines", "machines": machines})

    async def session_updated(self, event: dict[str, Any]) -> None:
        # Only this user's group carries session events; re-check anyway.
        if event.get("owner_id", self.user.pk) != self.user.pk:
            return
        await self.send_json({"type": "session", "session_id": event["session_id"]})
