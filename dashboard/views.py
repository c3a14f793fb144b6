"""The student's pages: the live dashboard, its machines fragment (resync) and the history.

Pages are rendered here from the same helpers the JSON API uses (``session_out``) and the card
helpers (``dashboard.cards``); ``static/js/dashboard.js`` keeps them live from
``/ws/dashboard/`` (``dashboard.consumers``) and calls the JSON API for every action.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_GET
from nexcompute_jupyter.door import CODE_SECONDS, mint_code

from accounts.auth import AuthedRequest
from accounts.models import User
from accounts.services import policy_for
from dashboard.cards import lab_views, page_texts
from nexcompute import words
from sessions.api import session_out
from sessions.models import ComputeSession, SessionEvent
from sessions.policy import idle_rule_text
from sessions.states import (
    END_REASON_SENTENCES,
    STATE_LABELS,
    TERMINAL,
    EndReason,
    SessionState,
)


def _live_session(user: User) -> ComputeSession | None:
    return ComputeSession.objects.for_owner(user).live().select_related("machine").first()


@login_required
@ensure_csrf_cookie
def dashboard(request: AuthedRequest) -> HttpResponse:
    live = list(ComputeSession.objects.for_owner(request.user).live().select_related("machine"))
    session = live[0] if live else None
    live_count = len(live)
    policy = policy_for(request.user)
    labs = lab_views(
        request.user, mine_machine_id=session.machine_id if session else None, policy=policy
    )
    return render(
        request,
        "dashboard.html",
        {
            # "Connect to any machine" is off while the user holds as many sessions as the
            # policy allows (the script keeps it so as sessions start and end).
            "max_sessions": policy.max_concurrent_sessions,
            "live_count": live_count,
            "at_limit": live_count >= policy.max_concurrent_sessions,
            "labs": labs,
            "lab_names": [lab.name for lab in labs],
            "machine_count": sum(len(lab.machines) for lab in labs),
            "session": session,
            "session_json": _page_session(session, request.user),
            "page_texts": page_texts(),
            "idle_rule": idle_rule_text(),
        },
    )


def _page_session(session: ComputeSession | None, user: User) -> dict[str, object] | None:
    """The session as the page starts with it: as the API gives it, without the token-bearing
    ``url`` (the page opens Jupyter through :func:`open_jupyter`, never by the token)."""
    if session is None:
        return None
    return {**session_out(session, viewer_id=user.pk), "url": None}


# What a browser may ask Jupyter for after the door: Jupyter Lab, or the workspace as a zip.
_NEXT_PATHS = ("/lab", "/directories/", "/nexcompute/api/download")


@login_required
@require_GET
def open_jupyter(request: AuthedRequest, session_id: int) -> HttpResponse:
    """The door to a session's Jupyter (docs/security.md): only the signed-in owner of the
    running session gets a one-time code, which this page POSTs to the session's Jupyter
    (never in a URL); Jupyter answers with its own cookie and a redirect to ``next``. Anyone
    else, and any session that is not running, gets 404."""
    session = (
        ComputeSession.objects.for_owner(request.user)
        .filter(pk=session_id, state=SessionState.RUNNING)
        .exclude(jupyter_url="")
        .exclude(jupyter_token="")
        .first()
    )
    if session is None:
        raise Http404("no running session of yours with this id")
    parts = urllib.parse.urlsplit(session.jupyter_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Http404("this session has no Jupyter address")
    next_path = request.GET.get("next", "/lab")
    if (
        len(next_path) > 300
        or "\\" in next_path
        or next_path.startswith("//")
        or not next_path.startswith(_NEXT_PATHS)
    ):
        next_path = "/lab"
    code = mint_code(token=session.jupyter_token, session_id=session.pk)
    response = render(
        request,
        "open_jupyter.html",
        {
            "action": f"{parts.scheme}://{parts.netloc}/login",
            "code": code,
            "next": next_path,
            "seconds": CODE_SECONDS,
            "session": session,
        },
    )
    # The page holds a live code: never cached, never sent on as a Referer.
    response["Cache-Control"] = "no-store"
    response["Referrer-Policy"] = "no-referrer"
    return response


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
        session.timeline = plain_timeline(session.events.all())  # type: ignore[attr-defined]
        for event in session.timeline:  # type: ignore[attr-defined]
            event.state_label = (
                STATE_LABELS.get(SessionState(event.to_state), event.to_state)
                if event.to_state
                else ""
            )
    live = _live_session(request.user)
    # Times in the user's own zone when the profile names one (the page's script then writes
    # them in the browser's zone if not); the zone is always named.
    with timezone.override(words.zone(request.user.time_zone)):
        return render(request, "history.html", {"sessions": sessions, "live": live})


def _duration(session: ComputeSession) -> str:
    if session.started_at is None or session.ended_at is None:
        return "did not start"
    return words.duration((session.ended_at - session.started_at).total_seconds())


def plain_timeline(events: Iterable[SessionEvent]) -> list[SessionEvent]:
    """The timeline as a student reads it: a line that says what the line before it said is
    left out (sessions recorded before the steps were keyed repeat some). The script's
    ``renderEvents`` does the same on the dashboard."""
    shown: list[SessionEvent] = []
    for event in events:
        if shown and shown[-1].message == event.message:
            continue
        shown.append(event)
    return shown
