"""The pool of session accounts: a fresh OS identity for each session.

Accounts ``<prefix>1`` … ``<prefix>K`` (e.g. ``nxs-1`` … ``nxs-4``) are made by
:func:`create_accounts` (the agent's install step): system accounts with no password, no login
shell, home ``/nonexistent``, each with its own group, listed in ``cron.deny`` and ``at.deny``.
An account is handed to one live or not-yet-wiped session at a time, and handed out again only
after a verified wipe. One whose wipe failed is *retired*: it is wiped and proved again before it
is used, which happens only once staff cleared the machine (the server offers a quarantined
machine to nobody). The least recently used free account goes first, so two sessions in a row
run under different uids whenever the pool has two accounts.

A config with only the old ``session_user`` key is a pool of that one account; the guarantees
are the same (the next session under the same uid finds nothing), only uids repeat.

The pool's bookkeeping lives in the state file next to the sessions (``pool`` key).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexcompute_agent.sessions.wiper import Account

log = logging.getLogger(__name__)

DENY_FILES = ("/etc/cron.deny", "/etc/at.deny")
NOLOGIN = "/usr/sbin/nologin"


class PoolError(Exception):
    """No account can be handed out; the text says why."""


@dataclass
class Slot:
    name: str
    state: str = "free"  # free | busy | held (being checked) | retired
    session_id: int | None = None
    last_used: float = 0.0
    why: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "session_id": self.session_id,
            "last_used": self.last_used,
            "why": self.why,
        }


def lookup(name: str) -> Account:
    import pwd

    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise PoolError(
            f"session account {name!r} does not exist on this machine; create the pool with "
            "`nexcompute-agent install` (or `useradd --system --no-create-home --home-dir "
            f"/nonexistent --shell {NOLOGIN} --user-group {name}`)"
        ) from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise PoolError(f"session account {name!r} is root; sessions never run as root")
    # The wipe kills every process of the account and deletes every file it owns on every
    # local file system: never do that to a person's account. A session account has no home
    # and no login shell, as create_accounts() makes them.
    if pw.pw_dir != "/nonexistent" or not pw.pw_shell.endswith(("/nologin", "/false")):
        raise PoolError(
            f"{name!r} looks like a real account (home {pw.pw_dir}, shell {pw.pw_shell}); "
            "sessions only run as session accounts, whose every process and file the wipe "
            "removes. Use the pool (`nexcompute-agent enroll --create-accounts`), or make it "
            f"one: `usermod --home /nonexistent --shell {NOLOGIN} {name}`"
        )
    return Account(name=name, uid=pw.pw_uid, gid=pw.pw_gid)


class AccountPool:
    def __init__(self, names: list[str], saved: dict[str, Any] | None = None) -> None:
        self.slots: dict[str, Slot] = {n: Slot(n) for n in names}
        for name, raw in (saved or {}).items():
            if name not in self.slots or not isinstance(raw, dict):
                continue
            slot = self.slots[name]
            state = str(raw.get("state", "free"))
            # "held": the agent stopped while checking it; free, so the start-up check runs.
            slot.state = state if state in ("free", "busy", "retired") else "free"
            sid = raw.get("session_id")
            slot.session_id = int(sid) if isinstance(sid, int) else None
            try:
                slot.last_used = float(raw.get("last_used", 0.0) or 0.0)
            except (TypeError, ValueError):
                slot.last_used = 0.0
            slot.why = str(raw.get("why", ""))

    def as_dict(self) -> dict[str, Any]:
        return {name: slot.as_dict() for name, slot in self.slots.items()}

    def acquire(self, session_id: int) -> tuple[Account, bool]:
        """An account for ``session_id`` (already its own if it has one). The bool says the
        account was retired and must be wiped and proved before use."""
        for slot in self.slots.values():
            if slot.session_id == session_id and slot.state == "busy":
                return lookup(slot.name), False
        free = sorted(
            (s for s in self.slots.values() if s.state == "free"), key=lambda s: s.last_used
        )
        retired = [s for s in self.slots.values() if s.state == "retired"]
        if free:
            slot, was_retired = free[0], False
        elif retired:
            slot, was_retired = retired[0], True
        else:
            busy = ", ".join(f"{s.name} (session {s.session_id})" for s in self.slots.values())
            raise PoolError(f"every session account is in use: {busy}")
        account = lookup(slot.name)
        slot.state, slot.session_id, slot.last_used, slot.why = "busy", session_id, time.time(), ""
        return account, was_retired

    def release(self, name: str, *, verified: bool, why: str = "") -> None:
        slot = self.slots.get(name)
        if slot is None:
            return
        slot.session_id = None
        slot.last_used = time.time()
        slot.state = "free" if verified else "retired"
        slot.why = "" if verified else why[:500]
        if not verified:
            log.error("session account %s retired: %s", name, why)

    def hold_free(self, *, skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Take every free account (but ``skip``) out of the pool while it is checked
        (``release`` puts each back, or retires it)."""
        names = [s.name for s in self.slots.values() if s.state == "free" and s.name not in skip]
        for name in names:
            self.slots[name].state = "held"
        return names

    def owner_of(self, session_id: int) -> str | None:
        for slot in self.slots.values():
            if slot.session_id == session_id:
                return slot.name
        return None

    def busy(self) -> dict[str, int]:
        return {
            s.name: s.session_id
            for s in self.slots.values()
            if s.state == "busy" and s.session_id is not None
        }


def pool_names(prefix: str, size: int, legacy_user: str) -> list[str]:
    if size > 0:
        return [f"{prefix}{i}" for i in range(1, size + 1)]
    return [legacy_user]


def create_accounts(names: list[str]) -> list[Account]:
    """Create the accounts that are missing (root; the install step and the tests). Each is a
    system account with its own group, no password (locked), no login shell, no home, and is
    denied cron and at."""
    import pwd

    out = []
    for name in names:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(  # noqa: S603
                ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",  # noqa: S607
                 "--shell", NOLOGIN, "--user-group", name],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        out.append(lookup(name))
    deny(names)
    return out


def deny(names: list[str]) -> None:
    """List the accounts in cron.deny and at.deny (made if missing)."""
    for path in map(Path, DENY_FILES):
        try:
            have = path.read_text().split() if path.exists() else []
        except OSError:
            continue
        missing = [n for n in names if n not in have]
        if not missing:
            continue
        with contextlib.suppress(OSError):
            new = not path.exists()
            with path.open("a", encoding="utf-8") as fh:
                fh.write("".join(f"{n}\n" for n in missing))
            if new:  # readable by the setgid crontab and at; an existing file keeps its mode
                os.chmod(path, 0o644)


def remove_accounts(names: list[str]) -> None:
    """Delete the accounts (uninstall and tests) and their deny lines."""
    for name in names:
        subprocess.run(  # noqa: S603
            ["userdel", name],
            check=False,
            capture_output=True,
            timeout=60,  # noqa: S607
        )
    for path in map(Path, DENY_FILES):
        with contextlib.suppress(OSError):
            lines = path.read_text().splitlines()
            kept = [line for line in lines if line.strip() not in names]
            if kept != lines:
                path.write_text("".join(f"{line}\n" for line in kept))
