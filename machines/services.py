"""State changes of labs and machines. Views, consumers, admin actions and tasks call these."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import User
from machines.models import EnrollmentToken, Lab, Machine, MachineEvent, MachineStatus
from nexcompute import realtime
from nexcompute.errors import BadRequest, PolicyDenied
from nexcompute.tokens import lookup_of, new_token, token_matches

M = MachineStatus

# Statuses an online machine without a live session may rest in; the order is precedence.
IDLE_STATUSES = frozenset({M.AVAILABLE, M.DRAINING, M.MAINTENANCE, M.OWNER_PRESENT})


def idle_status(machine: Machine) -> MachineStatus:
    """The status an online machine with no live session should show."""
    if machine.quarantine_reason:
        return M.QUARANTINED  # sticky, across reconnects, until staff enable it again
    if not machine.enabled:
        return M.MAINTENANCE
    if machine.draining:
        return M.DRAINING
    if machine.owner_present:
        return M.OWNER_PRESENT
    return M.AVAILABLE


def machine_set_status(
    *,
    machine: Machine,
    status: MachineStatus,
    kind: str = "status",
    message: str = "",
    actor: User | None = None,
    expect: frozenset[MachineStatus] | None = None,
) -> bool:
    """Change a machine's status with a conditional UPDATE and record it.

    With ``expect``, the change happens only from one of those statuses; returns False if the
    machine was elsewhere (another process won).
    """
    with transaction.atomic():
        qs = Machine.objects.filter(pk=machine.pk)
        if expect is not None:
            qs = qs.filter(status__in=expect)
        old = machine.status
        if qs.update(status=status) != 1:
            return False
        machine.status = status
        if old != status or kind != "status":
            MachineEvent.objects.create(
                machine=machine,
                kind=kind,
                from_status=old,
                to_status=status,
                message=message,
                actor=actor,
            )
        realtime.machine_updated_on_commit(machine.pk)
    return True


def machine_release(*, machine: Machine, message: str = "") -> None:
    """Offer a machine again after its session ended with a verified wipe (or none needed)."""
    machine.refresh_from_db()
    if machine.status == M.OFFLINE:
        return
    machine_set_status(machine=machine, status=idle_status(machine), message=message)


# --- enrollment and credentials ----------------------------------------------------------------


def lab_get_or_create(*, name: str) -> Lab:
    lab, _ = Lab.objects.get_or_create(name=name)
    return lab


def enrollment_token_create(
    *, lab: Lab, ttl_hours: float = 24, actor: User | None = None
) -> tuple[EnrollmentToken, str]:
    """A one-time join token for ``lab``. The clear token is returned once, never stored."""
    if ttl_hours <= 0:
        raise BadRequest("ttl must be positive")
    issued = new_token("nxe")
    token = EnrollmentToken.objects.create(
        lab=lab,
        lookup=issued.lookup,
        digest=issued.digest,
        created_by=actor,
        expires_at=timezone.now() + dt.timedelta(hours=ttl_hours),
    )
    return token, issued.token


def _unique_machine_name(hostname: str) -> str:
    base = (hostname or "machine").strip()[:90] or "machine"
    name, n = base, 1
    while Machine.objects.filter(name=name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def machine_enroll(*, token: str, hostname: str, agent_version: str = "") -> tuple[Machine, str]:
    """Trade a join token for a new machine and its credential (returned once).

    The token is claimed with a conditional UPDATE, so two hosts racing with one token get one
    machine between them.
    """
    now = timezone.now()
    candidates = EnrollmentToken.objects.filter(lookup=lookup_of(token or ""))
    match = next((t for t in candidates if token_matches(token, t.digest)), None)
    if match is None:
        raise PolicyDenied("unknown enrollment token")
    with transaction.atomic():
        claimed = EnrollmentToken.objects.filter(
            pk=match.pk, used_at__isnull=True, expires_at__gt=now
        ).update(used_at=now)
        if claimed != 1:
            raise PolicyDenied("enrollment token already used or expired")
        credential = new_token("nxm")
        for _ in range(3):
            try:
                with transaction.atomic():
                    machine = Machine.objects.create(
                        name=_unique_machine_name(hostname),
                        hostname=hostname[:255],
                        lab=match.lab,
                        agent_version=agent_version[:50],
                        credential_lookup=credential.lookup,
                        credential_digest=credential.digest,
                    )
                break
            except IntegrityError:
                continue  # a concurrent enrollment took the name; pick the next one
        else:
            raise BadRequest("could not allocate a machine name")
        EnrollmentToken.objects.filter(pk=match.pk).update(machine=machine)
        MachineEvent.objects.create(
            machine=machine, kind="enrolled", to_status=machine.status, message=f"lab {match.lab}"
        )
        realtime.machine_updated_on_commit(machine.pk)
    return machine, credential.token


def machine_authenticate(credential: str) -> Machine | None:
    """The machine holding ``credential``, or None (unknown, revoked or wrong)."""
    if not credential or len(credential) > 200:
        return None
    for machine in Machine.objects.filter(
        credential_lookup=lookup_of(credential), credential_revoked_at__isnull=True
    ).select_related("lab"):
        if token_matches(credential, machine.credential_digest):
            return machine
    return None


def machine_revoke_credential(*, machine: Machine, actor: User | None) -> None:
    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(credential_revoked_at=timezone.now())
        MachineEvent.objects.create(
            machine=machine, kind="credential_revoked", message="credential revoked", actor=actor
        )
        # Cut the live connection, if any; the agent then stops (close code 4001).
        realtime.agent_command_on_commit(machine.pk, {"type": "disconnect", "code": 4001})
    machine_mark_offline(machine=machine, reason="credential revoked")


# --- staff actions -----------------------------------------------------------------------------


def machine_drain(*, machine: Machine, actor: User | None) -> None:
    """No new sessions; a running one finishes."""
    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(draining=True)
        machine.draining = True
        MachineEvent.objects.create(machine=machine, kind="drain", actor=actor)
        machine_set_status(
            machine=machine,
            status=M.DRAINING,
            kind="drain",
            actor=actor,
            expect=frozenset({M.AVAILABLE, M.OWNER_PRESENT}),
        )


def machine_set_maintenance(*, machine: Machine, actor: User | None) -> None:
    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(enabled=False)
        machine.enabled = False
        MachineEvent.objects.create(machine=machine, kind="maintenance", actor=actor)
        machine_set_status(
            machine=machine,
            status=M.MAINTENANCE,
            kind="maintenance",
            actor=actor,
            expect=frozenset({M.AVAILABLE, M.OWNER_PRESENT, M.DRAINING, M.QUARANTINED}),
        )


def machine_enable(*, machine: Machine, actor: User | None) -> None:
    """Back into service: clears maintenance, draining and quarantine."""
    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(
            enabled=True, draining=False, quarantine_reason=""
        )
        machine.enabled, machine.draining, machine.quarantine_reason = True, False, ""
        MachineEvent.objects.create(machine=machine, kind="enable", actor=actor)
        machine_set_status(
            machine=machine,
            status=idle_status(machine),
            kind="enable",
            actor=actor,
            expect=frozenset({M.DRAINING, M.MAINTENANCE, M.QUARANTINED, M.AVAILABLE}),
        )


def machine_quarantine(*, machine: Machine, message: str, actor: User | None = None) -> None:
    """Take a machine out of service until staff look at it (e.g. an unverified wipe)."""
    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(quarantine_reason=message[:500] or "?")
        machine.quarantine_reason = message[:500] or "?"
        machine_set_status(
            machine=machine,
            status=M.QUARANTINED,
            kind="quarantine",
            message=message,
            actor=actor,
            expect=frozenset(set(M) - {M.OFFLINE}),
        )


# --- liveness (the agent link calls these) --------------------------------------------------


def machine_mark_offline(*, machine: Machine, reason: str = "") -> bool:
    return machine_set_status(
        machine=machine,
        status=M.OFFLINE,
        message=reason,
        expect=frozenset(set(M) - {M.OFFLINE}),
    )


def machine_summary(machine: Machine) -> dict[str, Any]:
    return {
        "id": machine.pk,
        "name": machine.name,
        "lab": machine.lab.name,
        "status": machine.status,
    }
