"""Opt-in e-mail about a session (ready, ending soon, ended with the receipt).

The integration test runs a real Celery worker process on real Redis and a real SMTP server
(aiosmtpd) in the test: mails are queued by the services after commit, sent by the worker, and
read back from the SMTP server with their recipients, subjects and links. The unit tests call
the task as Celery would (eager) and check the claim that keeps one mail per event.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import email.policy
import re
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from django.core import mail

from accounts.models import User
from nexcompute.celery import app as celery_app
from sessions import notify
from sessions.models import ComputeSession, SessionEvent, SessionMail
from sessions.policy import session_warn_lease_end
from sessions.services import session_mark_running, session_request, session_stop
from sessions.states import EndReason
from sessions.tasks import send_session_mail
from tests.factories import LabFactory, MachineFactory, UserFactory, record_receipt
from tests.procs import ProcessSet, free_port, wait_for

PUBLIC = "https://compute.example.edu"


@dataclasses.dataclass
class Received:
    sender: str
    to: list[str]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def body(self) -> str:
        part = self.message.get_body(("plain",))
        assert part is not None
        return str(part.get_content())


class Inbox:
    """aiosmtpd's handler: every accepted message, as the SMTP server received it."""

    def __init__(self) -> None:
        self.mails: list[Received] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.mails.append(Received(envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def opted_in(username: str, **fields: Any) -> User:
    return UserFactory.create(
        username=username,
        email=f"{username}@example.edu",
        email_notifications=True,
        **fields,
    )


def running(user: User, name: str, lab_tz: str = "UTC") -> ComputeSession:
    lab = LabFactory.create(name=f"Lab {name}", timezone=lab_tz)
    machine = MachineFactory.create(name=name, lab=lab)
    session = session_request(user=user, machine_id=machine.pk, duration_minutes=60)
    assert session_mark_running(session=session, url=f"http://{name}/lab?token=t")
    session.refresh_from_db()
    return session


def links(body: str) -> list[str]:
    return re.findall(r"https?://\S+", body)


# --- through a real worker and a real SMTP server ----------------------------------------------


def result_of(worker: Any, task_id: str) -> str:
    """What the worker logged as the task's result ("Task ...[id] succeeded in 0.01s: False")."""

    def line() -> str:
        found = re.search(rf"\[{re.escape(task_id)}\] succeeded in [\d.]+s: (\w+)", worker.log())
        return found.group(1) if found else ""

    return wait_for(line, what=f"task {task_id}")


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_worker_mails_ready_ending_and_ended_through_smtp_to_opted_in_owners_only(
    procs: ProcessSet,
    live_env: dict[str, str],
    smtp: tuple[Inbox, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inbox, port = smtp
    live_env.update(
        {
            "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(port),
            "NEXCOMPUTE_PUBLIC_URL": PUBLIC,
            "DEFAULT_FROM_EMAIL": "NexCompute <noreply@example.edu>",
        }
    )
    live_env["LOG_LEVEL"] = "DEBUG"  # "succeeded in ...: <result>" is a DEBUG line
    worker = procs.celery_worker("worker")
    # This process queues too (after each commit): onto the worker's private queue.
    monkeypatch.setitem(celery_app.conf, "task_default_queue", live_env["NEXCOMPUTE_CELERY_QUEUE"])

    alice = opted_in("alice", time_zone="Asia/Tokyo")
    bob = UserFactory.create(username="bob", email="bob@example.edu")  # did not opt in
    mine = running(alice, "pc-alice", lab_tz="Europe/Zurich")
    theirs = running(bob, "pc-bob")

    ready = wait_for(lambda: inbox.mails[:1], what="the ready mail")[0]
    assert ready.to == ["alice@example.edu"]
    assert ready.sender == "noreply@example.edu"
    assert ready.subject == "[NexCompute] Your session on pc-alice is ready"
    assert f"{PUBLIC}/sessions/{mine.pk}/open/" in links(ready.body)
    assert f"{PUBLIC}/" in links(ready.body)
    # In the owner's own zone (the profile's), named.
    tokyo = mine.expires_at.astimezone(dt.timezone(dt.timedelta(hours=9)))
    assert f"runs until {tokyo:%H:%M} JST" in ready.body

    # Ten minutes before the end: a warning on the timeline, and a mail for it.
    for session in (mine, theirs):
        assert session_warn_lease_end(
            session_id=session.pk, now=session.expires_at - dt.timedelta(minutes=10)
        )
    # The same point again records nothing, so nothing more is queued.
    assert not session_warn_lease_end(
        session_id=mine.pk, now=mine.expires_at - dt.timedelta(minutes=9)
    )
    ending = wait_for(lambda: inbox.mails[1:2], what="the ending-soon mail")[0]
    assert ending.to == ["alice@example.edu"]
    assert ending.subject == "[NexCompute] Your session on pc-alice ends soon"
    assert "Your session ends in 10 min" in ending.body
    assert "CET" in ending.body  # the warning names the lab's zone
    assert f"{PUBLIC}/" in links(ending.body)

    # Ended, with the receipt.
    for session in (theirs, mine):
        session_stop(session=session, reason=EndReason.USER, actor=session.owner)
        record_receipt(session, files_removed=1, processes_killed=1)
    ended = wait_for(lambda: inbox.mails[2:3], what="the ended mail")[0]
    assert ended.to == ["alice@example.edu"]
    assert ended.subject == "[NexCompute] Your session on pc-alice has ended"
    assert "You ended the session." in ended.body
    assert "Wipe verified: 1 file removed, 1 process killed." in ended.body
    assert f"{PUBLIC}/history/" in links(ended.body)
    assert f"{PUBLIC}/accounts/profile/" in links(ended.body)

    # Bob's session went through the same events: they happened, and no mail went out.
    assert SessionEvent.objects.filter(session=theirs, kind="warning").count() == 1
    assert theirs.events.filter(to_state="ended").exists()
    assert not SessionMail.objects.filter(session=theirs).exists()

    # A duplicated (or redelivered) task sends nothing: the claim is taken.
    again = send_session_mail.delay(mine.pk, notify.ENDED, "ended")
    assert result_of(worker, again.id) == "False"
    # A task for Bob (who never opted in) sends nothing either: the task checks again.
    forced = send_session_mail.delay(theirs.pk, notify.ENDED, "ended")
    assert result_of(worker, forced.id) == "False"
    assert [m.to for m in inbox.mails] == [["alice@example.edu"]] * 3
    assert sorted(SessionMail.objects.filter(session=mine).values_list("key", flat=True)) == [
        "ended",
        "expiry:10:" + str(int(mine.expires_at.timestamp())),
        "ready",
    ]


# --- the task as Celery calls it ---------------------------------------------------------------


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    """Tasks run inline when queued (after commit), mail goes to Django's outbox."""
    monkeypatch.setitem(celery_app.conf, "task_always_eager", True)
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.NEXCOMPUTE_PUBLIC_URL = PUBLIC


@pytest.mark.django_db(transaction=True)
def test_one_mail_per_event_and_none_without_opt_in(eager: None) -> None:
    alice = opted_in("alice")
    bob = UserFactory.create(username="bob", email="bob@example.edu")
    no_address = UserFactory.create(username="carol", email_notifications=True)
    mine = running(alice, "pc-1")
    running(bob, "pc-2")
    running(no_address, "pc-3")
    assert [m.to for m in mail.outbox] == [["alice@example.edu"]]
    assert mail.outbox[0].subject == "[NexCompute] Your session on pc-1 is ready"

    # Called again (a redelivery): no second mail.
    assert notify.session_mail_send(session_id=mine.pk, kind=notify.READY, key="ready") is False
    send_session_mail.delay(mine.pk, notify.READY, "ready")
    assert len(mail.outbox) == 1
    assert SessionMail.objects.filter(session=mine, key="ready").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_withdrawn_opt_in_stops_mail_already_queued(eager: None) -> None:
    alice = opted_in("alice")
    mine = running(alice, "pc-1")
    assert len(mail.outbox) == 1
    User.objects.filter(pk=alice.pk).update(email_notifications=False)
    assert notify.session_mail_send(session_id=mine.pk, kind=notify.ENDED, key="ended") is False
    session_stop(session=mine, reason=EndReason.USER)
    record_receipt(mine)
    assert len(mail.outbox) == 1


@pytest.mark.django_db(transaction=True)
def test_a_failed_send_leaves_no_claim_and_the_retry_sends(eager: None, settings: Any) -> None:
    alice = UserFactory.create(username="alice", email="alice@example.edu")
    mine = running(alice, "pc-1")
    assert mail.outbox == []  # not opted in yet
    User.objects.filter(pk=alice.pk).update(email_notifications=True)
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()  # nobody listens
    with pytest.raises((OSError, smtplib.SMTPException)):
        notify.session_mail_send(session_id=mine.pk, kind=notify.READY, key="ready")
    assert not SessionMail.objects.filter(session=mine).exists()
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert notify.session_mail_send(session_id=mine.pk, kind=notify.READY, key="ready")
    assert [m.to for m in mail.outbox] == [["alice@example.edu"]]


@pytest.mark.django_db(transaction=True)
def test_the_ended_mail_says_when_the_receipt_is_missing_or_bad(eager: None) -> None:
    alice = opted_in("alice")
    lost = running(alice, "pc-1")
    from sessions.occupancy import session_agent_lost

    lost.refresh_from_db()
    assert session_agent_lost(session=lost)
    body = mail.outbox[-1].body
    assert mail.outbox[-1].subject == "[NexCompute] Your session on pc-1 has ended"
    assert "The lab computer went offline." in body
    assert "has not confirmed the wipe yet" in body

    bad = running(alice, "pc-2")
    session_stop(session=bad, reason=EndReason.USER)
    record_receipt(bad, verified=False, files_removed=3, processes_killed=0)
    body = mail.outbox[-1].body
    assert "Wipe NOT verified (3 files removed, 0 processes killed)" in body
