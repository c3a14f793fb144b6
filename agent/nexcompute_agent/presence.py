"""Is the owner sitting at this computer?

A lab computer is lent out only while nobody uses it at its keyboard. The agent samples a
:class:`PresenceDetector` every ``presence_poll_seconds`` and reports ``owner_present`` (and
``idle_seconds`` when known) in every heartbeat; a change is reported at once.

What works where:

* **Linux with systemd-logind** (:class:`LogindPresenceDetector`, the default where logind
  answers on the system bus): the sessions on ``seat0`` of class ``user`` (not the login
  screen's ``greeter``) that are not remote. The owner is present while one of them is
  ``Active``; ``idle_seconds`` comes from its ``IdleHint``/``IdleSinceHint`` (0 while not idle)
  and ``locked`` from ``LockedHint``. A locked screen whose desktop does not set the idle hint
  counts as idle from the moment the agent first saw it locked. The server decides what an idle
  or locked owner means (the lab's ``owner_idle_minutes``). This is the only source that sees a
  GNOME (GDM) login on Ubuntu, which utmp records on a ``tty2``-like line without a display.
  D-Bus is spoken with ``jeepney`` (pure Python, no libdbus, blocking calls with a timeout):
  one small request per poll, no event loop of its own to run beside the agent's.
* **Linux without logind** (:class:`LinuxPresenceDetector`, also the fallback whenever logind
  stops answering): logged-in users from utmp (``psutil.users()``).
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

import contextlib
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psutil

if TYPE_CHECKING:
    from collections.abc import Iterable

    from nexcompute_agent.config import AgentConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PresenceSample:
    owner_present: bool
    users: list[str] = field(default_factory=list)
    idle_seconds: float | None = None
    locked: bool | None = None  # None: this source cannot tell
    source: str = "utmp"  # logind | utmp | users


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
        return PresenceSample(bool(users), users, None, source="users")


LOGIN1 = "org.freedesktop.login1"
LOGIN1_PATH = "/org/freedesktop/login1"
DBUS_TIMEOUT = 1.0  # seconds per call: sample() runs on the agent's event loop


class LogindUnavailable(Exception):
    """No system bus, no logind on it, or an answer we cannot read."""


class LogindClient:
    """The few logind calls presence needs, over one blocking D-Bus connection (reopened after
    a failure). The bus is the system bus, or ``DBUS_SYSTEM_BUS_ADDRESS`` when set (the tests
    point it at a session bus with a stand-in logind)."""

    def __init__(self, timeout: float = DBUS_TIMEOUT) -> None:
        self.timeout = timeout
        self._conn: Any = None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _call(
        self, path: str, interface: str, method: str, sig: str = "", body: tuple[Any, ...] = ()
    ) -> Any:
        try:
            from jeepney import DBusAddress, new_method_call
            from jeepney.io.blocking import open_dbus_connection
            from jeepney.wrappers import unwrap_msg
        except ImportError:
            raise LogindUnavailable("jeepney is not installed") from None
        try:
            if self._conn is None:
                self._conn = open_dbus_connection(bus="SYSTEM", enable_fds=False)
            address = DBusAddress(path, bus_name=LOGIN1, interface=interface)
            reply = self._conn.send_and_get_reply(
                new_method_call(address, method, sig, body), timeout=self.timeout
            )
            return unwrap_msg(reply)
        except Exception as exc:  # OSError, TimeoutError, DBusErrorResponse, bad addresses
            self.close()
            raise LogindUnavailable(f"{type(exc).__name__}: {exc}") from None

    def sessions(self) -> list[tuple[str, int, str, str, str]]:
        """``ListSessions``: (id, uid, user, seat, object path) of every session."""
        (rows,) = self._call(LOGIN1_PATH, f"{LOGIN1}.Manager", "ListSessions")
        return [(str(a), int(b), str(c), str(d), str(e)) for a, b, c, d, e in rows]

    def session_properties(self, path: str) -> dict[str, Any]:
        (props,) = self._call(
            path, "org.freedesktop.DBus.Properties", "GetAll", "s", (f"{LOGIN1}.Session",)
        )
        return {str(k): v[1] for k, v in props.items()}


class LogindPresenceDetector:
    """Presence from systemd-logind (see the module docstring); utmp when logind fails."""

    def __init__(
        self,
        ignore_users: Iterable[str] = (),
        client: LogindClient | None = None,
        fallback: PresenceDetector | None = None,
    ) -> None:
        self.ignore_users = frozenset(ignore_users)
        self.client = client or LogindClient()
        self.fallback = fallback or LinuxPresenceDetector(ignore_users)
        self._locked_since: dict[str, float] = {}  # session id -> when first seen locked

    def available(self) -> bool:
        try:
            self.client.sessions()
        except LogindUnavailable:
            return False
        return True

    def sample(self) -> PresenceSample:
        try:
            return self._sample()
        except LogindUnavailable as exc:
            log.debug("logind unavailable (%s); using utmp", exc)
            return self.fallback.sample()

    def _sample(self) -> PresenceSample:
        now = time.time()
        users: set[str] = set()
        idle: list[float] = []
        locked: list[bool] = []
        seen: set[str] = set()
        for sid, _uid, user, seat, path in self.client.sessions():
            if seat != "seat0" or user in self.ignore_users:
                continue
            props = self.client.session_properties(path)
            if props.get("Class") != "user" or props.get("Remote") or not props.get("Active"):
                continue  # the login screen, a remote session, or a switched-away user
            seen.add(sid)
            users.add(user)
            is_locked = bool(props.get("LockedHint"))
            locked.append(is_locked)
            since = 0.0
            if props.get("IdleHint"):
                usec = int(props.get("IdleSinceHint") or 0)
                since = max(0.0, now - usec / 1e6) if usec else 0.0
            if is_locked:
                first = self._locked_since.setdefault(sid, now)
                since = max(since, now - first)
            else:
                self._locked_since.pop(sid, None)
            idle.append(since)
        for sid in set(self._locked_since) - seen:
            del self._locked_since[sid]
        if not users:
            return PresenceSample(False, [], None, None, "logind")
        return PresenceSample(True, sorted(users), min(idle), all(locked), "logind")


def make_detector(config: AgentConfig) -> PresenceDetector:
    """Linux: logind, asked at every sample, with utmp whenever it does not answer (so a
    logind that starts after the agent is picked up); elsewhere: logged-in users."""
    if sys.platform.startswith("linux"):
        return LogindPresenceDetector(config.presence_ignore_users)
    return UsersPresenceDetector(config.presence_ignore_users)
