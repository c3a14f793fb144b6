"""One-time codes: how a browser that the Nexus vouched for gets into one session's Jupyter.

The Nexus (which has checked that the signed-in user owns the running session) mints a code;
the browser carries it to Jupyter's ``/login`` in a POST body (never in a URL); Jupyter checks
it and answers with its own login cookie. The model is JupyterHub's OAuth handshake with its
single-user servers, without the callback: a code is checked where it lands, so Jupyter needs
no credential for the Nexus at all.

A code is ``<payload>.<mac>``, both base64url without padding:

- payload: compact JSON ``{"sid": <session id>, "exp": <unix seconds>, "n": <nonce>}``;
- mac: HMAC-SHA256 of the payload's base64url text under the *door key*,
  ``HMAC-SHA256(key=<the session's Jupyter token>, msg="nexcompute-door-v1")``.

Only the Nexus and the session's own Jupyter know the session's Jupyter token, so only they
can mint a code for that session; a code names its session and is refused by any other. The
single use is enforced where codes are redeemed (:class:`Redeemer`), for as long as a code is
valid. Stdlib only: the Nexus imports this module too (one definition of the format).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import threading
import time

DOOR_LABEL = b"nexcompute-door-v1"
CODE_SECONDS = 30  # how long a code is valid: a redirect, with room for a slow page load
MAX_CODE_SECONDS = 300  # a code claiming to live longer is refused whoever minted it
CLOCK_LEEWAY = 10  # the Nexus's and the lab computer's clocks may differ this much
MAX_CODE_LENGTH = 512


class DoorError(Exception):
    """A code that does not open this door; the text says why (shown to the browser)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def door_key(token: str) -> bytes:
    """The key codes of one session are signed with, derived from its Jupyter token (the token
    itself never signs anything, so a code reveals nothing about it)."""
    return hmac.new(token.encode("utf-8"), DOOR_LABEL, hashlib.sha256).digest()


def mint_code(
    *, token: str, session_id: int, ttl: int = CODE_SECONDS, now: float | None = None
) -> str:
    """A fresh one-time code for session ``session_id`` whose Jupyter token is ``token``."""
    issued = time.time() if now is None else now
    payload = {"sid": session_id, "exp": int(issued) + ttl, "n": secrets.token_urlsafe(16)}
    body = _b64(json.dumps(payload, separators=(",", ":")).encode("ascii"))
    mac = hmac.new(door_key(token), body.encode("ascii"), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def check_code(
    code: str, *, token: str, session_id: int, now: float | None = None
) -> tuple[str, int]:
    """Check a code's form, signature, session and expiry (not its single use). Returns
    ``(nonce, exp)``; raises :class:`DoorError`."""
    if not code or len(code) > MAX_CODE_LENGTH or code.count(".") != 1:
        raise DoorError("not a NexCompute sign-in code")
    body, mac_text = code.split(".")
    try:
        mac = _unb64(mac_text)
        payload = json.loads(_unb64(body))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise DoorError("not a NexCompute sign-in code") from None
    want = hmac.new(door_key(token), body.encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, want):
        raise DoorError("this sign-in code was not issued for this session")
    if not isinstance(payload, dict):
        raise DoorError("not a NexCompute sign-in code")
    sid, exp, nonce = payload.get("sid"), payload.get("exp"), payload.get("n")
    if type(sid) is not int or type(exp) is not int or not isinstance(nonce, str) or not nonce:
        raise DoorError("not a NexCompute sign-in code")
    if sid != session_id:
        raise DoorError("this sign-in code was issued for another session")
    t = time.time() if now is None else now
    if exp < t - CLOCK_LEEWAY:
        raise DoorError("this sign-in code has expired; open Jupyter Lab from the dashboard again")
    if exp > t + MAX_CODE_SECONDS + CLOCK_LEEWAY:
        raise DoorError("this sign-in code claims too long a life")
    return nonce, exp


class Redeemer:
    """Redeems codes at most once each: remembers the nonces of redeemed codes until they
    expire (an expired code is refused anyway, so the memory stays small)."""

    def __init__(self, *, token: str, session_id: int) -> None:
        self._token = token
        self._session_id = session_id
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    def redeem(self, code: str, *, now: float | None = None) -> None:
        """Accept ``code`` once; raises :class:`DoorError` for a bad or replayed code."""
        t = time.time() if now is None else now
        nonce, exp = check_code(code, token=self._token, session_id=self._session_id, now=t)
        with self._lock:
            for old in [n for n, e in self._used.items() if e < t - CLOCK_LEEWAY]:
                del self._used[old]
            if nonce in self._used:
                raise DoorError("this sign-in code was used already")
            self._used[nonce] = exp
