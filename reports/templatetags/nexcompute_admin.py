from __future__ import annotations

from typing import Any

from django import template

from reports.fleet import fleet_overview
from reports.units import human_bytes, human_duration

register = template.Library()


@register.inclusion_tag("admin/fleet_overview.html")
def fleet() -> dict[str, Any]:
    return {"fleet": fleet_overview()}


register.filter("human_bytes", human_bytes)
register.filter("human_duration", human_duration)
