"""A stand-in for Cloudflare Access, since Cloudflare cannot be reached from here: its API for
Access applications and policies, the team's JWKS, and a signer for application tokens.

Formats as Cloudflare documents them (cited in docs/security.md):

- API v4 envelope ``{"success", "errors": [{code, message}], "messages", "result"}``;
  ``Authorization: Bearer <API token>``; ``POST /client/v4/accounts/{account_id}/access/apps``
  (``name``, ``domain``, ``type: "self_hosted"``, ``session_duration``) answers the application
  with its ``id`` and ``aud`` (the AUD tag); ``POST …/access/apps/{app_id}/policies``
  (``name``, ``decision``, ``include``/``exclude``/``require`` rules, ``precedence``).
- ``GET /cdn-cgi/access/certs`` → ``{"keys": [JWK…], "public_cert": {kid, cert},
  "public_certs": [{kid, cert}…]}``: the current and the previous key.
- Application tokens (``Cf-Access-Jwt-Assertion``): RS256, header ``kid``; claims ``aud`` (a
  list), ``email``, ``exp``, ``iat``, ``nbf``, ``iss`` (``https://<team>.cloudflareaccess.com``;
  here the stand-in's own origin), ``type: "app"``, ``identity_nonce``, ``sub``, ``country``.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import secrets
import threading
import time
import uuid
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


class SigningKey:
    def __init__(self) -> None:
        self.kid = secrets.token_hex(32)
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, Any]:
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        return {"kid": self.kid, "alg": "RS256", "use": "sig", **data}

    def cert_pem(self) -> str:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cloudflareaccess stand-in")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=42))
            .sign(self.private, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()


class CloudflareAccessStandIn:
    """Serves the API and the JWKS on 127.0.0.1 (a thread); ``issuer`` is the team origin."""

    def __init__(
        self, *, api_token: str = "cf-api-token-for-tests", account_id: str = "acc0"
    ) -> None:
        self.api_token = api_token
        self.account_id = account_id
        self.current = SigningKey()
        self.previous = SigningKey()
        self.apps: dict[str, dict[str, Any]] = {}
        self.policies: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str, dict[str, Any] | None]] = []
        self.certs_fetches = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/cdn-cgi/access/certs":
                    outer.certs_fetches += 1
                    self._send(200, outer.certs())
                else:
                    self._send(404, _envelope(None, errors=[(7003, "Could not route")]))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except ValueError:
                    body = None
                outer.requests.append(("POST", self.path, body))
                if self.headers.get("Authorization") != f"Bearer {outer.api_token}":
                    self._send(403, _envelope(None, errors=[(10000, "Authentication error")]))
                    return
                code, answer = outer.post(self.path, body)
                self._send(code, answer)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.issuer}/client/v4"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def certs(self) -> dict[str, Any]:
        keys = [self.current, self.previous]
        return {
            "keys": [k.jwk() for k in keys],
            "public_cert": {"kid": self.current.kid, "cert": self.current.cert_pem()},
            "public_certs": [{"kid": k.kid, "cert": k.cert_pem()} for k in keys],
        }

    def post(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        prefix = f"/client/v4/accounts/{self.account_id}/access/apps"
        if not isinstance(body, dict):
            return 400, _envelope(None, errors=[(9207, "Request body is invalid JSON")])
        if path == prefix:
            if body.get("type") != "self_hosted" or not body.get("domain") or not body.get("name"):
                return 400, _envelope(None, errors=[(12130, "access.api.error.invalid_request")])
            app = {
                "id": str(uuid.uuid4()),
                "aud": secrets.token_hex(32),
                "name": body["name"],
                "domain": body["domain"],
                "type": "self_hosted",
                "session_duration": body.get("session_duration", "24h"),
                "created_at": _now(),
                "updated_at": _now(),
            }
            self.apps[app["id"]] = app
            return 201, _envelope(app)
        if path.startswith(prefix + "/") and path.endswith("/policies"):
            app_id = path[len(prefix) + 1 : -len("/policies")]
            if app_id not in self.apps:
                return 404, _envelope(None, errors=[(12130, "access.api.error.not_found")])
            if body.get("decision") not in ("allow", "deny", "non_identity", "bypass") or not (
                isinstance(body.get("include"), list) and body["include"]
            ):
                return 400, _envelope(None, errors=[(12130, "access.api.error.invalid_request")])
            policy = {"id": str(uuid.uuid4()), **body, "created_at": _now()}
            self.policies.setdefault(app_id, []).append(policy)
            return 201, _envelope(policy)
        return 404, _envelope(None, errors=[(7003, "Could not route")])

    def sign(
        self,
        *,
        aud: str,
        email: str,
        lifetime: float = 300.0,
        issued: float | None = None,
        key: SigningKey | None = None,
        kid: str | None = None,
        iss: str | None = None,
    ) -> str:
        """An application token as Access sends it to the origin."""
        now = time.time() if issued is None else issued
        signer = key or self.current
        claims = {
            "aud": [aud],
            "email": email,
            "exp": int(now + lifetime),
            "iat": int(now),
            "nbf": int(now),
            "iss": iss or self.issuer,
            "type": "app",
            "identity_nonce": secrets.token_urlsafe(12),
            "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, email)),
            "country": "GB",
        }
        return jwt.encode(
            claims, signer.private, algorithm="RS256", headers={"kid": kid or signer.kid}
        )


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _envelope(result: Any, errors: list[tuple[int, str]] | None = None) -> dict[str, Any]:
    return {
        "success": not errors,
        "errors": [{"code": c, "message": m} for c, m in errors or []],
        "messages": [],
        "result": result,
    }
