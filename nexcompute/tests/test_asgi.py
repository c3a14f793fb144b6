"""The ASGI entry point's tuning of daphne's websocket server."""

from __future__ import annotations

import pprint

from autobahn.websocket import protocol as websocket_protocol

import nexcompute.asgi  # noqa: F401  (the entry point daphne loads)


def test_autobahn_makes_its_option_table_text_only_when_it_is_logged() -> None:
    table = [("openHandshakeTimeout", 5, "WebSocketServerFactory"), ("autoPingInterval", 20, "x")]
    deferred = websocket_protocol.pformat(table)  # what each new connection calls
    assert not isinstance(deferred, str)  # nothing formatted yet
    assert str(deferred) == pprint.pformat(table)  # the same text when a debug line wants it


def test_the_timings_autobahn_can_track_still_print_as_text() -> None:
    timings = websocket_protocol.Timings()
    timings.track("onOpen")
    text = str(timings)
    assert isinstance(text, str) and "onOpen" in text
