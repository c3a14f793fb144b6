"""ASGI entry point: HTTP through Django, websockets through Channels.

The Django application is built before any consumer is imported, so that models are ready.
"""

from __future__ import annotations

import gc
import os
import pprint
import sys
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nexcompute.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from nexcompute.routing import websocket_application  # noqa: E402

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application})


class _LazyPformat:
    """``pprint.pformat`` when (if ever) the text is wanted."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return pprint.pformat(self.value)


def _defer_autobahn_debug_text() -> None:
    """Autobahn (daphne's websocket server) pretty-prints every connection's option table for
    a debug log line that is formatted only when debug logging is on: about 7 % of the event
    loop's time in a fleet's reconnect storm (py-spy, bench/fleet.py --restart). The text is
    now made only if that line is logged."""
    try:
        from autobahn.websocket import protocol as websocket_protocol
    except ImportError:  # not under daphne
        return
    if getattr(websocket_protocol, "pformat", None) is pprint.pformat:
        setattr(websocket_protocol, "pformat", _LazyPformat)  # noqa: B010 (a module we do not type)
        # The module's one use that must give text at once: its timings' str().
        timings = websocket_protocol.Timings
        timings.__str__ = lambda self: pprint.pformat(self._timings)  # type: ignore[method-assign]


_defer_autobahn_debug_text()

# Thousands of long-lived consumers make every collection of an older generation walk a large
# heap, and the event loop stalls meanwhile (beat -> dashboard latency, bench/fleet.py). The
# young generation is collected by the clock as well (nexcompute/gc_pacer.py: while a fleet
# beats, CPython's count alone let it grow to 120,000-365,000 objects), and by the count when
# allocations run ahead (agents connecting: 50,000). When CPython starts them itself, the
# middle generation goes after every third young collection (threshold 2): at 20, with nearly
# every object of a connecting agent surviving (about 150 per connection), it held up to a
# million objects, and one collection of it stopped the loop for 0.7-1.0 s at 14,000-18,000
# agents. A full collection waits for 1,000 middle ones and for the old generation to have
# taken in a quarter more (CPython's rule). It walks every object (2.9-3.6 s at 19,500 agents
# here). With the pacer's middle collection every 2 s the count allows one about every 33
# minutes of a beating fleet; how often it comes then was not measured (watch
# nexcompute_gc_pause_seconds{generation="2"}). What start-up built is left out of every walk.
gc.set_threshold(50_000, 2, 1000)
gc.freeze()

# The event loop shares the GIL with the agent link's database threads (12, plus 4 for the
# credential check). Every socket call the loop makes lets go of the GIL, and getting it back
# waited for a busy thread's switch interval (5 ms by default): py-spy counted the loop thread
# waiting for the GIL 56% of the time while 4,000 agents connected at 133 a second, so a
# Redis round trip took a turn of a loop running seconds late, and the layer's pool ran dry.
# 1 ms, with the one-trip join (channel_layer.join_group_alone) in both runs: that step took
# 34 s instead of 37, the next (8,000) 38 s at p99 511 ms instead of 49 s at 1,468 ms
# (bench/fleet.py --processes 1, README "Several web processes").
sys.setswitchinterval(0.001)
