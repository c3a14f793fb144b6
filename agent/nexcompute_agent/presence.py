"""Is the owner sitting at this computer?

A lab computer is lent out only while nobody uses it at its keyboard. The agent samples a
:class:`PresenceDetector` every ``presence_poll_seconds`` and reports ``owner_present`` (and
``idle_seconds`` when known) in every heartbeat; a change is reported at once.

What works where:

* **Linux** (:class:`LinuxPresenceDetector`): logged-in users from utmp (``psutil.users()``).
  Only local seats count: text consoles (``tty1``), X/Wayland displays (``:0``), logind seats
  (``seat0``) and terminals inside a local display (``pts/N`` with host ``:0``). SSH logins
  (entries with a remote host) are not "at the keyboard". ``idle_seconds`` comes from the
  access time of ``/dev/ttyN`` for console logins; graphical sessions give ``None``.
* **Windows and macOS** (:class:`UsersPresenceDetector`): any logged-in user without a remote
  host counts (macOS reports the GUI login as terminal ``console``; Windows lists interactive
  and RDP sessions, RDP ones carrying the client host). No idle time.

Users in ``presence_ignore_users`` (e.g. a kiosk or auto-login account) never count.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil

if TYPE_CHECKING:
    from collections.abc import Iterable

    from nexcompute_agent.config import AgentConfig


@dataclass(frozen=True)
class PresenceSample:
    owner_present: bool
    users: list[str] = field(default_factory=list)
    idle_seconds: float | None = None


class PresenceDetector(Protocol):
    def sample(self) -> PresenceSample:
        """Return the current presence. Must be quick (called on the event loop) and not raise."""
        ...


_LOCAL_TERMINAL = re.compile(r"^(tty\d+|:\d+(\.\d+)?|seat\d+|console)$")
_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1"}


def is_local_login(terminal: str | None, host: str | None) -> bool:
    """True for a login at this machine's own keyboard/screen, False for a remote one."""
    terminal = terminal or ""
    host = host or ""
    if re.match(r"^:\d+(\.\d+)?$", host):
        # An X display: the login itself (":0") or a terminal emulator in it ("pts/1").
        return True
    if host not in _LOCAL_HOSTS:
        return False  # ssh, rdp, telnet: someone elsewhere
    return bool(_LOCAL_TERMINAL.match(terminal))


class LinuxPresenceDetector:
    def __init__(self, ignore_users: Iterable[str] = (), dev: Path = Path("/dev")) -> None:
        self.ignore_users = frozenset(ignore_users)
        self.dev = dev

    def sample(self) -> PresenceSample:
        try:
            entries = psutil.users()
        except OSError:
            return PresenceSample(owner_present=False)
        users: set[str] = set()
        idle: list[float] = []
        unmeasured = False  # a local login whose idle time we cannot read (graphical session)
        now = time.time()
        for entry in entries:
            if entry.name in self.ignore_users or not is_local_login(entry.terminal, entry.host):
                continue
            users.add(entry.name)
            terminal = entry.terminal or ""
            if not re.match(r"^tty\d+$", terminal):
                unmeasured = True
                continue
            try:
                idle.append(max(0.0, now - (self.dev / terminal).stat().st_atime))
            except OSError:
                unmeasured = True
        idle_seconds = min(idle) if idle and not unmeasured else None
        return PresenceSample(bool(users), sorted(users), idle_seconds)


class UsersPresenceDetector:
    """Windows/macOS fallback: any logged-in user without a remote host is present."""

    def __init__(self, ignore_users: Iterable[str] = ()) -> None:
        self.ignore_users = frozenset(ignore_users)

    def sample(self) -> PresenceSample:
        try:
            entries = psutil.users()
        except OSError:
            return PresenceSample(owner_present=False)
        users = sorted(
            {
                e.name
                for e in entries
                if e.name not in self.ignore_users and (e.host or "") in _LOCAL_HOSTS
            }
        )
        return PresenceSample(bool(users), users, None)


def make_detector(config: AgentConfig) -> PresenceDetector:
    if sys.platform.startswith("linux"):
        return LinuxPresenceDetector(config.presence_ignore_users)
    return UsersPresenceDetector(config.presence_ignore_users)
