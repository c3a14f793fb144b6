"""channels' WebsocketCommunicator, minus its test-only patch.

``channels.testing`` turns ``channels.db.close_old_connections`` into a no-op while a test
sends or receives, for tests inside a transaction. Our consumer tests are transactional
(``django_db(transaction=True)``), so that patch only changed what runs: each executor thread
kept its pooled connection, the threads died with their test's event loop, and the pool ran
dry a few hundred tests later ("couldn't get a connection after 10.00 sec"). Without it the
consumers release connections exactly as they do under daphne.
"""

from __future__ import annotations

from typing import Any

from asgiref.testing import ApplicationCommunicator
from channels.testing import WebsocketCommunicator as ChannelsWebsocketCommunicator


class WebsocketCommunicator(ChannelsWebsocketCommunicator):
    async def send_input(self, message: Any) -> None:
        await ApplicationCommunicator.send_input(self, message)

    async def receive_output(self, timeout: float = 1) -> Any:
        return await ApplicationCommunicator.receive_output(self, timeout)
