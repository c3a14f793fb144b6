from __future__ import annotations

import pytest

from nexcompute_agent.config import AgentConfig
from nexcompute_agent.presence import (
    LinuxPresenceDetector,
    UsersPresenceDetector,
    is_local_login,
    make_detector,
)


@pytest.mark.parametrize(
    ("terminal", "host", "local"),
    [
        ("tty1", "", True),
        (":0", ":0", True),
        (":1", "", True),
        ("seat0", "", True),
        ("pts/2", ":0", True),  # a terminal emulator on the local display
        ("pts/0", "10.1.2.3", False),  # ssh
        ("pts/0", "laptop.example.edu", False),
        ("tty1", "10.1.2.3", False),
        ("pts/3", "", False),  # tmux/screen without a seat: not proof of a person at the desk
        (None, None, False),
    ],
)
def test_local_logins(terminal: str | None, host: str | None, local: bool) -> None:
    assert is_local_login(terminal, host) is local


def test_detectors_sample_this_host_without_raising() -> None:
    for detector in (LinuxPresenceDetector(), UsersPresenceDetector()):
        sample = detector.sample()
        assert isinstance(sample.owner_present, bool)
        assert sample.owner_present == bool(sample.users)
        assert sample.idle_seconds is None or sample.idle_seconds >= 0


def test_ignored_users_never_count() -> None:
    import psutil

    everyone = [u.name for u in psutil.users()]
    assert LinuxPresenceDetector(ignore_users=everyone).sample().owner_present is False
    assert UsersPresenceDetector(ignore_users=everyone).sample().owner_present is False


def test_make_detector_picks_by_platform() -> None:
    detector = make_detector(AgentConfig(server="http://x"))
    assert hasattr(detector, "sample")
