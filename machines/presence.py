"""Is the owner at the keyboard, as the server counts it.

The agent reports what it sees (``owner_present``, ``idle_seconds``, ``locked``: logind or
utmp, see ``agent/nexcompute_agent/presence.py``); the lab's settings decide what that means:

* an owner idle, or with the screen locked, for ``Lab.owner_idle_minutes`` or longer counts
  as away (0: idleness never counts), so a locked screen left logged in does not block the
  machine for good;
* after the owner leaves (or goes idle), the machine is offered again only once they have been
  away for ``Lab.owner_reoffer_minutes`` (0: at once), so someone stepping out for coffee does
  not find a student's session on their computer;
* an owner who comes back is counted present at once: the returning owner still wins (the
  lease policy warns and then ends a running session, ``sessions.policy``).

The rule is pure (:func:`counts_present`, :class:`OwnerPresence`); the agent link keeps one
:class:`OwnerPresence` per connection and writes only changes through
``machines.services.machine_set_owner_present``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PresenceRules:
    idle_minutes: int = 0
    reoffer_minutes: int = 0


def counts_present(
    *, rules: PresenceRules, owner_present: bool, idle_seconds: float | None
) -> bool:
    """The agent's report with the lab's idle rule applied (no re-offer delay)."""
    if not owner_present:
        return False
    limit = rules.idle_minutes * 60
    return not (limit and idle_seconds is not None and idle_seconds >= limit)


def away_reason(*, idle_seconds: float | None, locked: bool | None) -> str:
    minutes = 0 if idle_seconds is None else int(idle_seconds // 60)
    how = "with the screen locked" if locked else "idle"
    return f"the person logged in at the computer has been {how} for {minutes} min"


class OwnerPresence:
    """The owner's presence as the server counts it, for one agent connection.

    ``update`` takes each report and returns the presence to record: present at once, absent
    only after ``reoffer_minutes`` of continuous absence (the clock is the caller's
    ``now``, in seconds).
    """

    def __init__(self, rules: PresenceRules, present: bool) -> None:
        self.rules = rules
        self.present = present
        self.away_since: float | None = None

    def update(self, reported: bool, now: float) -> bool:
        if reported:
            self.away_since = None
            self.present = True
            return True
        if not self.present:
            return False
        if self.away_since is None:
            self.away_since = now
        if now - self.away_since >= self.rules.reoffer_minutes * 60:
            self.present = False
            self.away_since = None
        return self.present
