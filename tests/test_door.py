"""The door to a session (docs/security.md), piece by piece: the one-time codes, the Cloudflare
Access check against the stand-in's JWKS, the Access API client against the stand-in API, and
the Nexus's ``/sessions/<id>/open/`` view. The whole door in a real Jupyter and Chromium:
tests/test_door_browser.py."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from nexcompute_jupyter import access, door

from machines.cloudflare_access import AccessApiError, CloudflareAccessApi, lab_access_provision
from machines.models import Lab
from sessions.models import ComputeSession
from sessions.services import session_start_command
from sessions.states import SessionState
from tests.factories import MachineFactory
from tests.standins.cloudflare_access import CloudflareAccessStandIn, SigningKey

TOKEN = "session-token-abc"
AUD = "a" * 64


# --- one-time codes ----------------------------------------------------------------------------


def test_a_code_opens_its_session_once() -> None:
    redeemer = door.Redeemer(token=TOKEN, session_id=7)
    code = door.mint_code(token=TOKEN, session_id=7)
    assert TOKEN not in code
    redeemer.redeem(code)
    with pytest.raises(door.DoorError, match="used already"):
        redeemer.redeem(code)


def test_a_code_is_refused_by_another_session_and_when_expired_or_forged() -> None:
    code = door.mint_code(token=TOKEN, session_id=7)
    # Another session (its own token): the signature does not hold.
    with pytest.raises(door.DoorError, match="not issued for this session"):
        door.Redeemer(token="other-token", session_id=8).redeem(code)
    # Same token, another id in the payload (a code minted for session 8).
    with pytest.raises(door.DoorError, match="another session"):
        door.Redeemer(token=TOKEN, session_id=7).redeem(door.mint_code(token=TOKEN, session_id=8))
    # Expired: valid seconds, then never again.
    old = door.mint_code(token=TOKEN, session_id=7, now=time.time() - 120)
    with pytest.raises(door.DoorError, match="expired"):
        door.Redeemer(token=TOKEN, session_id=7).redeem(old)
    # A payload changed by hand (longer life) breaks the signature.
    body, mac = code.split(".")
    forged = door._b64(
        door._unb64(body).replace(b'"exp":', b'"exp":9').replace(b'"sid":7', b'"sid":7')
    )
    with pytest.raises(door.DoorError, match="not issued for this session"):
        door.Redeemer(token=TOKEN, session_id=7).redeem(f"{forged}.{mac}")
    for junk in ("", "x", "a.b.c", "!!!.???", "e30.AAAA", "x" * 600):
        with pytest.raises(door.DoorError):
            door.Redeemer(token=TOKEN, session_id=7).redeem(junk)


def test_a_code_minted_to_live_too_long_is_refused() -> None:
    code = door.mint_code(token=TOKEN, session_id=7, ttl=3600)
    with pytest.raises(door.DoorError, match="too long"):
        door.Redeemer(token=TOKEN, session_id=7).redeem(code)


# --- Cloudflare Access -------------------------------------------------------------------------


@pytest.fixture
def cf() -> Iterator[CloudflareAccessStandIn]:
    standin = CloudflareAccessStandIn()
    yield standin
    standin.close()


def checker(cf: CloudflareAccessStandIn, email: str = "alice@uni.example") -> access.AccessChecker:
    return access.AccessChecker(
        access.AccessPolicy(team_domain=cf.issuer, audience=AUD, email=email)
    )


def test_a_valid_access_token_for_the_owner_passes(cf: CloudflareAccessStandIn) -> None:
    token = cf.sign(aud=AUD, email="Alice@Uni.Example")
    claims = checker(cf).check(token)
    assert claims["email"] == "Alice@Uni.Example"
    assert cf.certs_fetches == 1
    # A token signed with the previous key (rotated out, still valid 7 days) passes too, with
    # no second fetch: both keys are in the JWKS.
    checker_ = checker(cf)
    checker_.check(cf.sign(aud=AUD, email="alice@uni.example", key=cf.previous))
    assert cf.certs_fetches == 2  # one per checker


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "no Cf-Access-Jwt-Assertion header"),
        ("wrong_audience", "another application"),
        ("expired", "expired"),
        ("bad_signature", "signature is not valid"),
        ("other_email", "another user"),
        ("other_issuer", "another team"),
        ("unknown_key", "unknown key"),
        ("not_rs256", "not signed with RS256"),
        ("garbage", "not a JWT"),
    ],
)
def test_access_refuses(cf: CloudflareAccessStandIn, case: str, reason: str) -> None:
    import jwt

    good = cf.sign(aud=AUD, email="alice@uni.example")
    checker(cf).check(good)  # the same checker set-up passes a good token: the case is the cause
    token: str | None
    if case == "missing":
        token = None
    elif case == "wrong_audience":
        token = cf.sign(aud="b" * 64, email="alice@uni.example")
    elif case == "expired":
        token = cf.sign(aud=AUD, email="alice@uni.example", issued=time.time() - 3600)
    elif case == "bad_signature":
        # Signed by a key of someone else's, claiming the team's current key id.
        token = cf.sign(aud=AUD, email="alice@uni.example", key=SigningKey(), kid=cf.current.kid)
    elif case == "other_email":
        token = cf.sign(aud=AUD, email="bob@uni.example")
    elif case == "other_issuer":
        token = cf.sign(aud=AUD, email="alice@uni.example", iss="https://evil.cloudflareaccess.com")
    elif case == "unknown_key":
        token = cf.sign(aud=AUD, email="alice@uni.example", key=SigningKey())
    elif case == "not_rs256":
        token = jwt.encode(
            {"aud": [AUD], "email": "alice@uni.example", "iss": cf.issuer,
             "exp": int(time.time()) + 60, "iat": int(time.time())},
            "secret-but-long-enough-for-hs256-0123456789",
            algorithm="HS256",
            headers={"kid": cf.current.kid},
        )  # fmt: skip
    else:
        token = "not.a.jwt"
    with pytest.raises(access.AccessDenied, match=reason):
        checker(cf).check(token)


def test_team_domains_are_https_except_loopback_stand_ins() -> None:
    assert access.team_issuer("myuni") == "https://myuni.cloudflareaccess.com"
    assert access.team_issuer("myuni.cloudflareaccess.com") == "https://myuni.cloudflareaccess.com"
    assert access.team_issuer("http://127.0.0.1:9") == "http://127.0.0.1:9"
    for bad in ("http://myuni.cloudflareaccess.com", "https://x.example/path", "", "ftp://x"):
        with pytest.raises(ValueError):
            access.team_issuer(bad)


@pytest.mark.django_db
def test_the_nexus_creates_the_access_application_and_policy(cf: CloudflareAccessStandIn) -> None:
    lab = Lab.objects.create(name="Physics")
    api = CloudflareAccessApi(api_token=cf.api_token, account_id=cf.account_id, api_url=cf.api_url)
    app = lab_access_provision(
        lab=lab,
        api=api,
        team_domain="myuni.cloudflareaccess.com",
        domain="*.physics.uni.example",
        allow_email_domains=["uni.example"],
    )
    assert cf.apps[app.id]["domain"] == "*.physics.uni.example"
    assert cf.apps[app.id]["type"] == "self_hosted"
    [policy] = cf.policies[app.id]
    assert policy["decision"] == "allow"
    assert policy["include"] == [{"email_domain": {"domain": "uni.example"}}]
    lab.refresh_from_db()
    assert (lab.access_team_domain, lab.access_audience) == ("myuni.cloudflareaccess.com", app.aud)
    assert re.fullmatch(r"[0-9a-f]{64}", lab.access_audience)

    # A wrong API token: Cloudflare's error in the message, nothing stored.
    other = Lab.objects.create(name="Chemistry")
    bad = CloudflareAccessApi(api_token="wrong", account_id=cf.account_id, api_url=cf.api_url)
    with pytest.raises(AccessApiError, match="10000: Authentication error"):
        lab_access_provision(
            lab=other, api=bad, team_domain="myuni", domain="*.chem.uni.example",
            allow_email_domains=["uni.example"],
        )  # fmt: skip
    other.refresh_from_db()
    assert other.access_audience == ""


@pytest.mark.django_db
def test_the_start_command_carries_access_for_the_owner(owner: Any) -> None:
    machine = MachineFactory()
    lab = machine.lab
    lab.access_team_domain, lab.access_audience = "myuni.cloudflareaccess.com", AUD
    lab.save()
    owner.email = "alice@uni.example"
    owner.save()
    session = ComputeSession.objects.create(
        owner=owner, machine=machine, duration_minutes=60, jupyter_token=TOKEN,
        expires_at="2099-01-01T00:00:00Z", state=SessionState.STARTING,
    )  # fmt: skip
    cmd = session_start_command(session_id=session.pk)
    assert cmd is not None and cmd.access is not None
    assert (cmd.access.team_domain, cmd.access.audience, cmd.access.email) == (
        "myuni.cloudflareaccess.com", AUD, "alice@uni.example",
    )  # fmt: skip
    assert cmd.nexus_url


# --- the Nexus's door view ---------------------------------------------------------------------


def running_session(owner: Any, url: str = "http://127.0.0.1:9999/lab?token=" + TOKEN) -> Any:
    return ComputeSession.objects.create(
        owner=owner, machine=MachineFactory(), duration_minutes=60, jupyter_token=TOKEN,
        jupyter_url=url, expires_at="2099-01-01T00:00:00Z", state=SessionState.RUNNING,
    )  # fmt: skip


def form_fields(html: str) -> dict[str, str]:
    return dict(re.findall(r'name="(\w+)" value="([^"]*)"', html))


@pytest.mark.django_db
def test_the_owner_gets_a_one_time_code_posted_to_jupyter(owner: Any, client: Any) -> None:
    session = running_session(owner)
    client.force_login(owner)
    resp = client.get(f"/sessions/{session.pk}/open/")
    assert resp.status_code == 200
    html = resp.content.decode()
    assert TOKEN not in html  # the token itself never reaches the browser
    assert 'action="http://127.0.0.1:9999/login"' in html
    assert 'method="post"' in html
    fields = form_fields(html)
    assert fields["next"] == "/lab"
    door.Redeemer(token=TOKEN, session_id=session.pk).redeem(fields["code"])
    assert resp["Cache-Control"] == "no-store"
    assert resp["Referrer-Policy"] == "no-referrer"
    # next: Jupyter Lab or the workspace zip; anything else falls back to /lab.
    for asked, given in [
        ("/directories/?archiveFormat=zip", "/directories/?archiveFormat=zip"),
        ("https://evil.example/", "/lab"),
        ("//evil.example/lab", "/lab"),
        ("/api/contents", "/lab"),
    ]:
        resp = client.get(f"/sessions/{session.pk}/open/", {"next": asked})
        assert form_fields(resp.content.decode())["next"] == given.replace("&", "&amp;")


@pytest.mark.django_db
def test_nobody_else_gets_a_code(owner: Any, other: Any, client: Any) -> None:
    session = running_session(owner)
    assert client.get(f"/sessions/{session.pk}/open/").status_code == 302  # to the login page
    client.force_login(other)
    assert client.get(f"/sessions/{session.pk}/open/").status_code == 404
    client.force_login(owner)
    assert client.get(f"/sessions/{session.pk}/open/").status_code == 200
    ComputeSession.objects.filter(pk=session.pk).update(state=SessionState.STOPPING)
    assert client.get(f"/sessions/{session.pk}/open/").status_code == 404
    assert client.post(f"/sessions/{session.pk}/open/").status_code in (403, 405)


@pytest.mark.django_db
def test_the_dashboard_page_carries_no_token(owner: Any, client: Any) -> None:
    running_session(owner)
    client.force_login(owner)
    page = client.get("/").content.decode()
    assert TOKEN not in page


@pytest.mark.django_db
def test_a_lab_takes_both_access_settings_or_neither() -> None:
    from django.core.exceptions import ValidationError

    lab = Lab(name="Bio", access_team_domain="myuni.cloudflareaccess.com")
    with pytest.raises(ValidationError, match="both"):
        lab.full_clean()
    lab.access_team_domain, lab.access_audience = "http://myuni.cloudflareaccess.com", AUD
    with pytest.raises(ValidationError, match="https"):
        lab.full_clean()
    lab.access_team_domain = "myuni.cloudflareaccess.com"
    lab.full_clean()
    assert lab.access_enabled


@pytest.mark.django_db
def test_createaccessapp_sets_the_lab_up(
    cf: CloudflareAccessStandIn, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from django.core.management import CommandError, call_command

    Lab.objects.create(name="Physics")
    argv = ["createaccessapp", "--lab", "Physics", "--team", "myuni", "--domain",
            "*.physics.uni.example", "--account-id", cf.account_id,
            "--allow-email-domain", "uni.example", "--api-url", cf.api_url]  # fmt: skip
    with pytest.raises(CommandError, match="CLOUDFLARE_API_TOKEN"):
        call_command(*argv)
    assert cf.apps == {}
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", cf.api_token)
    call_command(*argv)
    [app] = cf.apps.values()
    assert f"AUD tag {app['aud']}" in capsys.readouterr().out
    assert Lab.objects.get(name="Physics").access_audience == app["aud"]
