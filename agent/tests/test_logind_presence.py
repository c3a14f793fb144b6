"""Owner presence from systemd-logind, against a real D-Bus daemon.

logind itself needs systemd as PID 1, which this machine lacks; a stand-in owning
``org.freedesktop.login1`` (``standins/fake_logind.py``) answers on a real ``dbus-daemon``, and
the agent reaches it through the real code path (jeepney, ``DBUS_SYSTEM_BUS_ADDRESS``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import FakeNexus, write_config_file

from nexcompute_agent.config import AgentConfig
from nexcompute_agent.presence import (
    LinuxPresenceDetector,
    LogindClient,
    LogindPresenceDetector,
    make_detector,
)
from nexcompute_agent.protocol import Heartbeat

if TYPE_CHECKING:
    from collections.abc import Iterator

HERE = Path(__file__).resolve().parent


class Seat:
    """The stand-in logind's sessions; ``set`` rewrites what it answers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.set([])

    def set(self, sessions: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sessions": sessions}))
        tmp.replace(self.path)


@pytest.fixture
def logind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Seat]:
    daemon = shutil.which("dbus-daemon")
    assert daemon, "dbus-daemon is needed (apt-get install dbus-daemon)"
    bus = subprocess.Popen(
        [daemon, "--session", "--nofork", "--print-address"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seat = Seat(tmp_path / "seat.json")
    stand_in = None
    try:
        assert bus.stdout is not None
        address = bus.stdout.readline().strip()
        assert address.startswith("unix:"), address
        stand_in = subprocess.Popen(
            [sys.executable, str(HERE / "standins" / "fake_logind.py"), address, str(seat.path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert stand_in.stdout is not None
        assert stand_in.stdout.readline().strip() == "ready"
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
        yield seat
    finally:
        for proc in (stand_in, bus):
            if proc is not None:
                proc.kill()
                proc.wait(5)


def user_session(**kw: Any) -> dict[str, Any]:
    base = {"id": "2", "uid": 1000, "user": "alice", "seat": "seat0", "class": "user"}
    return {**base, "active": True, "remote": False, "idle": False, "locked": False, **kw}


GREETER = {"id": "c1", "uid": 120, "user": "gdm", "seat": "seat0", "class": "greeter"}
SSH = {"id": "7", "uid": 1001, "user": "bob", "seat": "", "class": "user", "remote": True}


def test_an_active_session_on_seat0_is_the_owner(logind: Seat) -> None:
    logind.set([GREETER, user_session()])
    sample = LogindPresenceDetector().sample()
    assert (sample.owner_present, sample.users, sample.source) == (True, ["alice"], "logind")
    assert sample.idle_seconds == 0.0 and sample.locked is False


def test_idle_time_comes_from_idle_since_hint(logind: Seat) -> None:
    since = time.time() - 600
    logind.set([user_session(idle=True, idle_since_usec=int(since * 1e6))])
    sample = LogindPresenceDetector().sample()
    assert sample.owner_present is True and sample.locked is False
    assert sample.idle_seconds is not None and 600 <= sample.idle_seconds < 620


def test_a_locked_screen_is_reported_and_counts_as_idle_from_the_lock(logind: Seat) -> None:
    detector = LogindPresenceDetector()
    logind.set([user_session(locked=True)])  # this desktop does not set the idle hint
    first = detector.sample()
    assert (first.owner_present, first.locked) == (True, True)
    time.sleep(0.3)  # idle time must grow with the lock, measured on the agent's clock
    later = detector.sample()
    assert later.idle_seconds is not None and later.idle_seconds >= 0.3
    logind.set([user_session(locked=False)])
    unlocked = detector.sample()
    assert (unlocked.locked, unlocked.idle_seconds) == (False, 0.0)


def test_no_session_on_seat0_means_nobody_at_the_keyboard(logind: Seat) -> None:
    # Logged in, but not at this seat: over ssh, a greeter, a user switched away, a remote one.
    others = [
        SSH,
        GREETER,
        user_session(id="3", active=False),
        user_session(id="4", seat="seat1"),
        user_session(id="5", remote=True),
    ]
    logind.set(others)
    # The stand-in really lists them (the detector is not simply seeing nothing).
    assert len(LogindClient().sessions()) == len(others)
    sample = LogindPresenceDetector().sample()
    assert (sample.owner_present, sample.users, sample.source) == (False, [], "logind")
    assert sample.idle_seconds is None and sample.locked is None


def test_ignored_users_do_not_count(logind: Seat) -> None:
    logind.set([user_session(user="kiosk")])
    assert LogindPresenceDetector(["kiosk"]).sample().owner_present is False


def test_utmp_is_the_fallback_when_logind_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    detector = make_detector(AgentConfig(server="http://x"))
    assert isinstance(detector, LogindPresenceDetector)
    sample = detector.sample()
    assert sample.source == "utmp"
    assert sample.owner_present == LinuxPresenceDetector().sample().owner_present


async def test_heartbeat_carries_idle_and_locked(
    logind: Seat, nexus: FakeNexus, tmp_path: Path, start_agent: Any
) -> None:
    config = write_config_file(tmp_path / "agent.toml", nexus.url)
    logind.set([user_session()])
    await start_agent(config, presence=make_detector(config))
    conn = await nexus.next_connection()
    beat = await conn.next_frame(lambda m: isinstance(m, Heartbeat) and m.owner_present)
    assert beat.locked is False
    since = int((time.time() - 90) * 1e6)
    logind.set([user_session(locked=True, idle=True, idle_since_usec=since)])
    # Sent at once on the change (heartbeat_seconds is 0.2 here, but the poll is what sees it).
    beat = await conn.next_frame(lambda m: isinstance(m, Heartbeat) and m.locked is True)
    assert beat.owner_present is True and beat.idle_seconds is not None
    assert beat.idle_seconds >= 90
