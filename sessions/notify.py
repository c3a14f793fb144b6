"""E-mail to a session's owner: ready, ending soon, ended (with the wipe receipt). Opt-in.

The services queue a mail with :func:`mail_on_commit` where the change happens (``transition``
for ready and ended, ``policy.event_once`` for each warning), only after the transaction
commits, and only for owners who opted in on their profile page. The Celery task
(``sessions.tasks.send_session_mail``) takes ids and calls :func:`session_mail_send`, which
claims the mail by inserting a ``SessionMail`` row keyed ``(session, key)`` in the same
transaction as the send: a redelivered or duplicated task finds the row and sends nothing; a
failed send rolls the claim back and the retry may send it. (An SMTP server that accepted the
mail just before the worker died, before the commit, is the one way to get it twice.)

Links are absolute, from ``NEXCOMPUTE_PUBLIC_URL`` (the address students use, behind the TLS
proxy if there is one).
"""

from __future__ import annotations

import logging
import zoneinfo

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction

from accounts.models import User
from nexcompute import words
from sessions.models import ComputeSession, SessionEvent, SessionMail
from sessions.states import END_REASON_SENTENCES, EndReason, SessionState

log = logging.getLogger(__name__)

READY = "ready"
ENDING = "ending"
ENDED = "ended"
KINDS = (READY, ENDING, ENDED)


def opted_in(user: User) -> bool:
    """The one rule: mail goes only to an active owner who asked for it and has an address."""
    return bool(user.email_notifications and user.is_active and user.email)


def wants_mail(user_id: int) -> bool:
    user = User.objects.filter(pk=user_id).only("email_notifications", "is_active", "email")
    return any(opted_in(u) for u in user)


def mail_on_commit(session: ComputeSession, *, kind: str, key: str) -> None:
    """Queue the ``kind`` mail of ``session`` (once per ``key``) after the commit, if its owner
    asked for mail. The task checks the opt-in again: it may be withdrawn meanwhile."""
    if not wants_mail(session.owner_id):
        return
    session_id = session.pk

    def queue() -> None:
        from sessions.tasks import send_session_mail

        try:
            send_session_mail.delay(session_id, kind, key)
        except Exception:  # the broker is away: the dashboard still shows it all
            log.exception("could not queue the %s mail of session %s", kind, session_id)

    transaction.on_commit(queue)


def _link(path: str) -> str:
    return f"{settings.NEXCOMPUTE_PUBLIC_URL}{path}"


def _tz(session: ComputeSession) -> zoneinfo.ZoneInfo:
    """The owner's own zone (profile), else the lab's."""
    return words.zone(session.owner.time_zone, session.machine.lab.tz)


def _receipt(session: ComputeSession) -> str:
    if session.cleanup_finished_at is None:
        return (
            "The machine has not confirmed the wipe yet; your history shows the receipt once it "
            "does."
        )
    facts = (
        f"{words.plural(session.files_removed or 0, 'file')} removed, "
        f"{words.plural(session.processes_killed or 0, 'process', 'processes')} killed"
    )
    if session.cleanup_verified:
        return f"Wipe verified: {facts}. Nothing of yours is left on the machine."
    return f"Wipe NOT verified ({facts}): staff are checking the machine."


def compose(session: ComputeSession, *, kind: str, key: str) -> tuple[str, str] | None:
    """(subject, body) of the mail, or None when it no longer applies (a warning for a session
    that has ended meanwhile)."""
    machine = session.machine.name
    tz = _tz(session)
    footer = (
        "\n\n--\nYou get these mails because you turned them on. Turn them off on your "
        f"profile: {_link('/accounts/profile/')}\n"
    )
    if kind == READY:
        if session.state != SessionState.RUNNING:
            return None
        return (
            f"[NexCompute] Your session on {machine} is ready",
            f"Jupyter Lab is ready on {machine} ({session.machine.lab.name}).\n\n"
            f"Open Jupyter Lab: {_link(f'/sessions/{session.pk}/open/')}\n"
            f"Your dashboard: {_link('/')}\n\n"
            f"The session runs until {words.clock(session.expires_at, tz)}." + footer,
        )
    if kind == ENDING:
        if session.state != SessionState.RUNNING:
            return None
        warning = SessionEvent.objects.filter(session=session, key=key).first()
        if warning is None:
            return None
        return (
            f"[NexCompute] Your session on {machine} ends soon",
            # The warning says when and why (lease, lab closing, idle, owner back); the lease's
            # end would contradict the ones that stop the session earlier.
            f"{warning.message}\n\n"
            f"Extend it, or save your work and download what you want to keep: {_link('/')}"
            + footer,
        )
    if kind == ENDED:
        if session.state not in (SessionState.ENDED, SessionState.FAILED):
            return None
        reason = (
            END_REASON_SENTENCES[EndReason(session.end_reason)]
            if session.end_reason
            else "Session ended."
        )
        ran = (
            f"It ran for {words.duration((session.ended_at - session.started_at).total_seconds())}"
            f", until {words.clock(session.ended_at, tz, date=True)}.\n"
            if session.started_at and session.ended_at
            else ""
        )
        subject = (
            f"[NexCompute] Your session on {machine} could not start"
            if session.state == SessionState.FAILED
            else f"[NexCompute] Your session on {machine} has ended"
        )
        return (
            subject,
            f"{reason}\n{ran}\n{_receipt(session)}\n\n"
            f"Timeline and receipt: {_link('/history/')}" + footer,
        )
    raise ValueError(f"unknown mail kind {kind!r}")


def session_mail_send(*, session_id: int, kind: str, key: str) -> bool:
    """Send the ``kind`` mail of the session once per ``key``. True if sent now; False if it
    was sent before, the owner does not want mail, or it no longer applies. A failed send
    raises (the task retries) and leaves no claim behind."""
    session = (
        ComputeSession.objects.select_related("owner", "machine__lab").filter(pk=session_id).first()
    )
    if session is None:
        return False
    owner = session.owner
    if not opted_in(owner):
        return False
    message = compose(session, kind=kind, key=key)
    if message is None:
        return False
    subject, body = message
    with transaction.atomic():
        try:
            with transaction.atomic():
                # The claim: a second task for this key blocks on the unique index until this
                # one commits, then fails here and sends nothing.
                SessionMail.objects.create(session=session, key=key, to=owner.email)
        except IntegrityError:
            return False
        # Inside the transaction: if the SMTP server refuses, the claim rolls back with it.
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [owner.email])
    log.info("mailed %s of session %s", key, session_id, extra={"session_id": session_id})
    return True
