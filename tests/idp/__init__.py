"""Identity providers for the SSO tests, started on loopback by the test suite, and helpers to
drive a login through the real HTTP flow (redirects and the IdP's forms) with httpx.

The IdPs run on ``localhost`` and the site on ``127.0.0.1``: cookies are shared across the ports
of one host name, so the two would overwrite each other's session cookie otherwise.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from tests.procs import ProcessSet, free_port, port_open, wait_for

IDP_DIR = Path(__file__).resolve().parent
OIDC_DIR = IDP_DIR / "oidc"
INSTALL_HINT = "run `make install` (it installs Node's packages, xmlsec1 and Chromium)"


# -- HTML forms ------------------------------------------------------------------------------


@dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)
    buttons: list[tuple[str, str, str]] = field(default_factory=list)  # (text, name, value)
    id: str = ""


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self._form: Form | None = None
        self._button: list[str] | None = None
        self._button_attrs: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._form = Form(
                action=a.get("action", ""),
                method=a.get("method", "get").lower(),
                id=a.get("id", ""),
            )
            self.forms.append(self._form)
        elif tag == "input" and a.get("name"):
            target = self._form or self._owner(a.get("form", ""))
            if target is not None and a.get("type", "text") not in {"submit", "button"}:
                target.fields[a["name"]] = a.get("value", "")
        elif tag == "button":
            self._button, self._button_attrs = [], a

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._button.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None
        elif tag == "button" and self._button is not None:
            a = self._button_attrs
            target = self._owner(a["form"]) if a.get("form") else self._form
            if target is not None:
                text = " ".join("".join(self._button).split())
                target.buttons.append((text, a.get("name", ""), a.get("value", "")))
            self._button = None

    def _owner(self, form_id: str) -> Form | None:
        return next((f for f in self.forms if form_id and f.id == form_id), None)


def parse_forms(html: str) -> list[Form]:
    parser = _FormParser()
    parser.feed(html)
    return parser.forms


def find_form(
    response: httpx.Response, *, button: str | None = None, has: str | None = None
) -> Form:
    """The form with a button labelled ``button`` or with a field named ``has``."""
    for form in parse_forms(response.text):
        if button is not None and any(text == button for text, _, _ in form.buttons):
            return form
        if has is not None and has in form.fields:
            return form
    raise AssertionError(
        f"no form with button={button!r} has={has!r} at {response.url} "
        f"({response.status_code}):\n{response.text[:2000]}"
    )


def submit(
    client: httpx.Client,
    response: httpx.Response,
    form: Form,
    button: str | None = None,
    **values: str,
) -> httpx.Response:
    """Submit ``form`` as a browser would: its fields, ``values`` filled in, and the clicked
    button's name/value."""
    data = {**form.fields, **values}
    for text, name, value in form.buttons:
        if text == button and name:
            data[name] = value
    url = urljoin(str(response.url), form.action or str(response.url))
    if form.method == "post":
        return client.post(url, data=data)
    return client.get(url, params=data)


# -- the IdPs --------------------------------------------------------------------------------


def _require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if not path:
        raise AssertionError(f"{name} is not installed: {hint}")
    return path


@dataclass
class OidcIdP:
    issuer: str
    client_id: str
    client_secret: str
    accounts_file: Path

    def set_account(self, username: str, **claims: Any) -> None:
        accounts = json.loads(self.accounts_file.read_text())
        accounts.setdefault(username, {}).update(claims)
        self.accounts_file.write_text(json.dumps(accounts))

    def site_env(self) -> dict[str, str]:
        return {
            "SSO_OIDC_ISSUER": self.issuer,
            "SSO_OIDC_CLIENT_ID": self.client_id,
            "SSO_OIDC_CLIENT_SECRET": self.client_secret,
            "SSO_OIDC_NAME": "Test University",
        }


def start_oidc_idp(
    procs: ProcessSet, workdir: Path, *, site_url: str, accounts: dict[str, Any]
) -> OidcIdP:
    """Start the npm ``oidc-provider`` server (tests/idp/oidc/server.js) with one client
    registered for ``site_url``'s fixed callback and logout URLs."""
    node = _require_tool("node", "apt-get install -y nodejs (Node 20+), then " + INSTALL_HINT)
    if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        raise AssertionError(
            f"oidc-provider is not installed in {OIDC_DIR}: npm ci --prefix tests/idp/oidc, "
            f"or {INSTALL_HINT}"
        )
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    idp = OidcIdP(
        issuer=f"http://localhost:{port}",
        client_id="nexcompute-test",
        client_secret="test-client-secret",
        accounts_file=workdir / "oidc-accounts.json",
    )
    idp.accounts_file.write_text(json.dumps(accounts))
    config = {
        "port": port,
        "issuer": idp.issuer,
        "accounts_file": str(idp.accounts_file),
        "client": {
            "client_id": idp.client_id,
            "client_secret": idp.client_secret,
            "redirect_uris": [f"{site_url}/accounts/oidc/university/login/callback/"],
            "post_logout_redirect_uris": [f"{site_url}/accounts/login/"],
        },
    }
    config_file = workdir / "oidc-config.json"
    config_file.write_text(json.dumps(config))
    proc = procs.start("oidc-idp", [node, str(OIDC_DIR / "server.js"), str(config_file)])
    wait_for(
        lambda: port_open(port) or (not proc.alive() and _fail(proc.name, proc.log())),
        timeout=30,
        what=f"oidc-provider on port {port}",
    )
    return idp


@dataclass
class SamlIdP:
    base_url: str
    users_file: Path

    @property
    def metadata_url(self) -> str:
        return f"{self.base_url}/metadata"

    def set_attributes(self, username: str, **attributes: list[str]) -> None:
        users = json.loads(self.users_file.read_text())
        users[username].setdefault("attributes", {}).update(attributes)
        self.users_file.write_text(json.dumps(users))

    def site_env(self) -> dict[str, str]:
        return {"SSO_SAML_METADATA_URL": self.metadata_url, "SSO_SAML_NAME": "Test University SAML"}


def start_saml_idp(
    procs: ProcessSet, workdir: Path, *, site_url: str, users: dict[str, Any]
) -> SamlIdP:
    """Start the pysaml2 IdP (tests/idp/saml_idp.py) in a subprocess; it fetches the site's SP
    metadata from the fixed metadata URL at the first login."""
    _require_tool("xmlsec1", "apt-get install -y xmlsec1, or " + INSTALL_HINT)
    try:
        import saml2  # noqa: F401
    except ImportError as exc:
        raise AssertionError(f"pysaml2 is not installed: {INSTALL_HINT}") from exc
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    idp = SamlIdP(base_url=f"http://localhost:{port}", users_file=workdir / "saml-users.json")
    idp.users_file.write_text(json.dumps(users))
    config = {
        "port": port,
        "base_url": idp.base_url,
        "workdir": str(workdir / "saml-idp"),
        "sp_metadata_url": f"{site_url}/accounts/saml/university/metadata/",
        "users_file": str(idp.users_file),
    }
    config_file = workdir / "saml-config.json"
    config_file.write_text(json.dumps(config))
    proc = procs.start("saml-idp", [sys.executable, str(IDP_DIR / "saml_idp.py"), str(config_file)])
    wait_for(
        lambda: port_open(port) or (not proc.alive() and _fail(proc.name, proc.log())),
        timeout=30,
        what=f"saml idp on port {port}",
    )
    return idp


def _fail(name: str, log: str) -> bool:
    raise AssertionError(f"{name} exited:\n{log[-3000:]}")
