"""The student's pages: the live dashboard, its machines fragment (resync) and the history.

Pages are rendered here from the same helpers the JSON API uses (``session_out``) and the card
helpers (``dashboard.cards``); ``static/js/dashboard.js`` keeps them live from
``/ws/dashboard/`` (``dashboard.consumers``) and calls the JSON API for every action.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

from accounts.auth import AuthedRequest
from accounts.models import User
from dashboard.cards import lab_views, page_texts
from sessions.api import session_out
from sessions.models import ComputeSession, SessionEvent
from sessions.states import END_REASON_SENTENCES, TERMINAL, EndReason


def _live_session(user: User) -> ComputeSession | None:
    return ComputeSession.objects.for_owner(user).live().select_related("machine").first()


@login_required
@ensure_csrf_cookie
def dashboard(request: AuthedRequest) -> HttpResponse:
    session = _live_session(request.user)
    labs = lab_views(request.user, mine_machine_id=session.machine_id if session else None)
    return render(
        request,
        "dashboard.html",
        {
            "labs": labs,
            "lab_names": [lab.name for lab in labs],
            "machine_count": sum(len(lab.machines) for lab in labs),
            "session": session,
            "session_json": session_out(session, viewer_id=request.user.pk) if session else None,
            "page_texts": page_texts(),
        },
    )


@login_required
def dashboard_machines(request: AuthedRequest) -> HttpResponse:
    """The machines part of the dashboard alone: the script swaps it in to resync."""
    session = _live_session(request.user)
    labs = lab_views(request.user, mine_machine_id=session.machine_id if session else None)
    return render(request, "partials/machines.html", {"labs": labs})


@login_required
def history(request: AuthedRequest) -> HttpResponse:
    """The user's past sessions: end reason in plain words, timeline and wipe receipt."""
    sessions = list(
        ComputeSession.objects.for_owner(request.user)
        .filter(state__in=TERMINAL)
        .select_related("machine", "machine__lab")
        .prefetch_related(Prefetch("events", queryset=SessionEvent.objects.order_by("at", "pk")))[
            :50
        ]
    )
    for session in sessions:
        session.end_reason_text = (  # type: ignore[attr-defined]
            END_REASON_SENTENCES[EndReason(session.end_reason)]
            if session.end_reason
            else "Session ended."
        )
        session.duration_text = _duration(session)  # type: ignore[attr-defined]
    live = _live_session(request.user)
    return render(request, "history.html", {"sessions": sessions, "live": live})


def _duration(session: ComputeSession) -> str:
    if session.started_at is None or session.ended_at is None:
        return "did not start"
    minutes = max(0, round((session.ended_at - session.started_at).total_seconds() / 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"
