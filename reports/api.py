"""``GET /api/reports/utilisation``: the staff report as JSON, or CSV (CONTRACT "Staff reports")."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from django.http import HttpResponse
from ninja import Field, Query, Router, Schema
from ninja.errors import HttpError
from pydantic import ConfigDict

from accounts.auth import AuthedRequest
from machines.models import Lab
from reports.figures import report
from reports.tables import summary_table, to_csv

router = Router(tags=["reports"])


class UtilisationQuery(Schema):
    model_config = ConfigDict(populate_by_name=True)

    first: dt.date = Field(alias="from", description="first local day, YYYY-MM-DD")
    last: dt.date = Field(alias="to", description="last local day (included), YYYY-MM-DD")
    lab: str | None = Field(default=None, max_length=100, description="one lab by name")
    format: Literal["json", "csv"] = "json"


class LabOut(Schema):
    lab: str
    hours_available: float
    hours_leased: float
    hours_used: float
    sessions: int
    end_reasons: dict[str, int]
    unmet_requests: int
    timezone: str
    idle_hours_reclaimed: float | None = Field(description="hours used / hours available")
    time_to_ready_median_s: float | None
    time_to_ready_p90_s: float | None
    wipe_failures: int
    waiting_users: int


class UtilisationOut(Schema):
    model_config = ConfigDict(populate_by_name=True)

    first: dt.date = Field(alias="from")
    last: dt.date = Field(alias="to")
    labs: list[LabOut]
    unmet_requests_any_lab: int


@router.get(
    "/reports/utilisation",
    response={200: UtilisationOut},
    by_alias=True,
    summary="Utilisation of each lab for a period (staff only)",
    description="Hours available, leased and used, sessions by end reason and unmet requests "
    "per lab, in each lab's time zone. `format=csv` gives the same as CSV (one row per lab, "
    "`end_reason_<reason>` columns). 403 for anyone but staff.",
)
def utilisation(request: AuthedRequest, q: Query[UtilisationQuery]) -> object:
    if not request.user.is_staff:
        raise HttpError(403, "staff only")
    try:
        rep = report(q.first, q.last, lab=q.lab, detail=False)
    except ValueError as exc:
        raise HttpError(400, str(exc)) from exc
    except Lab.DoesNotExist as exc:
        raise HttpError(404, "no such lab") from exc
    if q.format == "csv":
        response = HttpResponse(to_csv(summary_table(rep)), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = (
            f'attachment; filename="utilisation-{q.first}-{q.last}.csv"'
        )
        return response
    return rep.as_json()
