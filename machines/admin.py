from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_POST

from accounts.auth import AuthedRequest
from machines import services
from machines.models import (
    AvailabilityWindow,
    ClosedDate,
    EnrollmentToken,
    Lab,
    Machine,
    MachineEvent,
    current_agent_version,
    version_key,
)


class AvailabilityWindowInline(admin.TabularInline[AvailabilityWindow, Lab]):
    model = AvailabilityWindow
    extra = 0


class ClosedDateInline(admin.TabularInline[ClosedDate, Lab]):
    model = ClosedDate
    extra = 0


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float):
        return "?"
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def _percent(value: Any) -> str:
    return "–" if value is None else f"{float(value):.0f} %"


@admin.register(Lab)
class LabAdmin(admin.ModelAdmin[Lab]):
    list_display = (
        "name",
        "building",
        "room",
        "timezone",
        "opening_hours",
        "owner_idle_minutes",
        "warm_pool",
        "access_team_domain",
    )
    search_fields = ("name", "building")
    readonly_fields = ("opening_hours",)

    def save_model(self, request: Any, obj: Lab, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change:  # the warm pool switch, hours: agents look again at once
            services.lab_settings_changed(lab=obj)

    @admin.display(description="Opening hours")
    def opening_hours(self, obj: Lab) -> str:
        if obj.pk is None:
            return "Always open until availability windows are added."
        windows = list(obj.windows.all())
        if not windows:
            return "Always open (no availability windows)"
        return "; ".join(str(w) for w in windows)

    inlines = [AvailabilityWindowInline, ClosedDateInline]
    actions = ["create_enrollment_token"]

    @admin.action(description="Create an enrollment token (shown once)")
    def create_enrollment_token(self, request: AuthedRequest, queryset: QuerySet[Lab]) -> None:
        for lab in queryset:
            _, clear = services.enrollment_token_create(lab=lab, actor=request.user)
            self.message_user(
                request,
                f"Join token for {lab.name} (shown once): "
                f"nexcompute-agent enroll --server <URL> --token={clear}",
                messages.WARNING,
            )


class MachineEventInline(admin.TabularInline[MachineEvent, Machine]):
    model = MachineEvent
    extra = 0
    fields = ("at", "kind", "from_status", "to_status", "message", "actor")
    readonly_fields = fields
    can_delete = False
    ordering = ("-at",)
    max_num = 0
    show_change_link = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[MachineEvent]:
        return super().get_queryset(request).select_related("actor")


class AgentVersionFilter(admin.SimpleListFilter):
    """Machines by agent version, and those older than the agent this server ships."""

    title = "agent version"
    parameter_name = "agent"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        versions = (
            Machine.objects.exclude(agent_version="")
            .order_by()
            .values_list("agent_version", flat=True)
            .distinct()
        )
        current = current_agent_version()
        return [("outdated", f"Outdated (older than {current})")] + [
            (v, v) for v in sorted(set(versions), key=version_key, reverse=True)
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Machine]) -> QuerySet[Machine]:
        value = self.value()
        if not value:
            return queryset
        if value == "outdated":
            current = version_key(current_agent_version())
            versions = queryset.exclude(agent_version="").values_list("agent_version", flat=True)
            old = {v for v in versions.distinct() if version_key(v) < current}
            return queryset.filter(agent_version__in=old)
        return queryset.filter(agent_version=value)


@admin.register(Machine)
class MachineAdmin(admin.ModelAdmin[Machine]):
    list_display = (
        "name",
        "lab",
        "status",
        "flags",
        "memory",
        "gpu_count",
        "last_seen",
        "agent_version",
        "agent_up_to_date",
    )
    list_filter = ("status", "lab", "enabled", "draining", AgentVersionFilter)
    list_select_related = ("lab",)
    search_fields = ("name", "hostname")
    readonly_fields = (
        "status",
        "enabled",
        "draining",
        "owner_present",
        "warm_ready",
        "quarantine_reason",
        "current_session",
        "hardware",
        "load",
        "gpu_count",
        "last_seen",
        "agent_version",
        "credential_lookup",
        "credential_revoked_at",
        "created_at",
        "reports_link",
    )
    # Raw JSON and bytes are shown in human units instead (hardware, load).
    exclude = ("credential_digest", "specs", "metrics", "memory_bytes")
    inlines = [MachineEventInline]
    actions = ["drain", "maintenance", "enable", "revoke_credential"]
    change_form_template = "admin/machines/machine/change_form.html"
    # Lifecycle buttons on the machine's page: name -> (service, what the message says).
    LIFECYCLE: dict[str, tuple[Callable[..., None], str]] = {
        "drain": (services.machine_drain, "draining"),
        "maintenance": (services.machine_set_maintenance, "in maintenance"),
        "enable": (services.machine_enable, "enabled"),
        "revoke": (services.machine_revoke_credential, "revoked"),
    }

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # machines come only from enrollment (`createenrollmenttoken`)

    @admin.display(description="State")
    def flags(self, obj: Machine) -> str:
        parts = [
            label
            for on, label in (
                (not obj.enabled, "maintenance"),
                (obj.draining, "draining"),
                (obj.owner_present, "owner at keyboard"),
            )
            if on
        ]
        return ", ".join(parts) or "–"

    @admin.display(description="Memory", ordering="memory_bytes")
    def memory(self, obj: Machine) -> str:
        return _bytes(obj.memory_bytes)

    @admin.display(description="Hardware")
    def hardware(self, obj: Machine) -> str:
        specs = obj.specs or {}
        gpus = specs.get("gpus") or []
        rows = [
            ("CPU", f"{specs.get('cpu_model', '?')} ({specs.get('cpu_count', '?')} cores)"),
            ("Memory", _bytes(obj.memory_bytes)),
            ("Disk", _bytes(specs.get("disk_bytes"))),
            ("OS", specs.get("os", "?")),
            (
                "GPUs",
                ", ".join(
                    f"{g.get('name', 'GPU')} ({_bytes(g.get('memory_bytes'))})"
                    if isinstance(g, dict)
                    else str(g)
                    for g in gpus
                )
                or "none",
            ),
        ]
        return format_html(
            "<table>{}</table>", format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows)
        )

    @admin.display(description="Load (latest heartbeat)")
    def load(self, obj: Machine) -> str:
        m = obj.metrics or {}
        rows = [
            ("CPU", _percent(m.get("cpu_percent"))),
            ("Memory", _percent(m.get("memory_percent"))),
            ("GPU", _percent(m.get("gpu_percent"))),
            ("GPU memory", _percent(m.get("gpu_memory_percent"))),
        ]
        return format_html(
            "<table>{}</table>", format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows)
        )

    @admin.display(description="Current session")
    def current_session(self, obj: Machine) -> str:
        # Through the reverse relation: machines never imports sessions (layering).
        session = obj.sessions.select_related("owner").order_by("-created_at").first()
        if session is None or not session.is_live:
            return "None"
        url = reverse("admin:compute_sessions_computesession_change", args=[session.pk])
        return format_html(
            '<a href="{}">session {}</a>: {} ({}, lease ends {} UTC)',
            url,
            session.pk,
            session.owner.get_username(),
            session.state,
            f"{session.expires_at:%Y-%m-%d %H:%M}",
        )

    @admin.display(description="Reports")
    def reports_link(self, obj: Machine) -> str:
        return format_html(
            '<a href="{}">Load history, last sessions and receipts</a>',
            reverse("reports:machine", args=[obj.pk]),
        )

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                "<int:pk>/lifecycle/<str:action>/",
                self.admin_site.admin_view(require_POST(self.lifecycle_view)),
                name="machines_machine_lifecycle",
            )
        ]
        return own + super().get_urls()

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        buttons = [
            ("drain", "Drain"),
            ("maintenance", "Maintenance"),
            ("enable", "Enable"),
            ("revoke", "Revoke credential"),
        ]
        context = {**(extra_context or {}), "lifecycle_buttons": buttons}
        return super().change_view(request, object_id, form_url, context)

    def lifecycle_view(self, request: AuthedRequest, pk: int, action: str) -> HttpResponse:
        """A button on the machine's page: the same service as the list action."""
        machine = get_object_or_404(Machine, pk=pk)
        if action not in self.LIFECYCLE or not self.has_change_permission(request, machine):
            return HttpResponse("not allowed", status=403)
        fn, done = self.LIFECYCLE[action]
        fn(machine=machine, actor=request.user)
        self.message_user(request, f"{machine.name} {done}.")
        return HttpResponseRedirect(reverse("admin:machines_machine_change", args=[pk]))

    @admin.display(boolean=True, description="agent up to date")
    def agent_up_to_date(self, machine: Machine) -> bool | None:
        return None if not machine.agent_version else not machine.agent_outdated

    def _each(
        self,
        request: AuthedRequest,
        queryset: QuerySet[Machine],
        fn: Callable[..., None],
        done: str,
    ) -> None:
        for machine in queryset:
            fn(machine=machine, actor=request.user)
        self.message_user(request, f"{queryset.count()} machine(s) {done}.")

    @admin.action(description="Drain (finish current session, take no new ones)")
    def drain(self, request: AuthedRequest, queryset: QuerySet[Machine]) -> None:
        self._each(request, queryset, services.machine_drain, "draining")

    @admin.action(description="Put into maintenance")
    def maintenance(self, request: AuthedRequest, queryset: QuerySet[Machine]) -> None:
        self._each(request, queryset, services.machine_set_maintenance, "in maintenance")

    @admin.action(description="Enable (clear maintenance, draining, quarantine)")
    def enable(self, request: AuthedRequest, queryset: QuerySet[Machine]) -> None:
        self._each(request, queryset, services.machine_enable, "enabled")

    @admin.action(description="Revoke machine credential (the agent must re-enroll)")
    def revoke_credential(self, request: AuthedRequest, queryset: QuerySet[Machine]) -> None:
        self._each(request, queryset, services.machine_revoke_credential, "revoked")


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(admin.ModelAdmin[EnrollmentToken]):
    list_display = ("lab", "lookup", "created_by", "created_at", "expires_at", "used_at", "machine")
    list_select_related = ("lab", "created_by", "machine")
    readonly_fields = ("lookup", "digest", "created_by", "created_at", "used_at", "machine")
    raw_id_fields = ("lab",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # use the Lab action or `createenrollmenttoken`: the secret is shown once


@admin.register(MachineEvent)
class MachineEventAdmin(admin.ModelAdmin[MachineEvent]):
    list_display = ("at", "machine", "kind", "from_status", "to_status", "actor", "message")
    list_filter = ("kind",)
    list_select_related = ("machine", "actor")
    readonly_fields = ("machine", "at", "kind", "from_status", "to_status", "message", "actor")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
