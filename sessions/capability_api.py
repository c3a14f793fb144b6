"""``/api/session-capability/…``: what a session's own Jupyter (the nexcompute-jupyter server
extension) may ask the Nexus, with the session-scoped capability (``sessions.capability``) as
its only credential: read that one session's lease and warnings, and extend it within the
policy. No user token or browser cookie is accepted here, and the capability is accepted
nowhere else (docs/jupyter-extension.md)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.http import HttpRequest
from django.utils import timezone
from ninja import Field, Router, Schema
from ninja.security import HttpBearer

from accounts.auth import InvalidCredential
from nexcompute.errors import NotFound
from sessions.api import Detail, ExtendIn, MachineRef
from sessions.capability import PREFIX, capability_session
from sessions.models import ComputeSession, SessionEvent
from sessions.services import lease_extend, lease_extend_choices

WARNINGS_SHOWN = 20


class CapabilityAuth(HttpBearer):
    """``Authorization: Bearer nxcap_…``: the request acts for the capability's session."""

    def __call__(self, request: HttpRequest) -> Any:
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip().startswith(PREFIX):
            raise InvalidCredential("send 'Authorization: Bearer <session capability>'")
        return self.authenticate(request, value.strip())

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        session = capability_session(token)
        if session is None:
            raise InvalidCredential("the session capability is not valid (or its session is over)")
        return session


router = Router(tags=["session capability"], auth=CapabilityAuth())


class WarningOut(Schema):
    at: dt.datetime
    message: str


class ExtendChoicesOut(Schema):
    default_minutes: int | None = Field(description="what one click on Extend adds")
    choices_minutes: list[int]
    reason: str = Field(description="why no choice is allowed, when none is")


class LeaseOut(Schema):
    session_id: int
    state: str
    machine: MachineRef
    started_at: dt.datetime | None
    expires_at: dt.datetime
    now: dt.datetime = Field(description="the Nexus's clock, for the countdown")
    warnings: list[WarningOut]
    extend: ExtendChoicesOut


def _own(request: HttpRequest, session_id: int) -> ComputeSession:
    session: ComputeSession = request.auth  # type: ignore[attr-defined]
    if session.pk != session_id:
        raise NotFound("no such session")  # another session: indistinguishable from none
    return session


def lease_out(session: ComputeSession) -> dict[str, Any]:
    now = timezone.now()
    choices = lease_extend_choices(session=session, now=now)
    warnings = list(
        session.events.filter(kind=SessionEvent.Kind.WARNING).order_by("-at", "-pk")[
            :WARNINGS_SHOWN
        ]
    )
    return {
        "session_id": session.pk,
        "state": session.state,
        "machine": {"id": session.machine.pk, "name": session.machine.name},
        "started_at": session.started_at,
        "expires_at": session.expires_at,
        "now": now,
        "warnings": [{"at": w.at, "message": w.message} for w in reversed(warnings)],
        "extend": {
            "default_minutes": choices.default,
            "choices_minutes": choices.choices,
            "reason": choices.reason,
        },
    }


@router.get(
    "/session-capability/sessions/{session_id}/lease",
    response={200: LeaseOut, 401: Detail, 404: Detail},
    summary="The capability's own session: lease, warnings and Extend choices",
)
def capability_lease(request: HttpRequest, session_id: int) -> dict[str, Any]:
    return lease_out(_own(request, session_id))


@router.post(
    "/session-capability/sessions/{session_id}/extend",
    response={200: LeaseOut, 400: Detail, 401: Detail, 404: Detail, 409: Detail},
    summary="Extend the capability's own session within the policy",
)
def capability_extend(request: HttpRequest, session_id: int, payload: ExtendIn) -> dict[str, Any]:
    session = _own(request, session_id)
    session = lease_extend(session=session, minutes=payload.minutes, actor=session.owner)
    return lease_out(session)
