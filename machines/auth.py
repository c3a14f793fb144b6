"""ASGI middleware that authenticates an agent from ``Authorization: Bearer <credential>``.

It runs before the consumer: a missing, wrong or revoked credential leaves ``scope["machine"]``
as None and the consumer refuses the handshake before the socket opens.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from channels.db import database_sync_to_async

from machines.services import machine_authenticate


def bearer_from_scope(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            try:
                text = value.decode("latin-1")
            except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
                return None
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


# The credential check has threads of its own: in a reconnect storm the hellos queue in the
# agent link's pool, and a handshake stuck behind them past daphne's 5 s connect timeout is
# answered 403, which an agent takes for a refused credential.
_AUTH_EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="agent-auth")


class AgentAuthMiddleware:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        token = bearer_from_scope(scope)
        machine = (
            await database_sync_to_async(
                machine_authenticate, thread_sensitive=False, executor=_AUTH_EXECUTOR
            )(token)
            if token
            else None
        )
        return await self.inner({**scope, "machine": machine}, receive, send)
