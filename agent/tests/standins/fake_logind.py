"""Stand-in for systemd-logind on a real D-Bus bus (logind itself needs systemd as PID 1,
which this machine does not run).

    python fake_logind.py BUS_ADDRESS STATE_JSON

Owns ``org.freedesktop.login1`` on the bus and answers ``Manager.ListSessions`` and
``Properties.GetAll`` / ``Get`` on each session object with what STATE_JSON says, re-read on
every call so a test changes the seat by rewriting the file::

    {"sessions": [{"id": "2", "uid": 1000, "user": "alice", "seat": "seat0",
                   "class": "user", "active": true, "remote": false,
                   "idle": false, "idle_since_usec": 0, "locked": false}]}

Prints ``ready`` on stdout once the name is owned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

NAME = "org.freedesktop.login1"
BASE = "/org/freedesktop/login1"


def session_path(sid: str) -> str:
    return f"{BASE}/session/_3{sid}"  # logind escapes a leading digit the same way


def properties(s: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    return {
        "Id": ("s", s["id"]),
        "Name": ("s", s["user"]),
        "Seat": ("(so)", (s["seat"], f"{BASE}/seat/{s['seat']}" if s["seat"] else "/")),
        "Class": ("s", s.get("class", "user")),
        "Type": ("s", s.get("type", "wayland")),
        "Remote": ("b", bool(s.get("remote", False))),
        "Active": ("b", bool(s.get("active", True))),
        "IdleHint": ("b", bool(s.get("idle", False))),
        "IdleSinceHint": ("t", int(s.get("idle_since_usec", 0))),
        "LockedHint": ("b", bool(s.get("locked", False))),
    }


def main() -> None:
    address, state_file = sys.argv[1], Path(sys.argv[2])
    conn = open_dbus_connection(address)
    reply = conn.send_and_get_reply(message_bus.RequestName(NAME))
    assert reply.body[0] == 1, f"could not own {NAME}: {reply.body}"
    print("ready", flush=True)
    while True:
        msg = conn.receive()
        if msg.header.message_type != MessageType.method_call:
            continue
        fields = msg.header.fields
        path, member = fields.get(HeaderFields.path), fields.get(HeaderFields.member)
        sessions = json.loads(state_file.read_text())["sessions"]
        by_path = {session_path(s["id"]): s for s in sessions}
        if path == BASE and member == "ListSessions":
            rows = [
                (s["id"], s["uid"], s["user"], s["seat"], session_path(s["id"])) for s in sessions
            ]
            conn.send(new_method_return(msg, "a(susso)", (rows,)))
        elif path in by_path and member == "GetAll":
            conn.send(new_method_return(msg, "a{sv}", (properties(by_path[path]),)))
        elif path in by_path and member == "Get":
            value = properties(by_path[path])[msg.body[1]]
            conn.send(new_method_return(msg, "v", (value,)))
        else:
            conn.send(
                new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (f"{member}",))
            )


if __name__ == "__main__":
    main()
