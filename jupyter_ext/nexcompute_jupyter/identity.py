"""The session Jupyter's identity provider: who may pass the door.

Selected by the agent with
``--ServerApp.identity_provider_class=nexcompute_jupyter.identity.NexusIdentityProvider`` and
configured from the ``jupyter_server_config.json`` the agent writes (mode 0600, session account)
into the session's ``JUPYTER_CONFIG_DIR``::

    {"IdentityProvider": {"token": "<the session's Jupyter token>"},
     "NexusIdentityProvider": {"session_id": 42, "nexus_url": "https://nexus.example.edu",
                               "access_team_domain": "", "access_audience": "",
                               "access_email": ""}}

Who gets in:

- a browser that POSTs a valid one-time code (:mod:`.door`) to ``/login`` gets Jupyter's login
  cookie and a redirect to ``next`` (the code never sits in a URL); ``GET /login`` shows no
  token form, only a pointer back to the dashboard;
- a request with the cookie;
- a request with the session's Jupyter token (``Authorization: token …``, or ``?token=`` as
  the API's ``url`` carries it): the agent and API clients.

With Cloudflare Access configured (``access_*``), every request must also carry a valid
``Cf-Access-Jwt-Assertion`` for the owner's email (:mod:`.access`), except those that carry the
token in the ``Authorization`` header (the agent on loopback; API clients, who pass Access's
own login at the edge first).

Warm sandboxes (docs/sandbox.md, "Warm sandboxes"): the agent starts Jupyter before any session
exists, with a token of its own and ``handover_file`` set. At hand-over it writes that file
(atomically, 0600, the session account's) with the session's token, id and door settings; the
first request after it (every request checks, one ``stat`` until then) takes them, and from then
on the warm token, and any login cookie issued before, no longer work::

    {"token": "<the session's token>", "session_id": 42, "nexus_url": "...",
     "access_team_domain": "", "access_audience": "", "access_email": ""}
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import secrets
from pathlib import Path
from typing import Any

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.auth.identity import PasswordIdentityProvider, User
from jupyter_server.auth.login import LoginFormHandler
from traitlets import Int, Type, Unicode, default

from nexcompute_jupyter import access, door

USERNAME = "session-owner"


def _page(title: str, message: str, link: str | None) -> str:
    back = (
        f'<p><a href="{html.escape(link)}">Open it from the NexCompute dashboard</a></p>'
        if link
        else ""
    )
    return (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>{back}</html>"
    )


class DoorLoginHandler(LoginFormHandler):
    """``/login``: POST a one-time code, get the cookie. No token or password form."""

    def check_xsrf_cookie(self) -> None:
        # The POST comes from the Nexus's page (another origin), so it cannot carry Jupyter's
        # _xsrf; the one-time code is the proof instead: unguessable, bound to this session,
        # valid seconds, usable once. A forged POST needs a code of this session.
        return

    def _refuse(self, status: int, message: str) -> None:
        provider: NexusIdentityProvider = self.identity_provider
        self.set_status(status)
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(_page("Not signed in to this Jupyter Lab", message, provider.nexus_url or None))

    @allow_unauthenticated
    async def get(self) -> None:
        if self.current_user:
            self._redirect_safe(self.get_argument("next", default=self.base_url))
            return
        self._refuse(
            403,
            "This Jupyter Lab belongs to a NexCompute session. Its owner opens it from the "
            "dashboard; nobody else can.",
        )

    @allow_unauthenticated
    async def post(self) -> None:
        provider: NexusIdentityProvider = self.identity_provider
        provider.check_handover()
        try:
            await provider.check_access(self)
        except access.AccessDenied as exc:
            self.log.warning("door: refused a sign-in code: %s", exc)
            self._refuse(403, f"Refused: {exc}.")
            return
        code = self.get_body_argument("code", default="")
        try:
            provider.redeemer.redeem(code)
        except door.DoorError as exc:
            self.log.warning("door: refused a sign-in code: %s", exc)
            self._refuse(403, f"Refused: {exc}.")
            return
        user = provider.session_user()
        self.current_user = user
        provider.set_login_cookie(self, user)
        self.log.info("door: the session's owner signed in with a one-time code")
        self._redirect_safe(self.get_body_argument("next", default=self.base_url))


class NexusIdentityProvider(PasswordIdentityProvider):
    """Jupyter's token stays for machines; browsers come in through the Nexus's one-time code
    (and, where configured, Cloudflare Access)."""

    session_id = Int(0, config=True, help="The NexCompute session this Jupyter serves.")
    nexus_url = Unicode("", config=True, help="The Nexus's dashboard, linked on refusals.")
    access_team_domain = Unicode("", config=True, help="Cloudflare Access team domain.")
    access_audience = Unicode("", config=True, help="Cloudflare Access application AUD tag.")
    access_email = Unicode("", config=True, help="The session owner's email (Access).")
    handover_file = Unicode(
        "",
        config=True,
        help="A warm sandbox's hand-over file: once the agent writes it, its token and door "
        "settings replace the configured ones (and the configured token stops working).",
    )

    # Set in _configure (at start, and again at a warm sandbox's hand-over).
    redeemer: door.Redeemer
    access_checker: access.AccessChecker | None

    login_handler_class = Type(
        default_value=DoorLoginHandler,
        klass=LoginFormHandler,
        config=True,
        help="The door: one-time code sign-in.",
    )

    @default("allow_password_change")
    def _no_password_change(self) -> bool:
        return False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.token:
            raise ValueError("NexusIdentityProvider needs the session's Jupyter token")
        # Appended to the login cookie's name at hand-over: a cookie issued before it (to
        # whoever held the warm token) is never read again.
        self._cookie_suffix = ""
        self._handed_over = not self.handover_file
        self._configure()
        self._hide_token_from_pages()

    def check_handover(self) -> None:
        """Take the session's settings from ``handover_file`` once it exists (warm
        sandboxes). Cheap while it does not: one failed ``stat``."""
        if self._handed_over:
            return
        path = Path(self.handover_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Unreadable: nobody may pass (the warm token neither) until the agent rewrites it.
            self.log.error("door: hand-over file %s unreadable: %s", path, exc)
            self.set_trait("token", secrets.token_urlsafe(32))
            return
        if not isinstance(data, dict) or not isinstance(data.get("token"), str):
            self.log.error("door: hand-over file %s has no token", path)
            self.set_trait("token", secrets.token_urlsafe(32))
            return
        self.set_trait("token", data["token"])
        self.session_id = int(data.get("session_id") or 0)
        self.nexus_url = str(data.get("nexus_url") or "")
        self.access_team_domain = str(data.get("access_team_domain") or "")
        self.access_audience = str(data.get("access_audience") or "")
        self.access_email = str(data.get("access_email") or "")
        self._cookie_suffix = "-" + secrets.token_hex(8)
        self._handed_over = True
        self._configure()
        self.log.info("door: warm sandbox handed over to session %d", self.session_id)

    def get_cookie_name(self, handler: Any) -> str:
        return str(super().get_cookie_name(handler)) + self._cookie_suffix

    def _configure(self) -> None:
        self.redeemer = door.Redeemer(token=self.token, session_id=self.session_id)
        self.access_checker = None
        if self.access_team_domain or self.access_audience or self.access_email:
            if not (self.access_team_domain and self.access_audience and self.access_email):
                raise ValueError(
                    "Cloudflare Access needs access_team_domain, access_audience and "
                    "access_email together"
                )
            self.access_checker = access.AccessChecker(
                access.AccessPolicy(
                    team_domain=self.access_team_domain,
                    audience=self.access_audience,
                    email=self.access_email,
                )
            )

    def _hide_token_from_pages(self) -> None:
        """JupyterLab puts the server's token into every page's config (and its front end then
        into websocket URLs): a browser that came in by the door would hold the long-lived
        token after all. Blank it, as JupyterHub's single-user servers do; the front end then
        authenticates with the cookie and Jupyter's XSRF cookie."""
        settings = getattr(self.parent, "tornado_settings", None)
        if not isinstance(settings, dict):
            return
        earlier = settings.get("page_config_hook")

        def hook(handler: Any, page_config: dict[str, Any]) -> dict[str, Any]:
            if earlier is not None:
                page_config = earlier(handler, page_config)
            return {**page_config, "token": ""}

        settings["page_config_hook"] = hook

    def session_user(self) -> User:
        return User(username=USERNAME, name=self.access_email or "Session owner")

    def _header_token_ok(self, handler: Any) -> bool:
        auth = handler.request.headers.get("Authorization", "")
        m = self.auth_header_pat.match(auth)
        return (
            bool(m)
            and bool(self.token)
            and hmac.compare_digest(m.group(2).encode(), self.token.encode())
        )

    async def check_access(self, handler: Any) -> None:
        """Raise :class:`access.AccessDenied` unless Access is off or the request carries a
        valid ``Cf-Access-Jwt-Assertion`` for the owner."""
        checker = self.access_checker
        if checker is None:
            return
        assertion = handler.request.headers.get(access.HEADER)
        await asyncio.to_thread(checker.check, assertion)

    async def _get_user(self, handler: Any) -> User | None:
        self.check_handover()
        if self.access_checker is not None and not self._header_token_ok(handler):
            try:
                await self.check_access(handler)
            except access.AccessDenied as exc:
                self.log.warning("door: refused %s %s: %s", handler.request.method,
                                 handler.request.path, exc)  # fmt: skip
                return None
        return await super()._get_user(handler)

    def process_login_form(self, handler: Any) -> User | None:
        return None  # no token or password form: browsers come in with a one-time code
