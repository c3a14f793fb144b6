"""The staff pages inside admin: the utilisation overview and a machine's page. Staff only:
anybody else signed in gets 403, a visitor the admin login."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from functools import wraps
from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseForbidden
from django.shortcuts import get_object_or_404, render
from django.utils import timezone

from machines.models import Lab, Machine
from reports import charts
from reports.figures import EARLIEST, LATEST, MAX_DAYS, report
from reports.history import load_history
from reports.tables import Table, tables, to_csv
from sessions.models import ComputeSession

View = Callable[..., HttpResponse]


def staff_only(view: View) -> View:
    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), "admin:login")
        if not (request.user.is_active and request.user.is_staff):
            return HttpResponseForbidden("Staff only.")
        return view(request, *args, **kwargs)

    return wrapped


class RangeForm(forms.Form):
    """The date-range picker (local days of each lab, both included)."""

    start = forms.DateField(label="From", widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(label="To", widget=forms.DateInput(attrs={"type": "date"}))
    lab = forms.ModelChoiceField(
        Lab.objects.order_by("name"), required=False, empty_label="All labs", to_field_name="name"
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        start, end = data.get("start"), data.get("end")
        if start and end:
            if not (start >= EARLIEST and end <= LATEST):
                raise forms.ValidationError(f"Choose dates between {EARLIEST} and {LATEST}.")
            if end < start:
                raise forms.ValidationError("'To' is before 'From'.")
            if (end - start).days >= MAX_DAYS:
                raise forms.ValidationError(f"Choose at most {MAX_DAYS} days.")
        return data


def _range(request: HttpRequest, default_days: int) -> RangeForm:
    today = timezone.localdate()
    initial = {"start": today - dt.timedelta(days=default_days - 1), "end": today}
    data = request.GET.copy()
    for key, value in initial.items():
        data.setdefault(key, value.isoformat())
    return RangeForm(data)


def _csv(table: Table, stem: str) -> HttpResponse:
    response = HttpResponse(to_csv(table), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{stem}-{table.slug}.csv"'
    return response


@staff_only
def overview(request: HttpRequest) -> HttpResponse:
    form = _range(request, 30)
    context: dict[str, Any] = {**admin.site.each_context(request), "form": form}
    context["title"] = "Utilisation"
    if not form.is_valid():
        if "csv" in request.GET:
            return HttpResponseBadRequest("invalid period")
        return render(request, "reports/overview.html", context, status=400)
    first, last = form.cleaned_data["start"], form.cleaned_data["end"]
    lab = form.cleaned_data["lab"]
    rep = report(first, last, lab=lab.name if lab else None)
    all_tables = tables(rep)
    if "csv" in request.GET:
        wanted = [t for t in all_tables if t.slug == request.GET["csv"]]
        if not wanted:
            return HttpResponseBadRequest("no such table")
        return _csv(wanted[0], f"utilisation-{first}-{last}")
    query = request.GET.copy()
    query.pop("csv", None)
    context.update(
        report=rep,
        tables=all_tables,
        query=query.urlencode(),
        totals={
            "available": round(sum(lab.hours_available for lab in rep.labs), 2),
            "leased": round(sum(lab.hours_leased for lab in rep.labs), 2),
            "used": round(sum(lab.hours_used for lab in rep.labs), 2),
            "sessions": sum(lab.sessions for lab in rep.labs),
            "unmet": sum(lab.unmet_requests for lab in rep.labs) + rep.unmet_any_lab,
        },
        labs=[
            {
                "figures": lab,
                "hours_chart": charts.hours_by_day(lab.days, f"Hours by day in {lab.lab}"),
                "heat": charts.heat_map(
                    lab.used_by_hour_of_week,
                    "use-heat-map",
                    f"Hours used by local hour of week in {lab.lab}",
                    "h used",
                ),
                "reasons": charts.bars(
                    {k: float(v) for k, v in lab.end_reasons.items()},
                    "end-reasons",
                    f"Sessions by end reason in {lab.lab}",
                    "sessions",
                ),
                "unmet": charts.heat_map(
                    lab.unmet_by_hour_of_week,
                    "unmet-demand",
                    f"Requests refused for no machine fitting, by local hour of week, {lab.lab}",
                    "refused",
                ),
            }
            for lab in rep.labs
        ],
    )
    return render(request, "reports/overview.html", context)


@staff_only
def machine(request: HttpRequest, pk: int) -> HttpResponse:
    obj = get_object_or_404(Machine.objects.select_related("lab"), pk=pk)
    form = _range(request, 7)
    context: dict[str, Any] = {**admin.site.each_context(request), "form": form, "machine": obj}
    context["title"] = f"Machine {obj.name}"
    sessions = list(
        ComputeSession.objects.filter(machine=obj)
        .select_related("owner")
        .order_by("-created_at")[:20]
    )
    context["sessions"] = sessions
    context["sessions_table"] = Table(
        "sessions",
        "Last sessions and their wipe receipts",
        ["session", "user", "state", "end_reason", "requested", "ready", "ended", "wipe_verified",
         "files_removed", "bytes_removed", "processes_killed", "cleanup_finished"],
        [
            [s.pk, s.owner.username, s.state, s.end_reason, s.created_at, s.started_at, s.ended_at,
             s.cleanup_verified, s.files_removed, s.bytes_removed, s.processes_killed,
             s.cleanup_finished_at]
            for s in sessions
        ],
    )  # fmt: skip
    if not form.is_valid():
        return render(request, "reports/machine.html", context, status=400)
    tz = obj.lab.tz
    first, last = form.cleaned_data["start"], form.cleaned_data["end"]
    start = dt.datetime.combine(first, dt.time(0), tz).astimezone(dt.UTC)
    end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(0), tz).astimezone(dt.UTC)
    points = load_history(obj.pk, start, end)
    load_table = Table(
        "load",
        "Load history",
        ["at", "resolution_s", "cpu_percent", "memory_percent", "gpu_percent"],
        [[at.isoformat(), res, _r(c), _r(m), _r(g)] for at, res, c, m, g in points],
    )
    if request.GET.get("csv") == "load":
        return _csv(load_table, f"machine-{obj.name}")
    if request.GET.get("csv") == "sessions":
        return _csv(context["sessions_table"], f"machine-{obj.name}")
    context.update(
        points=len(points),
        chart=charts.load_lines(
            [(at, c, m, g) for at, _res, c, m, g in points],
            start,
            min(end, max(timezone.now(), start)),
            f"Load history of {obj.name}",
        ),
        query=request.GET.urlencode(),
    )
    return render(request, "reports/machine.html", context)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
