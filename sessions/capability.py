"""The session-scoped capability (docs/jupyter-extension.md): what the session's own Jupyter
shows the Nexus to read and extend that one session's lease, and nothing else.

A capability is ``nxcap_<session id>_<secret>``. The secret is derived, not stored:
``HMAC-SHA256(SECRET_KEY, "nexcompute-session-capability-v1:<id>:<jupyter token>")``, so a
start frame sent again (the agent lost the first) carries the same value, and it is as random
as the session's Jupyter token (32 random bytes, erased when the session ends). The Nexus keeps
only its SHA-256 (``ComputeSession.capability_hash``, set when the start is sent, erased on
every transition to an end state) and compares digests in constant time. A capability is
accepted only while its session is live and its hash is on record.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from django.conf import settings

from sessions.models import ComputeSession
from sessions.states import LIVE

PREFIX = "nxcap_"
_LABEL = "nexcompute-session-capability-v1"
_FORM = re.compile(r"^nxcap_([1-9][0-9]{0,18})_[A-Za-z0-9_-]{43}$")


def capability_for(session: ComputeSession) -> str:
    """The capability of ``session`` (which must still have its Jupyter token)."""
    if not session.jupyter_token:
        raise ValueError(f"session {session.pk} has no Jupyter token: it has no capability")
    msg = f"{_LABEL}:{session.pk}:{session.jupyter_token}".encode()
    mac = hmac.new(settings.SECRET_KEY.encode(), msg, hashlib.sha256).digest()
    secret = base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")
    return f"{PREFIX}{session.pk}_{secret}"


def capability_hash(capability: str) -> str:
    return hashlib.sha256(capability.encode()).hexdigest()


def capability_session(capability: str) -> ComputeSession | None:
    """The live session ``capability`` belongs to, or None (malformed, unknown, revoked, or
    its session is over). The lookup is by the id in the value; the proof is the digest."""
    match = _FORM.match(capability or "")
    if match is None:
        return None
    session = (
        ComputeSession.objects.select_related("machine", "owner")
        .filter(pk=int(match.group(1)), state__in=LIVE)
        .exclude(capability_hash="")
        .first()
    )
    if session is None:
        return None
    if not hmac.compare_digest(session.capability_hash, capability_hash(capability)):
        return None
    return session
