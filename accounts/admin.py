from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.models import ApiToken, QuotaPolicy, User
from accounts.services import login_unlock


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    list_display = ("username", "email", "first_name", "last_name", "is_staff", "is_active")
    actions = ["unlock_login"]

    @admin.action(description="Unlock log-in (after too many wrong passwords)")
    def unlock_login(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        unlocked = [user.username for user in queryset if login_unlock(username=user.username)]
        if unlocked:
            self.message_user(request, f"Unlocked: {', '.join(unlocked)}.", messages.SUCCESS)
        else:
            self.message_user(request, "None of them was locked.", messages.INFO)


@admin.register(QuotaPolicy)
class QuotaPolicyAdmin(admin.ModelAdmin[QuotaPolicy]):
    list_display = (
        "name",
        "group",
        "is_default",
        "max_concurrent_sessions",
        "max_session_minutes",
        "max_hours_per_week",
        "allow_gpu",
    )
    list_select_related = ("group",)
    filter_horizontal = ("labs",)
    fieldsets = (
        (None, {"fields": ("name", "group", "is_default")}),
        (
            "Quota",
            {
                "fields": (
                    "max_concurrent_sessions",
                    "max_session_minutes",
                    "max_hours_per_week",
                    "allow_gpu",
                    "allow_terminals",
                    "labs",
                )
            },
        ),
        (
            "Limits of one session",
            {"fields": ("memory_percent", "cpu_weight", "cpu_quota", "max_tasks", "workspace_gb")},
        ),
    )


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin[ApiToken]):
    list_display = ("user", "name", "lookup", "created_at", "last_used_at", "revoked_at")
    list_select_related = ("user",)
    raw_id_fields = ("user",)
    readonly_fields = ("lookup", "digest", "created_at", "last_used_at")
    search_fields = ("user__username", "name", "lookup")

    def has_add_permission(self, request: object) -> bool:
        return False  # tokens are created by `createapitoken`, which shows the secret once
