from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.auth import AuthedRequest
from nexcompute.errors import ServiceError
from sessions.models import ComputeSession, SessionEvent
from sessions.services import session_stop
from sessions.states import EndReason


class SessionEventInline(admin.TabularInline[SessionEvent, ComputeSession]):
    model = SessionEvent
    extra = 0
    fields = ("at", "kind", "from_state", "to_state", "reason", "message", "key", "actor")
    readonly_fields = fields
    can_delete = False
    max_num = 0

    def get_queryset(self, request: HttpRequest) -> QuerySet[SessionEvent]:
        return super().get_queryset(request).select_related("actor")


@admin.register(ComputeSession)
class ComputeSessionAdmin(admin.ModelAdmin[ComputeSession]):
    list_display = (
        "id",
        "owner",
        "machine",
        "state",
        "end_reason",
        "created_at",
        "expires_at",
        "cleanup_verified",
    )
    list_filter = ("state", "end_reason", "cleanup_verified")
    list_select_related = ("owner", "machine")
    search_fields = ("owner__username", "machine__name")
    raw_id_fields = ("owner", "machine")
    # State, lease and receipt change only through services.
    readonly_fields = (
        "owner",
        "machine",
        "state",
        "end_reason",
        "requirements",
        "duration_minutes",
        "created_at",
        "started_at",
        "expires_at",
        "ended_at",
        "cleanup_verified",
        "files_removed",
        "bytes_removed",
        "processes_killed",
        "cleanup_finished_at",
        "cleanup_details",
    )
    exclude = ("jupyter_token", "jupyter_url")  # both grant access to the student's Jupyter
    inlines = [SessionEventInline]
    actions = ["end_sessions"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # sessions are requested through the API or the dashboard

    @admin.action(description="End session (staff)")
    def end_sessions(self, request: AuthedRequest, queryset: QuerySet[ComputeSession]) -> None:
        ended = 0
        for session in queryset:
            try:
                session_stop(session=session, reason=EndReason.ADMIN, actor=request.user)
                ended += 1
            except ServiceError as exc:
                self.message_user(request, f"session {session.pk}: {exc.detail}", messages.WARNING)
        self.message_user(request, f"{ended} session(s) ending.")
