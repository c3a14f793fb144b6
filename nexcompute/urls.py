from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from accounts import profile as account_profile
from accounts import views as account_views
from dashboard import views as dashboard_views
from nexcompute import ops
from nexcompute.api import api

urlpatterns = [
    path("", dashboard_views.dashboard, name="dashboard"),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics_view, name="metrics"),
    path("history/", dashboard_views.history, name="history"),
    path("sessions/<int:session_id>/open/", dashboard_views.open_jupyter, name="open-jupyter"),
    path("dashboard/machines/", dashboard_views.dashboard_machines, name="dashboard-machines"),
    path("accounts/login/", account_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", account_views.logout, name="logout"),
    path("accounts/profile/", account_profile.profile, name="profile"),
    # allauth's OIDC callback, wrapped to keep the ID token for RP-initiated logout.
    path(
        "accounts/oidc/<str:provider_id>/login/callback/",
        account_views.oidc_callback,
        name="openid_connect_callback",
    ),
    # Single sign-on (OIDC under oidc/, SAML under saml/); the login/logout above win.
    path("accounts/", include("allauth.urls")),
    # The staff reports live inside admin's pages (before admin's catch-all).
    path("admin/reports/", include("reports.urls")),
    path("admin/", admin.site.urls),
    path("api/", api.urls),
]
