"""Shared fixtures: three users (owner, another student, staff) and machine factories."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from channels.layers import channel_layers
from django.test import Client

from accounts.models import User
from machines.models import Machine
from tests.factories import MachineFactory, UserFactory, bearer_client

# The real-process fixtures, defined once for every test directory.
pytest_plugins = ["tests.live"]


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's test database, and at the end of the run the connections that executor
    threads of this process still hold on it closed (asgiref/channels run ORM code in worker
    threads, each with its own connection), so that the test database can be dropped."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Any) -> None:
    # PBKDF2 costs ~0.25 s per user; tests that create hundreds of users cannot afford it.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _no_warm_pools(settings: Any) -> None:
    # Warm sandboxes (sessions/warm.py) are off unless a test turns them on: an agent link
    # then sends no warm.set, and agents keep no second Jupyter beside a test's session.
    settings.NEXCOMPUTE_WARM_POOLS = False


@pytest.fixture
def owner(db: Any) -> User:
    return UserFactory.create(username="owner")


@pytest.fixture
def other(db: Any) -> User:
    return UserFactory.create(username="other")


@pytest.fixture
def staff(db: Any) -> User:
    return UserFactory.create(username="staffer", is_staff=True, is_superuser=True)


@pytest.fixture
def machine(db: Any) -> Machine:
    return MachineFactory.create()


@pytest.fixture
def owner_client(owner: User) -> Client:
    return bearer_client(owner)


@pytest.fixture
def other_client(other: User) -> Client:
    return bearer_client(other)


@pytest.fixture
def in_memory_layer(settings: Any) -> Iterator[None]:
    """An in-process channel layer: after-commit pushes must not reach the shared Redis."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()
