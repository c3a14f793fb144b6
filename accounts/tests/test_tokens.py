"""Personal API tokens: shown once, stored as a digest, revocable."""

from __future__ import annotations

import datetime as dt

import pytest
import time_machine
from django.test import Client
from django.utils import timezone

from accounts.models import ApiToken, User
from accounts.services import api_token_authenticate, api_token_create, api_token_revoke
from nexcompute.tokens import LOOKUP_LENGTH, digest_token

pytestmark = pytest.mark.django_db


def test_a_token_authenticates_its_user_and_only_the_digest_is_kept(owner: User) -> None:
    row, clear = api_token_create(user=owner, name="laptop")

    assert clear.startswith("nxp_")
    assert api_token_authenticate(clear) == owner
    row.refresh_from_db()
    assert (row.lookup, row.digest) == (clear[:LOOKUP_LENGTH], digest_token(clear))
    assert not ApiToken.objects.filter(digest=clear).exists()
    assert clear not in {row.name, row.lookup, row.digest}


def test_tokens_of_two_users_do_not_mix(owner: User, other: User) -> None:
    _, mine = api_token_create(user=owner)
    _, theirs = api_token_create(user=other)

    assert api_token_authenticate(mine) == owner
    assert api_token_authenticate(theirs) == other


@pytest.mark.parametrize("raw", ["", "nxp_", "nxp_nope", "x" * 201, "nxp_\x00\x00"])
def test_it_refuses_unknown_or_malformed_tokens(raw: str, owner: User) -> None:
    api_token_create(user=owner)

    assert api_token_authenticate(raw) is None


def test_a_token_with_the_right_lookup_but_wrong_secret_is_refused(owner: User) -> None:
    _, clear = api_token_create(user=owner)

    assert api_token_authenticate(clear[:-1] + ("a" if clear[-1] != "a" else "b")) is None


def test_a_revoked_token_answers_401(owner: User) -> None:
    row, clear = api_token_create(user=owner)
    client = Client(HTTP_AUTHORIZATION=f"Bearer {clear}")
    assert client.get("/api/sessions").status_code == 200

    api_token_revoke(token=row)

    response = client.get("/api/sessions")
    assert response.status_code == 401
    assert response.json() == {"detail": "the API token is unknown or revoked"}
    row.refresh_from_db()
    assert row.revoked_at is not None


def test_a_deactivated_users_token_answers_401(owner: User) -> None:
    _, clear = api_token_create(user=owner)
    User.objects.filter(pk=owner.pk).update(is_active=False)

    assert Client(HTTP_AUTHORIZATION=f"Bearer {clear}").get("/api/sessions").status_code == 401


def test_use_is_recorded_at_most_once_a_minute(owner: User) -> None:
    row, clear = api_token_create(user=owner)
    start = dt.datetime(2026, 3, 2, 10, tzinfo=dt.UTC)

    with time_machine.travel(start, tick=False) as clock:
        api_token_authenticate(clear)
        row.refresh_from_db()
        assert row.last_used_at == start
        clock.shift(dt.timedelta(seconds=30))
        api_token_authenticate(clear)
        row.refresh_from_db()
        assert row.last_used_at == start
        clock.shift(dt.timedelta(seconds=31))
        api_token_authenticate(clear)
        row.refresh_from_db()
        assert row.last_used_at == timezone.now()
