from __future__ import annotations

import datetime as dt
from typing import Any

from django.http import HttpRequest
from ninja import Field, Router, Schema, Status
from ninja.security import HttpBearer
from pydantic import BaseModel, ConfigDict

from accounts.auth import AuthedRequest
from accounts.services import policy_for
from machines.heartbeats import live_metrics
from machines.models import Machine
from machines.services import agent_ping, machine_authenticate, machine_enroll

router = Router(tags=["machines"])


class Strict(Schema):
    model_config = ConfigDict(extra="forbid")


# The machine list's schemas are plain pydantic models: ninja's Schema reads every field of
# every item through a Django-aware getter, which made up a third of listing 5,000 machines
# (and that list runs in the same process as the agents' event loop).
class GpuOut(BaseModel):
    name: str
    memory_bytes: int


class SpecsOut(BaseModel):
    cpu_model: str = ""
    cpu_count: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0
    os: str = ""
    gpus: list[GpuOut] = []


class MetricsOut(BaseModel):
    cpu_percent: float | None = None
    memory_percent: float | None = None
    gpu_percent: float | None = None


class MachineOut(BaseModel):
    id: int
    name: str
    lab: str
    status: str
    specs: SpecsOut
    metrics: MetricsOut
    last_seen: dt.datetime | None


OUT_FIELDS = ("pk", "name", "lab__name", "status", "specs", "metrics", "last_seen")


def machine_row_out(
    row: tuple[Any, ...], live: tuple[dict[str, Any], dt.datetime] | None = None
) -> dict[str, Any]:
    """A machine as the API shows it, from its :data:`OUT_FIELDS` (no model instance)."""
    pk, name, lab, status, specs, metrics, last_seen = row
    specs = specs or {}
    metrics = metrics or {}
    if live is not None and (last_seen is None or live[1] > last_seen):
        metrics, last_seen = live
    return {
        "id": pk,
        "name": name,
        "lab": lab,
        "status": status,
        "specs": {
            "cpu_model": specs.get("cpu_model", ""),
            "cpu_count": specs.get("cpu_count", 0),
            "memory_bytes": specs.get("memory_bytes", 0),
            "disk_bytes": specs.get("disk_bytes", 0),
            "os": specs.get("os", ""),
            "gpus": [
                {"name": g.get("name", ""), "memory_bytes": g.get("memory_bytes", 0)}
                for g in specs.get("gpus", [])
            ],
        },
        "metrics": {
            "cpu_percent": metrics.get("cpu_percent"),
            "memory_percent": metrics.get("memory_percent"),
            "gpu_percent": metrics.get("gpu_percent"),
        },
        "last_seen": last_seen,
    }


@router.get("/machines", response=list[MachineOut], summary="Machines the caller may use")
def list_machines(request: AuthedRequest) -> list[dict[str, Any]]:
    rows = list(Machine.objects.usable_by(policy_for(request.user)).values_list(*OUT_FIELDS))
    live = live_metrics(row[0] for row in rows)
    return [machine_row_out(row, live.get(row[0])) for row in rows]


class EnrollIn(Strict):
    token: str = Field(min_length=1, max_length=200)
    hostname: str = Field(min_length=1, max_length=255)
    agent_version: str = Field(default="", max_length=50)
    machine_key: str = Field(
        default="",
        max_length=64,
        description="sha256 (hex) the agent made of the host's machine id; with a token that "
        "allows it, a host that enrolled in the lab before takes back its machine record",
    )


class EnrollOut(Schema):
    machine_id: int
    name: str
    credential: str


class Detail(Schema):
    detail: str


@router.post(
    "/agents/enroll",
    auth=None,
    response={201: EnrollOut, 400: Detail, 403: Detail},
    summary="Trade a one-time join token for a machine credential",
)
def enroll(request: HttpRequest, payload: EnrollIn) -> Status[dict[str, Any]]:
    machine, credential = machine_enroll(
        token=payload.token,
        hostname=payload.hostname,
        agent_version=payload.agent_version,
        machine_key=payload.machine_key,
    )
    return Status(201, {"machine_id": machine.pk, "name": machine.name, "credential": credential})


class MachineCredentialAuth(HttpBearer):
    """``Authorization: Bearer <machine credential>``: the agent's own credential."""

    def authenticate(self, request: HttpRequest, token: str) -> Machine | None:
        return machine_authenticate(token)


class AgentMeOut(Schema):
    machine_id: int
    name: str
    lab: str
    enabled: bool
    status: str


@router.get(
    "/agents/me",
    auth=MachineCredentialAuth(),
    response={200: AgentMeOut},
    summary="The machine a credential belongs to (the agent's `doctor` checks it with this)",
)
def agent_me(request: HttpRequest) -> dict[str, Any]:
    machine: Machine = request.auth  # type: ignore[attr-defined]
    return {
        "machine_id": machine.pk,
        "name": machine.name,
        "lab": machine.lab.name,
        "enabled": machine.enabled,
        "status": machine.status,
    }


class PingOut(Schema):
    ok: bool
    rtt_ms: float


@router.post(
    "/machines/{machine_id}/ping",
    response={200: PingOut, 403: Detail, 404: Detail, 504: Detail},
    summary="Staff: round trip to the machine's agent through any server process",
)
def ping_machine(request: AuthedRequest, machine_id: int) -> Status[dict[str, Any]]:
    if not request.user.is_staff:
        return Status(403, {"detail": "staff only"})
    if not Machine.objects.filter(pk=machine_id).exists():
        return Status(404, {"detail": "no such machine"})
    answer = agent_ping(machine_id, timeout=5.0)
    if answer is None:
        return Status(504, {"detail": "the agent did not answer in time"})
    return Status(200, {"ok": bool(answer["ok"]), "rtt_ms": answer["rtt_ms"]})
