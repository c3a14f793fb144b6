from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.views.decorators.http import require_POST

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
        "cleanup_checks",
        "cleanup_account",
        # Telemetry from the agent (inputs of the idle policy): never edited by hand.
        "last_activity",
        "kernels_busy",
        "connections",
        "activity_source",
        "activity_cpu_percent",
    )
    exclude = ("jupyter_token", "jupyter_url")  # both grant access to the student's Jupyter
    inlines = [SessionEventInline]
    actions = ["end_sessions"]
    change_form_template = "admin/compute_sessions/computesession/change_form.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # sessions are requested through the API or the dashboard

    def has_delete_permission(
        self, request: HttpRequest, obj: ComputeSession | None = None
    ) -> bool:
        # A live session is ended (End session), never deleted under the agent's feet.
        if obj is not None and obj.is_live:
            return False
        return super().has_delete_permission(request, obj)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # bulk delete would take live sessions too
        return actions

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # Every field is read-only: no Save buttons to suggest otherwise.
        context = {
            **(extra_context or {}),
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
        }
        return super().change_view(request, object_id, form_url, context)

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                "<int:pk>/end/",
                self.admin_site.admin_view(require_POST(self.end_view)),
                name="compute_sessions_computesession_end",
            )
        ]
        return own + super().get_urls()

    def end_view(self, request: AuthedRequest, pk: int) -> HttpResponse:
        """The End session button: the same service as the list action and the dashboard."""
        session = get_object_or_404(ComputeSession, pk=pk)
        if not self.has_change_permission(request, session):
            return HttpResponse("not allowed", status=403)
        try:
            session_stop(session=session, reason=EndReason.ADMIN, actor=request.user)
            self.message_user(request, f"Session {pk} is ending.")
        except ServiceError as exc:
            self.message_user(request, f"session {pk}: {exc.detail}", messages.WARNING)
        return HttpResponseRedirect(
            reverse("admin:compute_sessions_computesession_change", args=[pk])
        )

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
