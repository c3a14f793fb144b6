from __future__ import annotations

from django.urls import path

from reports import views

app_name = "reports"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("machine/<int:pk>/", views.machine, name="machine"),
]
