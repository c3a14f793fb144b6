"""The user's profile page (``/accounts/profile/``): e-mail notifications (opt-in) and the time
zone for the pages and mails."""

from __future__ import annotations

import zoneinfo
from functools import cache
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse

from accounts.auth import AuthedRequest
from accounts.models import User


@cache
def zone_choices() -> list[tuple[str, str]]:
    zones = sorted(z for z in zoneinfo.available_timezones() if "/" in z or z == "UTC")
    return [("", "My browser's time zone"), *((z, z.replace("_", " ")) for z in zones)]


class ProfileForm(forms.ModelForm[User]):
    time_zone = forms.ChoiceField(choices=zone_choices, required=False, label="Time zone")

    class Meta:
        model = User
        fields = ["email", "email_notifications", "time_zone"]
        labels = {
            "email": "E-mail address",
            "email_notifications": "E-mail me when my session is ready, is about to end, and "
            "has ended",
        }
        help_texts = {"email_notifications": ""}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["time_zone"].help_text = (
            "Times on the pages, and in mails. With your browser's zone, mails give the lab's "
            "time and name its zone."
        )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("email_notifications") and not data.get("email"):
            self.add_error("email", "Enter an address to receive notifications at.")
        return data


@login_required
def profile(request: AuthedRequest) -> HttpResponse:
    form = ProfileForm(request.POST or None, instance=request.user)
    if request.method == "POST" and form.is_valid():
        form.save()
        messages.success(request, "Saved.")
        return HttpResponseRedirect(reverse("profile"))
    return render(request, "profile.html", {"form": form}, status=400 if form.errors else 200)
