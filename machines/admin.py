from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

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


@admin.register(Lab)
class LabAdmin(admin.ModelAdmin[Lab]):
    list_display = (
        "name",
        "building",
        "room",
        "timezone",
        "owner_idle_minutes",
        "access_team_domain",
    )
    search_fields = ("name", "building")
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
        "enabled",
        "draining",
        "owner_present",
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
        "quarantine_reason",
        "specs",
        "metrics",
        "memory_bytes",
        "gpu_count",
        "last_seen",
        "agent_version",
        "credential_lookup",
        "credential_revoked_at",
        "created_at",
    )
    exclude = ("credential_digest",)
    inlines = [MachineEventInline]
    actions = ["drain", "maintenance", "enable", "revoke_credential"]

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
