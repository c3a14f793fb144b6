"""Secret tokens: random, shown once, stored as a lookup prefix plus a SHA-256 digest.

Every token begins with a short tag (``nxm_`` machine credential, ``nxe_`` enrollment token,
``nxp_`` personal API token) so a leaked one is recognisable and it never begins with ``-``
(argparse would read it as an option). The first ``LOOKUP_LENGTH`` characters are stored in
clear to find the row; the digest is compared in constant time. Tokens carry 256 random bits,
so an unsalted hash is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

LOOKUP_LENGTH = 16


@dataclass(frozen=True)
class NewToken:
    token: str
    lookup: str
    digest: str


def digest_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token(tag: str) -> NewToken:
    token = f"{tag}_{secrets.token_urlsafe(32)}"
    return NewToken(token=token, lookup=token[:LOOKUP_LENGTH], digest=digest_token(token))


def lookup_of(token: str) -> str:
    return token[:LOOKUP_LENGTH]


def token_matches(token: str, digest: str) -> bool:
    return hmac.compare_digest(digest_token(token), digest)
