from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from machines.api import machines_visible_to
from sessions.models import ComputeSession


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    machines = machines_visible_to(request.user)
    sessions = ComputeSession.objects.filter(owner_id=request.user.pk).select_related("machine")[
        :20
    ]
    return render(request, "dashboard.html", {"machines": machines, "sessions": sessions})


def healthz(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"ok": True})
