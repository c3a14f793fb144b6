"""Login throttling (django-axes): the password form and the admin's lock a username after
AXES_FAILURE_LIMIT wrong passwords, say so plainly, and staff can unlock it."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from accounts.models import User
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "right-horse-battery-staple"


@pytest.fixture
def victim() -> User:
    user = UserFactory.create(username="victim", is_staff=True)
    user.set_password(PASSWORD)
    user.save()
    return user


def logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


@pytest.mark.parametrize("url", ["/accounts/login/", "/admin/login/"])
def test_it_locks_after_the_limit_and_the_right_password_no_longer_works(
    url: str, victim: User, settings: Any
) -> None:
    settings.AXES_FAILURE_LIMIT = 5
    guesser = Client()
    for attempt in range(4):
        response = guesser.post(url, {"username": "victim", "password": f"guess-{attempt}"})
        assert response.status_code == 200  # the form again, "wrong password"
        assert not logged_in(guesser)

    fifth = guesser.post(url, {"username": "victim", "password": "guess-5"})
    assert fifth.status_code == 429
    assert b"Too many failed log-ins" in fifth.content
    assert b"locked after 5 wrong passwords" in fifth.content

    # The attack: the right password now, from a fresh client (another address would be the
    # same: the lock is on the username). Before the throttle, this logged in.
    right = Client().post(url, {"username": "victim", "password": PASSWORD})
    assert right.status_code == 429
    assert b"ask" in right.content.lower()
    assert not logged_in(Client())


def test_a_success_before_the_limit_resets_the_count(victim: User, settings: Any) -> None:
    settings.AXES_FAILURE_LIMIT = 3
    client = Client()
    for attempt in range(2):
        client.post("/accounts/login/", {"username": "victim", "password": f"x{attempt}"})
    assert (
        client.post("/accounts/login/", {"username": "victim", "password": PASSWORD}).status_code
        == 302
    )
    client.logout()
    for attempt in range(2):
        client.post("/accounts/login/", {"username": "victim", "password": f"y{attempt}"})
    assert (
        client.post("/accounts/login/", {"username": "victim", "password": PASSWORD}).status_code
        == 302
    )


def test_staff_unlock_the_account_from_the_admin(victim: User, staff: User, settings: Any) -> None:
    settings.AXES_FAILURE_LIMIT = 2
    for attempt in range(2):
        Client().post("/accounts/login/", {"username": "victim", "password": f"z{attempt}"})
    assert (
        Client().post("/accounts/login/", {"username": "victim", "password": PASSWORD}).status_code
        == 429
    )

    admin = Client()
    admin.force_login(staff)
    response = admin.post(
        reverse("admin:accounts_user_changelist"),
        {"action": "unlock_login", "_selected_action": [victim.pk]},
        follow=True,
    )
    assert b"Unlocked: victim" in response.content

    client = Client()
    assert (
        client.post("/accounts/login/", {"username": "victim", "password": PASSWORD}).status_code
        == 302
    )
    assert logged_in(client)
