from __future__ import annotations

import datetime as dt
from typing import Any

from ninja import Field, Router, Schema, Status
from pydantic import ConfigDict

from accounts.auth import AuthedRequest
from sessions.models import ComputeSession
from sessions.services import (
    Requirements,
    lease_extend,
    session_get_for,
    session_request,
    session_stop,
)
from sessions.states import END_REASON_SENTENCES, EndReason, SessionState

router = Router(tags=["sessions"])

# The largest lease anyone may ask for; quota policies usually allow far less.
MAX_DURATION_MINUTES = 7 * 24 * 60


class Strict(Schema):
    model_config = ConfigDict(extra="forbid")


class RequirementsIn(Strict):
    gpu: bool = False
    min_memory_gb: float = Field(default=0, ge=0, le=1_000_000)
    lab: str | None = Field(default=None, max_length=100)


class SessionIn(Strict):
    machine_id: int | None = Field(default=None, ge=1, le=2**62)
    requirements: RequirementsIn | None = None
    duration_minutes: int | None = Field(default=None, ge=1, le=MAX_DURATION_MINUTES)


class ExtendIn(Strict):
    minutes: int = Field(ge=1, le=24 * 60)


class MachineRef(Schema):
    id: int
    name: str


class CheckOut(Schema):
    name: str
    ok: bool
    detail: str = ""


class CleanupOut(Schema):
    verified: bool | None
    files_removed: int | None
    bytes_removed: int | None
    processes_killed: int | None
    finished_at: dt.datetime | None
    checks: list[CheckOut]
    account: str | None


class SessionOut(Schema):
    id: int
    state: str
    machine: MachineRef
    url: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    expires_at: dt.datetime
    ended_at: dt.datetime | None
    end_reason: str | None
    end_reason_text: str | None
    cleanup: CleanupOut | None


class EventOut(Schema):
    at: dt.datetime
    kind: str
    state: str | None
    reason: str | None
    message: str


class Detail(Schema):
    detail: str


def session_out(session: ComputeSession, *, viewer_id: int | None) -> dict[str, Any]:
    running = session.state == SessionState.RUNNING
    url = session.jupyter_url if running and viewer_id == session.owner_id else None
    cleanup = None
    if session.cleanup_finished_at is not None:
        cleanup = {
            "verified": session.cleanup_verified,
            "files_removed": session.files_removed,
            "bytes_removed": session.bytes_removed,
            "processes_killed": session.processes_killed,
            "finished_at": session.cleanup_finished_at,
            "checks": session.cleanup_checks or [],
            "account": session.cleanup_account or None,
        }
    reason = session.end_reason or None
    return {
        "id": session.pk,
        "state": session.state,
        "machine": {"id": session.machine.pk, "name": session.machine.name},
        "url": url or None,
        "created_at": session.created_at,
        "started_at": session.started_at,
        "expires_at": session.expires_at,
        "ended_at": session.ended_at,
        "end_reason": reason,
        "end_reason_text": END_REASON_SENTENCES[EndReason(reason)] if reason else None,
        "cleanup": cleanup,
    }


@router.post(
    "/sessions",
    response={201: SessionOut, 400: Detail, 403: Detail, 404: Detail, 409: Detail},
    summary="Lease a machine",
)
def create_session(request: AuthedRequest, payload: SessionIn) -> Status[dict[str, Any]]:
    req = payload.requirements or RequirementsIn()
    session = session_request(
        user=request.user,
        machine_id=payload.machine_id,
        requirements=Requirements(gpu=req.gpu, min_memory_gb=req.min_memory_gb, lab=req.lab),
        duration_minutes=payload.duration_minutes,
    )
    return Status(201, session_out(session, viewer_id=request.user.pk))


@router.get("/sessions", response=list[SessionOut], summary="The caller's sessions, newest first")
def list_sessions(request: AuthedRequest) -> list[dict[str, Any]]:
    qs = ComputeSession.objects.for_owner(request.user).select_related("machine")
    return [session_out(s, viewer_id=request.user.pk) for s in qs[:200]]


@router.get("/sessions/{session_id}", response={200: SessionOut, 404: Detail})
def get_session(request: AuthedRequest, session_id: int) -> dict[str, Any]:
    session = session_get_for(user=request.user, session_id=session_id)
    return session_out(session, viewer_id=request.user.pk)


@router.get("/sessions/{session_id}/events", response={200: list[EventOut], 404: Detail})
def session_events(request: AuthedRequest, session_id: int) -> list[dict[str, Any]]:
    session = session_get_for(user=request.user, session_id=session_id)
    return [
        {
            "at": e.at,
            "kind": e.kind,
            "state": e.to_state or None,
            "reason": e.reason or None,
            "message": e.message,
        }
        for e in session.events.all()
    ]


@router.post(
    "/sessions/{session_id}/extend",
    response={200: SessionOut, 400: Detail, 404: Detail, 409: Detail},
)
def extend_session(request: AuthedRequest, session_id: int, payload: ExtendIn) -> dict[str, Any]:
    session = session_get_for(user=request.user, session_id=session_id)
    session = lease_extend(session=session, minutes=payload.minutes, actor=request.user)
    return session_out(session, viewer_id=request.user.pk)


@router.delete("/sessions/{session_id}", response={202: SessionOut, 404: Detail, 409: Detail})
def delete_session(request: AuthedRequest, session_id: int) -> Status[dict[str, Any]]:
    session = session_get_for(user=request.user, session_id=session_id)
    session = session_stop(session=session, reason=EndReason.USER, actor=request.user)
    return Status(202, session_out(session, viewer_id=request.user.pk))
