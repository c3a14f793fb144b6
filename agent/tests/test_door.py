"""The session's door with the real `jupyter lab` (nexcompute-jupyter identity provider in the
session environment), driven by the agent as root with a sandboxed session account:

- a direct tunnel off loopback serves HTTPS only (Jupyter's own certfile/keyfile), or the agent
  refuses to run with the reason;
- with Cloudflare Access on (a named tunnel, through the cloudflared stand-in), the session's
  Jupyter refuses every browser request without a valid ``Cf-Access-Jwt-Assertion`` for the
  owner: checked against the stand-in's JWKS.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import ipaddress
import ssl
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Sent, needs_root, session_config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nexcompute_jupyter import door
from tests.standins.cloudflare_access import CloudflareAccessStandIn, SigningKey

from nexcompute_agent.config import ConfigError, config_from_dict
from nexcompute_agent.protocol import SessionAccess, SessionStart, SessionStop
from nexcompute_agent.sessions import SessionManager
from nexcompute_agent.sessions.http import free_port

TOKEN = "door-" + uuid.uuid4().hex
STANDIN = Path(__file__).resolve().parents[2] / "tests" / "standins" / "cloudflared"


def test_the_agent_refuses_plain_http_off_loopback() -> None:
    base = {"server": "http://127.0.0.1:1", "credential": "c"}
    with pytest.raises(ConfigError, match=r"not a loopback address.*HTTPS only.*tls_cert"):
        config_from_dict({**base, "tunnel": {"kind": "direct", "public_host": "10.1.2.3"}})
    with pytest.raises(ConfigError, match="go together"):
        config_from_dict({**base, "tunnel": {"public_host": "10.1.2.3", "tls_cert": "/c.pem"}})
    for host in ("127.0.0.1", "localhost", "::1", "127.0.1.1"):
        config_from_dict({**base, "tunnel": {"kind": "direct", "public_host": host}})
    config_from_dict({**base, "tunnel": {"public_host": "10.1.2.3", "tls_cert": "/c.pem",
                                         "tls_key": "/k.pem"}})  # fmt: skip


def host_address() -> str:
    """An IPv4 address of this host that is not loopback (the campus network's, here)."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not ipaddress.ip_address(a.address).is_loopback:
                return str(a.address)
    raise AssertionError("this host has no non-loopback IPv4 address")


def self_signed(tmp_path: Path, ip: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


async def _ready(sent: Sent) -> Any:
    while True:
        for m in sent.messages:
            if m.type in ("session.ready", "session.failed"):
                return m
        await asyncio.sleep(0.1)


def request(
    base: str,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: str | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], str]:
    parts = urllib.parse.urlsplit(base)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, context=context,
                                           timeout=20)  # fmt: skip
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


@needs_root
@pytest.mark.timeout(300)
async def test_a_direct_tunnel_off_loopback_serves_https_only(
    tmp_path: Path, workspace_root: Path, session_user: str, session_env: Path
) -> None:
    ip = host_address()
    cert, key = self_signed(tmp_path, ip)
    config = session_config(
        tmp_path, workspace_root, session_user,
        jupyter_command=[str(session_env / "bin" / "jupyter"), "lab"],
        jupyter_start_timeout=90, session_stop_grace=3,
        session_max_processes=256, activity_seconds=0.3,
        tunnel={"kind": "direct", "public_host": ip, "tls_cert": str(cert), "tls_key": str(key)},
    )  # fmt: skip
    sent = Sent()
    mgr = SessionManager(config, sent)
    mgr.start(SessionStart(msgid="t1", session_id=51, token=TOKEN, duration_seconds=600))
    ready = await asyncio.wait_for(_ready(sent), 120)
    assert ready.type == "session.ready", ready
    base = ready.url.split("/lab?")[0]
    assert base.startswith(f"https://{ip}:"), ready.url
    # The agent's own activity polls work over TLS.
    first = await sent.wait("session.activity", timeout=15)
    assert first.session_id == 51

    trusted = ssl.create_default_context(cafile=str(cert))
    status, _, _ = await asyncio.to_thread(
        request, base, "GET", "/api/status", headers={"Authorization": f"token {TOKEN}"},
        context=trusted,
    )  # fmt: skip
    assert status == 200
    # The door over TLS: the cookie it sets is Secure.
    form = urllib.parse.urlencode(
        {"code": door.mint_code(token=TOKEN, session_id=51), "next": "/lab"}
    )
    status, headers, _ = await asyncio.to_thread(
        request, base, "POST", "/login", body=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"}, context=trusted,
    )  # fmt: skip
    assert status == 302 and headers["Location"] == "/lab"
    assert "secure" in headers["Set-Cookie"].lower()
    # Plain HTTP on the same port: no answer in the clear.
    plain = "http://" + base.removeprefix("https://")
    with pytest.raises((http.client.HTTPException, OSError)):
        status, _, body = await asyncio.to_thread(request, plain, "GET", "/api/status")
        assert status == 400 and "Authorization" not in body  # tornado's "plain HTTP to TLS"
        raise OSError(f"plain HTTP answered {status}")
    # The key the session serves with is the session account's copy, 0600, in its workspace.
    copy = workspace_root / "51" / ".jupyter" / "tls" / "key.pem"
    assert copy.stat().st_mode & 0o777 == 0o600

    # The agent crashes (its objects go, its processes stay) and a new one takes the session
    # back: it must speak TLS to this Jupyter too, or it would wipe a healthy session.
    for task in list(mgr._tasks):
        task.cancel()
    await asyncio.gather(*mgr._tasks, return_exceptions=True)
    sent2 = Sent()
    sent2.connected = False
    mgr2 = SessionManager(config, sent2)
    await mgr2.recover()
    assert [(r.session_id, r.state) for r in mgr2.live()] == [(51, "running")]
    assert mgr2.sessions[51].url == ready.url
    sent2.connected = True

    mgr2.stop(SessionStop(msgid="t2", session_id=51, reason="test"))
    receipt = await sent2.wait("session.receipt", timeout=60)
    assert receipt.verified, receipt.details


@needs_root
@pytest.mark.timeout(300)
async def test_with_cloudflare_access_only_the_owners_access_token_gets_in(
    tmp_path: Path, workspace_root: Path, session_user: str, session_env: Path
) -> None:
    cf = CloudflareAccessStandIn()
    aud = uuid.uuid4().hex * 2
    origin_port = free_port()
    config = session_config(
        tmp_path, workspace_root, session_user,
        jupyter_command=[str(session_env / "bin" / "jupyter"), "lab"],
        jupyter_start_timeout=90, session_stop_grace=3,
        session_max_processes=256, activity_seconds=0.3,
        tunnel={"kind": "cloudflared-named", "cloudflared": str(STANDIN),
                "token": "eyJhIjoiYWNjdCIsInMiOiJjMlZqY21WMCIsInQiOiJ0dW5uZWwifQ==",
                "hostname": "pc1.lab.example.edu", "origin_port": origin_port},
    )  # fmt: skip
    sent = Sent()
    mgr = SessionManager(config, sent)
    access = SessionAccess(team_domain=cf.issuer, audience=aud, email="alice@uni.example")
    mgr.start(
        SessionStart(msgid="a1", session_id=52, token=TOKEN, duration_seconds=600, access=access)
    )
    try:
        ready = await asyncio.wait_for(_ready(sent), 120)
        assert ready.type == "session.ready", ready
        assert ready.url.startswith("https://pc1.lab.example.edu/lab?token=")
        # What cloudflared hands the origin, straight to Jupyter's loopback port.
        origin = f"http://127.0.0.1:{origin_port}"

        def login(assertion: str | None) -> tuple[int, dict[str, str], str]:
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            if assertion is not None:
                headers["Cf-Access-Jwt-Assertion"] = assertion
            body = urllib.parse.urlencode(
                {"code": door.mint_code(token=TOKEN, session_id=52), "next": "/lab"}
            )
            return request(origin, "POST", "/login", headers=headers, body=body)

        alice = cf.sign(aud=aud, email="alice@uni.example")
        status, headers, _ = await asyncio.to_thread(login, alice)
        assert status == 302, "a valid code with Alice's Access token gets in"
        cookie = headers["Set-Cookie"].split(";")[0]
        status, _, _ = await asyncio.to_thread(
            request, origin, "GET", "/api/contents",
            headers={"Cookie": cookie, "Cf-Access-Jwt-Assertion": alice},
        )  # fmt: skip
        assert status == 200
        # The same cookie without Access's token (a request around the edge): refused.
        status, _, _ = await asyncio.to_thread(
            request, origin, "GET", "/api/contents", headers={"Cookie": cookie}
        )
        assert status == 403

        cases = {
            "missing header": None,
            "wrong audience": cf.sign(aud="f" * 64, email="alice@uni.example"),
            "expired": cf.sign(aud=aud, email="alice@uni.example", issued=1_000_000_000),
            "bad signature": cf.sign(aud=aud, email="alice@uni.example",
                                     key=SigningKey(),
                                     kid=cf.current.kid),
            "another user's email": cf.sign(aud=aud, email="bob@uni.example"),
        }  # fmt: skip
        for case, assertion in cases.items():
            status, _, body = await asyncio.to_thread(login, assertion)
            assert status == 403, f"{case}: {status} {body[:200]}"
            assert "Refused" in body, case
        # The agent's own polls (token in the Authorization header) still work.
        before = len([m for m in sent.messages if m.type == "session.activity"])
        await sent.wait("session.activity", count=before + 1, timeout=15)
    finally:
        mgr.stop(SessionStop(msgid="a2", session_id=52, reason="test"))
        await sent.wait("session.receipt", timeout=60)
        cf.close()
