"""Admin branding, the fleet overview as admin's first page, and the reports' own models."""

from __future__ import annotations

from django.contrib import admin

from reports.models import LabReportSubscription

admin.site.site_header = "NexCompute administration"
admin.site.site_title = "NexCompute admin"
admin.site.index_title = "Fleet"
admin.site.index_template = "admin/nexcompute_index.html"
admin.site.site_url = "/"


@admin.register(LabReportSubscription)
class LabReportSubscriptionAdmin(admin.ModelAdmin[LabReportSubscription]):
    list_display = ("lab", "monthly_email", "recipients", "last_sent_month")
    list_select_related = ("lab",)
    readonly_fields = ("last_sent_month",)
