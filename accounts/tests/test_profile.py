"""The profile page: opt-in e-mail notifications and the time zone, for the signed-in user only."""

from __future__ import annotations

import pytest
from django.test import Client

from accounts.models import User

pytestmark = pytest.mark.django_db

URL = "/accounts/profile/"


def logged_in(user: User, **kwargs: bool) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def test_anonymous_visitors_are_sent_to_log_in() -> None:
    response = Client().get(URL)
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={URL}"
    assert Client().post(URL, {"email_notifications": "on"}).status_code == 302


def test_it_is_reachable_from_the_dashboard_and_off_by_default(owner: User) -> None:
    client = logged_in(owner)
    assert 'href="/accounts/profile/"' in client.get("/").content.decode()
    html = client.get(URL).content.decode()
    assert 'name="email_notifications"' in html
    assert 'name="email_notifications" id="id_email_notifications" checked' not in html
    assert '<option value="" selected>My browser&#x27;s time zone</option>' in html
    assert owner.email_notifications is False


def test_a_user_opts_in_with_an_address_and_a_zone(owner: User, other: User) -> None:
    response = logged_in(owner).post(
        URL,
        {"email": "owner@example.edu", "email_notifications": "on", "time_zone": "Europe/Zurich"},
    )
    assert response.status_code == 302
    owner.refresh_from_db()
    assert (owner.email, owner.email_notifications, owner.time_zone) == (
        "owner@example.edu",
        True,
        "Europe/Zurich",
    )
    other.refresh_from_db()
    assert other.email_notifications is False  # only the signed-in user's profile changes
    page = logged_in(owner).get("/").content.decode()
    assert 'data-time-zone="Europe/Zurich"' in page


def test_opting_in_needs_an_address(owner: User) -> None:
    response = logged_in(owner).post(URL, {"email": "", "email_notifications": "on"})
    assert response.status_code == 400
    assert "Enter an address to receive notifications at." in response.content.decode()
    owner.refresh_from_db()
    assert owner.email_notifications is False


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "x" * 100])
def test_an_unknown_zone_is_refused(owner: User, zone: str) -> None:
    response = logged_in(owner).post(URL, {"email": "o@example.edu", "time_zone": zone})
    assert response.status_code == 400
    owner.refresh_from_db()
    assert owner.time_zone == ""


def test_it_needs_the_csrf_token(owner: User) -> None:
    client = logged_in(owner, enforce_csrf_checks=True)
    response = client.post(URL, {"email": "o@example.edu", "email_notifications": "on"})
    assert response.status_code == 403
    owner.refresh_from_db()
    assert owner.email_notifications is False
