"""ASGI entry point: HTTP through Django, websockets through Channels.

The Django application is built before any consumer is imported, so that models are ready.
"""

from __future__ import annotations

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nexcompute.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from nexcompute.routing import websocket_application  # noqa: E402

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application})

# Thousands of long-lived consumers make every full garbage collection walk a large heap, and
# the event loop stalls meanwhile (heartbeat latency spikes, bench/fleet.py). Collect young
# objects less often, and leave what start-up built out of the collector's walks.
gc.set_threshold(50_000, 20, 100)
gc.freeze()
