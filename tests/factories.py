from __future__ import annotations

import datetime as dt
from typing import Any

import factory
from django.test import Client
from django.utils import timezone

from accounts.models import QuotaPolicy, User
from accounts.services import default_policy
from machines.models import Lab, Machine, MachineStatus
from sessions.models import ComputeSession, SessionEvent
from sessions.states import SessionState


class UserFactory(factory.django.DjangoModelFactory[User]):
    class Meta:
        model = User
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("pw-12345")


class LabFactory(factory.django.DjangoModelFactory[Lab]):
    class Meta:
        model = Lab
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"Lab {n}")


class MachineFactory(factory.django.DjangoModelFactory[Machine]):
    class Meta:
        model = Machine

    name = factory.Sequence(lambda n: f"pc{n:03d}")
    hostname = factory.LazyAttribute(lambda o: o.name)
    lab = factory.SubFactory(LabFactory)
    status = MachineStatus.AVAILABLE
    memory_bytes = 16 * 1024**3
    specs = factory.LazyAttribute(
        lambda o: {
            "cpu_model": "Test CPU",
            "cpu_count": 8,
            "memory_bytes": o.memory_bytes,
            "disk_bytes": 500 * 1024**3,
            "os": "Linux",
            "gpus": [{"name": "Test GPU", "memory_bytes": 8 * 1024**3}] * o.gpu_count,
        }
    )
    gpu_count = 0
    last_seen = factory.LazyFunction(timezone.now)


class SessionFactory(factory.django.DjangoModelFactory[ComputeSession]):
    class Meta:
        model = ComputeSession
        skip_postgeneration_save = True

    owner = factory.SubFactory(UserFactory)
    machine = factory.SubFactory(MachineFactory, status=MachineStatus.RESERVED)
    duration_minutes = 60
    expires_at = factory.LazyFunction(lambda: timezone.now() + dt.timedelta(hours=1))

    @factory.post_generation
    def timeline(obj: ComputeSession, create: bool, extracted: object, **kwargs: object) -> None:
        """A session that ran gets the state rows the weekly quota counts: entering
        ``running`` at ``started_at`` and, if it ended, leaving it at ``ended_at``."""
        if not create or obj.started_at is None:
            return
        rows = [(SessionState.STARTING, SessionState.RUNNING, obj.started_at)]
        if obj.ended_at is not None:
            rows.append((SessionState.RUNNING, SessionState.STOPPING, obj.ended_at))
        for old, new, at in rows:
            event = SessionEvent.objects.create(
                session=obj, kind=SessionEvent.Kind.STATE, from_state=old, to_state=new
            )
            SessionEvent.objects.filter(pk=event.pk).update(at=at)  # `at` is auto_now_add


def default_policy_with(**fields: Any) -> QuotaPolicy:
    """The default quota policy (users in no policy group get it), with ``fields`` changed."""
    quota = default_policy()
    for name, value in fields.items():
        setattr(quota, name, value)
    quota.save()
    return quota


# What an agent's hello reports about its machine (tests and fake agents speak the protocol).
AGENT_SPECS = {
    "cpu_model": "Test CPU",
    "cpu_count": 4,
    "memory_bytes": 8 * 1024**3,
    "disk_bytes": 100 * 1024**3,
    "os": "Linux",
    "gpus": [],
}


def record_receipt(
    session: ComputeSession,
    *,
    verified: bool = True,
    files_removed: int = 0,
    bytes_removed: int = 0,
    processes_killed: int = 0,
    details: tuple[str, ...] = (),
    duration_seconds: float = 1.5,
) -> None:
    """The agent's wipe receipt for ``session``, through the service the agent consumer calls."""
    from sessions.services import session_record_receipt

    session_record_receipt(
        session=session,
        verified=verified,
        files_removed=files_removed,
        bytes_removed=bytes_removed,
        processes_killed=processes_killed,
        details=list(details),
        duration_seconds=duration_seconds,
    )


def bearer_client(user: User) -> Client:
    """A test client that authenticates as ``user`` with a fresh personal API token."""
    from accounts.services import api_token_create

    _, token = api_token_create(user=user)
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")
