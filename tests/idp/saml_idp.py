"""A SAML 2.0 identity provider for NexCompute's SSO tests, built on pysaml2 (loopback only).

    python tests/idp/saml_idp.py CONFIG.json

CONFIG: ``{"port", "base_url": "http://localhost:PORT", "workdir", "sp_metadata_url",
"users_file"}``. The SP's metadata is fetched from ``sp_metadata_url`` at the first login (the SP
in turn reads this IdP's ``/metadata`` only when a login starts, so either may start first).

The users file, ``{"bob": {"password": "...", "attributes": {"mail": [...],
"eduPersonScopedAffiliation": [...], ...}}}``, is read again at every login, so a test can change
affiliations between logins. Attributes go out under their ``urn:oid`` names (NameFormat uri).

Endpoints: ``/metadata`` (IdP metadata), ``/sso/redirect`` (HTTP-Redirect AuthnRequest; asks for
the password unless the IdP session cookie is valid), ``/login`` (the login form's target; a
wrong password shows the form again), ``/logout`` (ends the IdP session). Responses and
assertions are signed with RSA-SHA256 / SHA-256: pysaml2 defaults to SHA-1, which the SP
refuses. Signing uses Debian's ``xmlsec1``.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import secrets
import shutil
import sys
import threading
import urllib.request
from http.cookies import SimpleCookie
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
from saml2.authn_context import PASSWORD
from saml2.config import IdPConfig
from saml2.metadata import create_metadata_string
from saml2.saml import NAME_FORMAT_URI, NAMEID_FORMAT_PERSISTENT, NameID
from saml2.server import Server
from saml2.xmldsig import DIGEST_SHA256, SIG_RSA_SHA256

COOKIE = "testidp_session"


def make_key_pair(workdir: Path, common_name: str) -> tuple[Path, Path]:
    """A fresh self-signed RSA key and certificate for the IdP's signatures."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = workdir / "idp.key", workdir / "idp.crt"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


class TestIdP:
    def __init__(self, config: dict[str, Any]) -> None:
        self.base = config["base_url"].rstrip("/")
        self.users_file = Path(config["users_file"])
        workdir = Path(config["workdir"])
        workdir.mkdir(parents=True, exist_ok=True)
        key_file, cert_file = make_key_pair(workdir, "nexcompute-test-idp")
        xmlsec = shutil.which("xmlsec1")
        if not xmlsec:
            raise SystemExit("xmlsec1 missing: apt-get install -y xmlsec1 (make install does it)")
        self.sp_metadata_url = config["sp_metadata_url"]
        self.sp_metadata_file = workdir / "sp-metadata.xml"
        self.config: dict[str, Any] = {
            "entityid": f"{self.base}/metadata",
            "service": {
                "idp": {
                    "name": "NexCompute test IdP",
                    "endpoints": {
                        "single_sign_on_service": [
                            (f"{self.base}/sso/redirect", BINDING_HTTP_REDIRECT),
                        ],
                    },
                    "policy": {
                        "default": {
                            "lifetime": {"minutes": 15},
                            "attribute_restrictions": None,
                            "name_form": NAME_FORMAT_URI,
                        },
                    },
                    "name_id_format": [NAMEID_FORMAT_PERSISTENT],
                    "sign_response": True,
                    "sign_assertion": True,
                    "signing_algorithm": SIG_RSA_SHA256,
                    "digest_algorithm": DIGEST_SHA256,
                    "want_authn_requests_signed": False,
                },
            },
            "key_file": str(key_file),
            "cert_file": str(cert_file),
            "xmlsec_binary": xmlsec,
            "allow_unknown_attributes": True,
            "accepted_time_diff": 60,
        }
        idp_config = IdPConfig()
        idp_config.load(dict(self.config))
        self.metadata = create_metadata_string(None, config=idp_config, sign=False).decode()
        self._server: Server | None = None
        self.sessions: dict[str, str] = {}
        self.lock = threading.Lock()

    @property
    def server(self) -> Server:
        """The pysaml2 IdP, built at the first login with the SP metadata fetched then."""
        with self.lock:
            if self._server is None:
                with urllib.request.urlopen(self.sp_metadata_url, timeout=10) as response:
                    self.sp_metadata_file.write_bytes(response.read())
                idp_config = IdPConfig()
                idp_config.load(
                    {**self.config, "metadata": {"local": [str(self.sp_metadata_file)]}}
                )
                self._server = Server(config=idp_config)
            return self._server

    # -- helpers ---------------------------------------------------------------------------

    def users(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.users_file.read_text())
        return data

    @staticmethod
    def respond(
        start_response: Any, body: str, status: str = "200 OK", headers: list | None = None
    ) -> list[bytes]:
        start_response(
            status,
            [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")]
            + (headers or []),
        )
        return [body.encode()]

    def login_form(self, saml_request: str, relay_state: str, error: str = "") -> str:
        esc = html.escape
        alert = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
        return f"""<!DOCTYPE html><html><head><title>Test IdP login (SAML)</title></head><body>
<h1>Test university login (SAML)</h1>{alert}
<form method="post" action="{self.base}/login">
<input type="hidden" name="SAMLRequest" value="{esc(saml_request)}">
<input type="hidden" name="RelayState" value="{esc(relay_state)}">
<label for="username">Username</label><input id="username" name="username" required>
<label for="password">Password</label><input id="password" name="password" type="password" required>
<button type="submit">Sign in</button>
</form></body></html>"""

    def authn_response(self, username: str, saml_request: str, relay_state: str) -> str:
        """The auto-posting form that carries the signed Response to the SP's ACS."""
        req_info = self.server.parse_authn_request(saml_request, BINDING_HTTP_REDIRECT)
        request = req_info.message
        sp_entity_id = request.issuer.text
        _, destination = self.server.pick_binding(
            "assertion_consumer_service",
            bindings=[BINDING_HTTP_POST],
            entity_id=sp_entity_id,
            request=request,
        )
        user = self.users()[username]
        response = self.server.create_authn_response(
            identity=user.get("attributes", {}),
            in_response_to=request.id,
            destination=destination,
            sp_entity_id=sp_entity_id,
            userid=username,
            name_id=NameID(format=NAMEID_FORMAT_PERSISTENT, text=username),
            authn={"class_ref": PASSWORD, "authn_auth": self.base},
            sign_response=True,
            sign_assertion=True,
            sign_alg=SIG_RSA_SHA256,
            digest_alg=DIGEST_SHA256,
        )
        http_args = self.server.apply_binding(
            BINDING_HTTP_POST, str(response), destination, relay_state, response=True
        )
        return str(http_args["data"])

    def session_user(self, environ: dict[str, Any]) -> str | None:
        cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
        token = cookie[COOKIE].value if COOKIE in cookie else ""
        with self.lock:
            return self.sessions.get(token)

    # -- WSGI ------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            params = parse_qs(environ["wsgi.input"].read(size).decode())
        else:
            params = parse_qs(environ.get("QUERY_STRING", ""))
        form = {key: values[0] for key, values in params.items()}
        try:
            if path == "/metadata":
                start_response("200 OK", [("Content-Type", "application/samlmetadata+xml")])
                return [self.metadata.encode()]
            if path == "/sso/redirect":
                saml_request, relay_state = form["SAMLRequest"], form.get("RelayState", "")
                username = self.session_user(environ)
                if username and username in self.users():
                    body = self.authn_response(username, saml_request, relay_state)
                    return self.respond(start_response, body)
                return self.respond(start_response, self.login_form(saml_request, relay_state))
            if path == "/login" and method == "POST":
                username, password = form.get("username", ""), form.get("password", "")
                user = self.users().get(username)
                saml_request, relay_state = form["SAMLRequest"], form.get("RelayState", "")
                if not user or not secrets.compare_digest(str(user.get("password", "")), password):
                    page = self.login_form(
                        saml_request, relay_state, "Invalid username or password."
                    )
                    return self.respond(start_response, page)
                token = secrets.token_urlsafe(24)
                with self.lock:
                    self.sessions[token] = username
                body = self.authn_response(username, saml_request, relay_state)
                cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax"
                return self.respond(start_response, body, headers=[("Set-Cookie", cookie)])
            if path == "/logout":
                cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
                if COOKIE in cookie:
                    with self.lock:
                        self.sessions.pop(cookie[COOKIE].value, None)
                expire = f"{COOKIE}=; Path=/; Max-Age=0"
                return self.respond(
                    start_response, "<p>Signed out.</p>", headers=[("Set-Cookie", expire)]
                )
        except Exception as exc:  # a test IdP: show the error instead of hanging the client
            sys.stderr.write(f"saml idp error on {path}: {exc!r}\n")
            return self.respond(
                start_response, f"error: {html.escape(str(exc))}", "400 Bad Request"
            )
        return self.respond(start_response, "not found", "404 Not Found")


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write("saml idp: " + (format % args) + "\n")


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    app = TestIdP(config)
    httpd = make_server(
        "127.0.0.1",
        int(config["port"]),
        app,
        server_class=ThreadingServer,
        handler_class=QuietHandler,
    )
    print(f"saml test idp listening on {app.base}", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
