"""State changes of labs and machines. Views, consumers, admin actions and tasks call these."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts.models import User
from machines.models import EnrollmentToken, Lab, Machine, MachineEvent, MachineStatus
from nexcompute import agent_events, realtime
from nexcompute.errors import BadRequest, PolicyDenied
from nexcompute.tokens import lookup_of, new_token, token_matches

# Statuses an online machine without a live session may rest in; the order is precedence.
IDLE_STATUSES = frozenset(
    {
        MachineStatus.AVAILABLE,
        MachineStatus.DRAINING,
        MachineStatus.MAINTENANCE,
        MachineStatus.OWNER_PRESENT,
    }
)
ONLINE_STATUSES = frozenset(set(MachineStatus) - {MachineStatus.OFFLINE})


def idle_status(machine: Machine) -> MachineStatus:
    """The status an online machine with no live session should show."""
    if machine.quarantine_reason:
        return MachineStatus.QUARANTINED  # sticky, across reconnects, until staff enable it
    if not machine.enabled:
        return MachineStatus.MAINTENANCE
    if machine.draining:
        return MachineStatus.DRAINING
    if machine.owner_present:
        return MachineStatus.OWNER_PRESENT
    return MachineStatus.AVAILABLE


def machine_set_status(
    *,
    machine: Machine,
    status: MachineStatus,
    kind: str = "status",
    message: str = "",
    actor: User | None = None,
    expect: frozenset[MachineStatus] | None = None,
    push: bool = True,
    fields: dict[str, Any] | None = None,
) -> bool:
    """Change a machine's status with a conditional UPDATE and record it.

    With ``expect``, the change happens only from one of those statuses; returns False if the
    machine was elsewhere (another process won). ``push=False`` leaves telling dashboards to the
    caller (the agent link batches it instead of a channel-layer message per connect).
    ``fields``: other columns written by the same UPDATE (a hello's specs and last-seen time).
    """
    # No savepoint when nested (a hello, an allocation): nobody catches an error of this and
    # carries on in the same transaction, and a savepoint is two more round trips to PostgreSQL
    # for every machine of a fleet reconnecting at once (bench/fleet.py --restart).
    with transaction.atomic(savepoint=False):
        qs = Machine.objects.filter(pk=machine.pk)
        if expect is not None:
            qs = qs.filter(status__in=expect)
        old = machine.status
        if qs.update(status=status, **(fields or {})) != 1:
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
        if push:
            realtime.machine_updated_on_commit(machine_snapshot(machine))
    return True


# --- enrollment and credentials ----------------------------------------------------------------


def lab_get_or_create(*, name: str) -> Lab:
    lab, _ = Lab.objects.get_or_create(name=name)
    return lab


def enrollment_token_create(
    *,
    lab: Lab,
    ttl_hours: float = 24,
    actor: User | None = None,
    uses: int = 1,
    reclaim: bool = False,
) -> tuple[EnrollmentToken, str]:
    """A join token for ``lab``, good for ``uses`` enrollments before it expires (one by
    default; a whole lab's worth for imaging). ``reclaim``: a host that enrolled in this lab
    before (same machine id) takes back its machine record. The clear token is returned once,
    never stored."""
    if ttl_hours <= 0:
        raise BadRequest("ttl must be positive")
    if not 1 <= uses <= 10000:
        raise BadRequest("uses must be between 1 and 10000")
    issued = new_token("nxe")
    token = EnrollmentToken.objects.create(
        lab=lab,
        lookup=issued.lookup,
        digest=issued.digest,
        created_by=actor,
        expires_at=timezone.now() + dt.timedelta(hours=ttl_hours),
        max_uses=uses,
        reclaim=reclaim,
    )
    return token, issued.token


def host_key_of(lab: Lab, machine_key: str) -> str:
    """What is stored of a host's machine id: bound to the lab, so one lab's records say
    nothing about another's. ``machine_key`` is already a hash made by the agent."""
    return hashlib.sha256(f"nexcompute-host:{lab.pk}:{machine_key}".encode()).hexdigest()


def _unique_machine_name(hostname: str) -> str:
    base = (hostname or "machine").strip()[:90] or "machine"
    name, n = base, 1
    while Machine.objects.filter(name=name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def machine_enroll(
    *, token: str, hostname: str, agent_version: str = "", machine_key: str = ""
) -> tuple[Machine, str]:
    """Trade a join token for a machine and its credential (returned once).

    Each use of the token is claimed with a conditional UPDATE, so hosts racing for its last
    use get one machine between them. With ``machine_key`` (the agent's hash of the host's
    machine id) and a token that allows it (``reclaim``), a host that enrolled in the lab
    before takes back its record: a new credential replaces the old one (which stops working)
    and sessions the record still had end when the agent says hello without them.
    """
    now = timezone.now()
    texts = (token, hostname, agent_version, machine_key)
    if not token or any("\x00" in t for t in texts):
        raise BadRequest("token, hostname, agent_version and machine_key must be plain text")
    if machine_key and not re.fullmatch(r"[0-9a-f]{64}", machine_key):
        raise BadRequest("machine_key must be 64 lowercase hex digits (a sha256)")
    candidates = EnrollmentToken.objects.filter(lookup=lookup_of(token))
    match = next((t for t in candidates if token_matches(token, t.digest)), None)
    if match is None:
        raise PolicyDenied("unknown enrollment token")
    host_key = host_key_of(match.lab, machine_key) if machine_key else ""
    with transaction.atomic():
        claimed = EnrollmentToken.objects.filter(
            pk=match.pk, uses__lt=F("max_uses"), expires_at__gt=now
        ).update(uses=F("uses") + 1, used_at=Coalesce("used_at", now))
        if claimed != 1:
            raise PolicyDenied("enrollment token already used or expired")
        credential = new_token("nxm")
        machine = None
        if match.reclaim and host_key:
            machine = (
                Machine.objects.select_for_update()
                .filter(lab=match.lab, host_key=host_key)
                .order_by("-created_at")
                .first()
            )
        if machine is not None:
            _reclaim(machine, credential, hostname=hostname, agent_version=agent_version)
        else:
            machine = _create_machine(match.lab, credential, hostname, agent_version, host_key)
        EnrollmentToken.objects.filter(pk=match.pk).update(machine=machine)
        realtime.machine_updated_on_commit(machine_snapshot(machine))
    return machine, credential.token


def _reclaim(machine: Machine, credential: Any, *, hostname: str, agent_version: str) -> None:
    """A re-imaged host takes back its record: a new credential; the old one stops working at
    once (an agent still connected with it is replaced when the new one connects)."""
    Machine.objects.filter(pk=machine.pk).update(
        hostname=hostname[:255],
        agent_version=agent_version[:50],
        credential_lookup=credential.lookup,
        credential_digest=credential.digest,
        credential_revoked_at=None,
    )
    machine.refresh_from_db()
    MachineEvent.objects.create(
        machine=machine,
        kind="enrolled",
        from_status=machine.status,
        to_status=machine.status,
        message="re-enrolled: the same host (machine id) took back its record",
    )


def _create_machine(
    lab: Lab, credential: Any, hostname: str, agent_version: str, host_key: str
) -> Machine:
    for _ in range(3):
        try:
            with transaction.atomic():
                machine = Machine.objects.create(
                    name=_unique_machine_name(hostname),
                    hostname=hostname[:255],
                    lab=lab,
                    agent_version=agent_version[:50],
                    credential_lookup=credential.lookup,
                    credential_digest=credential.digest,
                    host_key=host_key,
                )
            break
        except IntegrityError:
            continue  # a concurrent enrollment took the name; pick the next one
    else:
        raise BadRequest("could not allocate a machine name")
    MachineEvent.objects.create(
        machine=machine, kind="enrolled", to_status=machine.status, message=f"lab {lab}"
    )
    return machine


def machine_authenticate(credential: str) -> Machine | None:
    """The machine holding ``credential``, or None (unknown, revoked or wrong)."""
    if not credential or len(credential) > 200 or "\x00" in credential:
        return None  # PostgreSQL refuses NUL in text; such a credential is never valid
    for machine in Machine.objects.filter(
        credential_lookup=lookup_of(credential), credential_revoked_at__isnull=True
    ).select_related("lab"):
        if token_matches(credential, machine.credential_digest):
            return machine
    return None


def machine_revoke_credential(*, machine: Machine, actor: User | None) -> None:
    """The machine's credential stops working; its live connection, if any, is cut and the
    machine goes offline."""
    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(credential_revoked_at=timezone.now())
        _staff_action(
            machine=machine,
            kind="credential_revoked",
            actor=actor,
            status=MachineStatus.OFFLINE,
            expect=ONLINE_STATUSES,
            message="credential revoked",
        )
        # Cut the live connection, if any; the agent then stops (close code 4001).
        agent_events.send_on_commit(machine.pk, agent_events.revoke())


# --- staff actions -----------------------------------------------------------------------------


def _staff_action(
    *,
    machine: Machine,
    kind: str,
    actor: User | None,
    status: MachineStatus,
    expect: frozenset[MachineStatus],
    message: str = "",
) -> None:
    """Record one staff action as exactly one audit row: the status change when the machine
    was in one of ``expect`` (a busy machine keeps its status until its session ends), or the
    action alone otherwise."""
    if not machine_set_status(
        machine=machine, status=status, kind=kind, message=message, actor=actor, expect=expect
    ):
        MachineEvent.objects.create(machine=machine, kind=kind, message=message, actor=actor)


def machine_drain(*, machine: Machine, actor: User | None) -> None:
    """No new sessions; a running one finishes."""
    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(draining=True)
        machine.draining = True
        _staff_action(
            machine=machine,
            kind="drain",
            actor=actor,
            status=MachineStatus.DRAINING,
            expect=frozenset({MachineStatus.AVAILABLE, MachineStatus.OWNER_PRESENT}),
        )


def machine_set_maintenance(*, machine: Machine, actor: User | None) -> None:
    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(enabled=False)
        machine.enabled = False
        _staff_action(
            machine=machine,
            kind="maintenance",
            actor=actor,
            status=MachineStatus.MAINTENANCE,
            expect=IDLE_STATUSES | {MachineStatus.QUARANTINED},
        )


def machine_enable(*, machine: Machine, actor: User | None) -> None:
    """Back into service: clears maintenance, draining and quarantine."""
    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(
            enabled=True, draining=False, quarantine_reason=""
        )
        machine.enabled, machine.draining, machine.quarantine_reason = True, False, ""
        _staff_action(
            machine=machine,
            kind="enable",
            actor=actor,
            status=idle_status(machine),
            expect=frozenset(
                {
                    MachineStatus.DRAINING,
                    MachineStatus.MAINTENANCE,
                    MachineStatus.QUARANTINED,
                    MachineStatus.AVAILABLE,
                }
            ),
        )


def machine_quarantine(*, machine: Machine, message: str, actor: User | None = None) -> None:
    """Take a machine out of service until staff look at it (e.g. an unverified wipe)."""
    with transaction.atomic():
        Machine.objects.filter(pk=machine.pk).update(quarantine_reason=message[:500] or "?")
        machine.quarantine_reason = message[:500] or "?"
        machine_set_status(
            machine=machine,
            status=MachineStatus.QUARANTINED,
            kind="quarantine",
            message=message,
            actor=actor,
            expect=ONLINE_STATUSES,
        )


# --- liveness (the agent link calls these) --------------------------------------------------


def machine_mark_offline(*, machine: Machine, reason: str = "", push: bool = True) -> bool:
    return machine_set_status(
        machine=machine,
        status=MachineStatus.OFFLINE,
        message=reason,
        expect=ONLINE_STATUSES,
        push=push,
    )


def machine_snapshot(machine: Machine) -> dict[str, Any]:
    """What dashboards are told about a machine (the same shape the agent link batches)."""
    return {
        "id": machine.pk,
        "status": machine.status,
        "owner_present": machine.owner_present,
        "warm_ready": machine.warm_ready,
        "metrics": machine.metrics or {},
        "last_seen": machine.last_seen.isoformat() if machine.last_seen else None,
    }


# --- the agent link ----------------------------------------------------------------------------


def machine_hello(
    *,
    machine_id: int,
    hostname: str,
    agent_version: str,
    specs: dict[str, Any],
    owner_present: bool,
    status_of: Callable[[Machine], MachineStatus] = idle_status,
) -> Machine:
    """An agent connected and said hello: record its specs and bring the machine online, in
    the status ``status_of`` gives for it (the sessions app knows what its sessions hold:
    ``sessions.occupancy.machine_status_for``)."""
    now = timezone.now()
    with transaction.atomic():
        # of=("self",): lock the machine row only; with the join, FOR UPDATE would also lock
        # the lab row that every machine of the lab shares, serialising all their hellos.
        machine = (
            Machine.objects.select_for_update(of=("self",)).select_related("lab").get(pk=machine_id)
        )
        machine.hostname = hostname[:255]
        machine.agent_version = agent_version[:50]
        machine.set_specs(specs)
        machine.owner_present = owner_present
        machine.last_seen = now
        machine.warm_ready = False  # a new connection: the agent says again in its heartbeat
        fields = ("warm_ready", "hostname", "agent_version", "specs", "memory_bytes", "gpu_count",
                  "owner_present", "last_seen")  # fmt: skip
        machine_set_status(  # the status and the hello's own columns: one UPDATE
            machine=machine,
            status=status_of(machine),
            kind="online",
            message=f"agent {agent_version} connected",
            push=False,  # the agent link batches it to dashboards
            fields={name: getattr(machine, name) for name in fields},
        )
    return machine


def machines_record_heartbeats(batch: dict[int, tuple[dict[str, Any], dt.datetime]]) -> int:
    """Persist the latest metrics and last-seen time of many machines at once (the agent link
    batches them per process; dashboards get metrics from its in-memory batches meanwhile).

    One prepared UPDATE sent for every row in a pipeline (``executemany``): Django's
    ``bulk_update`` builds CASE expressions in Python, which held the GIL long enough to starve
    the event loop at thousands of machines. Machines marked offline since are left alone: a
    late write must not look like a sign of life.
    """
    from django.db import connection

    cast = "::jsonb" if connection.vendor == "postgresql" else ""
    table = Machine._meta.db_table
    sql = f"UPDATE {table} SET metrics = %s{cast}, last_seen = %s WHERE id = %s AND status <> %s"
    params = [
        (json.dumps(metrics), seen, machine_id, MachineStatus.OFFLINE.value)
        for machine_id, (metrics, seen) in batch.items()
    ]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(sql, params)
    return len(params)


def machine_set_owner_present(
    *, machine_id: int, present: bool, message: str | None = None
) -> Machine:
    """The person at the keyboard came or went (``message``: why they count as gone, e.g.
    idle or locked past the lab's limit; see machines/presence.py)."""
    with transaction.atomic():
        # of=("self",): lock the machine row only; with the join, FOR UPDATE would also lock
        # the lab row that every machine of the lab shares, serialising all their hellos.
        machine = (
            Machine.objects.select_for_update(of=("self",)).select_related("lab").get(pk=machine_id)
        )
        if machine.owner_present == present:
            return machine
        machine.owner_present = present
        machine.save(update_fields=["owner_present"])
        MachineEvent.objects.create(
            machine=machine,
            kind="owner_present" if present else "owner_left",
            from_status=machine.status,
            to_status=machine.status,
            message=message
            or ("someone is using the computer" if present else "the computer is free again"),
        )
        if machine.status in IDLE_STATUSES:
            machine_set_status(machine=machine, status=idle_status(machine), kind="presence")
        else:
            realtime.machine_updated_on_commit(machine_snapshot(machine))
    return machine


def lab_settings_changed(*, lab: Lab) -> None:
    """A lab's settings changed (its warm pool switch): each of its machines' connections
    looks again whether to keep a warm sandbox, after commit."""
    for machine_id in Machine.objects.filter(lab=lab).values_list("pk", flat=True):
        agent_events.send_on_commit(machine_id, agent_events.warm_check())


def machine_set_warm(*, machine_id: int, ready: bool) -> bool:
    """The agent has (or no longer has) a warm sandbox ready. False when nothing changed."""
    with transaction.atomic():
        updated = (
            Machine.objects.filter(pk=machine_id).exclude(warm_ready=ready).update(warm_ready=ready)
        )
        if updated:
            machine = Machine.objects.get(pk=machine_id)
            realtime.machine_updated_on_commit(machine_snapshot(machine))
    return bool(updated)


def machine_record_warm_receipt(
    *, machine_id: int, verified: bool, reason: str, summary: str
) -> None:
    """A warm sandbox was discarded and wiped. Its proof failing takes the machine out of
    service as a session's does."""
    machine = Machine.objects.get(pk=machine_id)
    with transaction.atomic():
        MachineEvent.objects.create(
            machine=machine,
            kind="warm_wiped" if verified else "warm_wipe_unverified",
            from_status=machine.status,
            to_status=machine.status,
            message=f"warm sandbox discarded ({reason}): {summary}"[:500],
        )
        if not verified:
            machine_quarantine(
                machine=machine, message=f"the wipe of a warm sandbox was not verified: {summary}"
            )


def machine_disconnected(*, machine_id: int, reason: str) -> bool:
    """The agent's socket closed (or went silent past the grace): the machine is offline."""
    machine = Machine.objects.filter(pk=machine_id).first()
    if machine is None:
        return False
    Machine.objects.filter(pk=machine_id).update(last_seen=timezone.now())
    return machine_mark_offline(machine=machine, reason=reason, push=False)


def machines_mark_silent_offline(*, older_than: dt.timedelta) -> int:
    """Backstop for a server process that died without closing its sockets: machines whose
    last sign of life is older than ``older_than`` go offline. Returns how many."""
    cutoff = timezone.now() - older_than
    count = 0
    stale = Machine.objects.exclude(status=MachineStatus.OFFLINE).filter(last_seen__lt=cutoff)
    for machine in stale:
        count += machine_mark_offline(machine=machine, reason="no heartbeat")
    return count


def agent_ping(machine_id: int, *, timeout: float) -> dict[str, Any] | None:
    """Ping a machine's agent, wherever its socket lives, and wait for the reply.

    The ping goes to the machine's group with a one-off reply channel; the server process
    holding the socket forwards the agent's ``reply`` there. None on timeout (agent offline).
    """
    import time

    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from nexcompute_agent.aio import wait_for

    layer = get_channel_layer()
    if layer is None:
        return None

    async def call() -> dict[str, Any] | None:
        reply_channel = await layer.new_channel()
        started = time.monotonic()
        await layer.group_send(
            realtime.machine_group(machine_id), dict(agent_events.ping(reply_channel))
        )
        try:
            answer = await wait_for(layer.receive(reply_channel), timeout)
        except TimeoutError:
            return None
        return {**answer, "rtt_ms": (time.monotonic() - started) * 1000}

    result: dict[str, Any] | None = async_to_sync(call)()
    return result
