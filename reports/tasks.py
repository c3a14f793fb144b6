"""Background work of the reports: the nightly rollup, ageing the load history, the monthly
e-mail to lab owners."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from celery import shared_task
from django.core.mail import send_mail
from django.db import transaction
from django.template.loader import render_to_string
from django.utils import timezone

from machines.models import Lab
from reports.figures import lab_figures
from reports.history import downsample
from reports.models import LabReportSubscription
from reports.rollup import rollup

log = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def rollup_reports(
    lab_ids: list[int] | None = None, first: str | None = None, last: str | None = None
) -> int:
    """The nightly rollup of the reports (hourly beat: each lab's day is rolled up soon after
    its local midnight). ``first``/``last`` (ISO dates) recompute those days, e.g. after
    history was corrected; idempotent."""
    return rollup(
        now=timezone.now(),
        lab_ids=lab_ids,
        first=dt.date.fromisoformat(first) if first else None,
        last=dt.date.fromisoformat(last) if last else None,
    )


@shared_task(ignore_result=True)
def downsample_metrics() -> dict[str, int]:
    return downsample(timezone.now())


def previous_month(today: dt.date) -> tuple[dt.date, dt.date]:
    last = today.replace(day=1) - dt.timedelta(days=1)
    return last.replace(day=1), last


@shared_task(ignore_result=True)
def send_monthly_reports() -> int:
    """Queue one e-mail per opted-in lab whose last month is not reported yet (hourly beat;
    the claim below makes a second run, or a second worker, send nothing)."""
    sent = 0
    for sub_id in LabReportSubscription.objects.filter(monthly_email=True).values_list(
        "pk", flat=True
    ):
        sent += send_lab_report(sub_id)
    return sent


@shared_task(ignore_result=True, autoretry_for=(OSError,), retry_backoff=True, max_retries=5)
def send_lab_report(subscription_id: int, now: Any = None) -> int:
    """Send ``subscription_id``'s report of the last whole month in its lab's time zone, once."""
    sub = LabReportSubscription.objects.select_related("lab").filter(pk=subscription_id).first()
    if sub is None or not sub.monthly_email or not sub.recipient_list:
        return 0
    moment = now or timezone.now()
    first, last = previous_month(moment.astimezone(sub.lab.tz).date())
    with transaction.atomic():
        # The claim: only the run that moves last_sent_month forward sends.
        claimed = (
            LabReportSubscription.objects.filter(pk=sub.pk)
            .exclude(last_sent_month__gte=first)
            .update(last_sent_month=first)
        )
        if not claimed:
            return 0
        lab = Lab.objects.prefetch_related("windows", "closed_dates").get(pk=sub.lab_id)
        fig = lab_figures(lab, first, last, now=moment)
        body = render_to_string(
            "reports/monthly_email.txt", {"f": fig, "first": first, "last": last}
        )
        # If sending fails the claim rolls back with it, and the retry sends again.
        send_mail(
            f"NexCompute: what {lab.name} gave in {first:%B %Y}",
            body,
            None,
            sub.recipient_list,
        )
    log.info("monthly report of %s for %s sent", lab.name, first)
    return 1
