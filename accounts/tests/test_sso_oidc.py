"""OIDC single sign-on against a real `oidc-provider` IdP (node) and a real site (daphne).

Every login goes through the real HTTP flow: the site's login button, the IdP's redirects and
login form, the callback, and a Django session checked against the database.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from allauth.socialaccount.models import SocialAccount
from django.test import Client

from accounts.models import User
from accounts.tests.conftest import OidcSite
from tests.idp import find_form, submit

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BUTTON = "Test University"


def http() -> httpx.Client:
    return httpx.Client(follow_redirects=True, timeout=30)


def open_idp_login(client: httpx.Client, site: OidcSite) -> httpx.Response:
    """From the dashboard, through the login page's IdP button, to the IdP's page."""
    page = client.get(f"{site.url}/")
    assert urlsplit(str(page.url)).path == "/accounts/login/", page.url
    return submit(client, page, find_form(page, button=BUTTON), button=BUTTON)


def oidc_login(
    client: httpx.Client, site: OidcSite, username: str, password: str
) -> httpx.Response:
    idp_page = open_idp_login(client, site)
    assert idp_page.url.host == "localhost", idp_page.url
    form = find_form(idp_page, has="password")
    return submit(client, idp_page, form, login=username, password=password)


def groups_of(user: User) -> set[str]:
    return set(user.groups.values_list("name", flat=True))


def assert_logged_in(client: httpx.Client, site: OidcSite, response: httpx.Response) -> None:
    assert response.status_code == 200, response.text[:2000]
    assert str(response.url) == f"{site.url}/", response.url
    again = client.get(f"{site.url}/", follow_redirects=False)
    assert again.status_code == 200, again.headers.get("location")


def test_it_creates_a_student_on_first_login(oidc_site: OidcSite) -> None:
    with http() as client:
        response = oidc_login(client, oidc_site, "alice", "alice-pw")
        assert_logged_in(client, oidc_site, response)

    user = User.objects.get(username="alice")
    assert (user.email, user.first_name, user.last_name) == (
        "alice@uni.edu",
        "Alice",
        "Liddell",
    )
    assert not user.is_staff and not user.has_usable_password()
    assert groups_of(user) == {"student", "gpu-users"}  # role + SSO_GROUP_MAP
    assert SocialAccount.objects.get(user=user).provider == "university"


def test_it_makes_staff_from_the_groups_claim(oidc_site: OidcSite) -> None:
    with http() as client:
        assert_logged_in(client, oidc_site, oidc_login(client, oidc_site, "carol", "carol-pw"))
    carol = User.objects.get(username="carol")
    assert carol.is_staff and carol.role == "staff"
    assert groups_of(carol) == {"staff"}


def test_it_resyncs_roles_on_every_login(oidc_site: OidcSite) -> None:
    with http() as client:
        assert_logged_in(client, oidc_site, oidc_login(client, oidc_site, "alice", "alice-pw"))
    assert groups_of(User.objects.get(username="alice")) == {"student", "gpu-users"}

    oidc_site.idp.set_account("alice", groups=["staff"])
    with http() as client:  # a new browser: asks for the password again
        assert_logged_in(client, oidc_site, oidc_login(client, oidc_site, "alice", "alice-pw"))
    alice = User.objects.get(username="alice")
    assert alice.is_staff
    assert groups_of(alice) == {"staff"}

    oidc_site.idp.set_account("alice", groups=["students"])
    with http() as client:
        assert_logged_in(client, oidc_site, oidc_login(client, oidc_site, "alice", "alice-pw"))
    alice = User.objects.get(username="alice")
    assert not alice.is_staff
    assert groups_of(alice) == {"student"}
    assert User.objects.filter(username__startswith="alice").count() == 1


def test_a_wrong_password_stays_at_the_idp(oidc_site: OidcSite) -> None:
    with http() as client:
        response = oidc_login(client, oidc_site, "alice", "not-her-password")
        assert response.url.host == "localhost"
        assert "Invalid username or password" in response.text
        assert find_form(response, has="password")
        dashboard = client.get(f"{oidc_site.url}/", follow_redirects=False)
        assert dashboard.status_code == 302
        assert dashboard.headers["location"].startswith("/accounts/login/")
    assert not User.objects.filter(username="alice").exists()


def test_logout_ends_the_idp_session(oidc_site: OidcSite) -> None:
    with http() as client:
        dashboard = oidc_login(client, oidc_site, "alice", "alice-pw")
        assert_logged_in(client, oidc_site, dashboard)

        # Still signed in at the IdP: a second login needs no password.
        client.cookies.delete("sessionid", domain="127.0.0.1")
        again = open_idp_login(client, oidc_site)
        assert str(again.url) == f"{oidc_site.url}/", "expected single sign-on without a password"

        confirm = submit(client, again, find_form(again, button="Log out"))
        # RP-initiated logout: sent to the IdP's end_session_endpoint with the ID token.
        assert (confirm.url.host, confirm.url.path) == ("localhost", "/session/end")
        query = parse_qs(urlsplit(str(confirm.url)).query)
        assert query["id_token_hint"][0].count(".") == 2
        assert query["post_logout_redirect_uri"] == [f"{oidc_site.url}/accounts/login/"]
        button = "Yes, sign me out"
        back = submit(client, confirm, find_form(confirm, button=button), button=button)
        assert str(back.url).startswith(f"{oidc_site.url}/accounts/login/")

        dashboard = client.get(f"{oidc_site.url}/", follow_redirects=False)
        assert dashboard.status_code == 302
        idp_page = open_idp_login(client, oidc_site)
        assert idp_page.url.host == "localhost"
        assert find_form(idp_page, has="password"), "the IdP should ask for the password again"


# -- the login page, in process -------------------------------------------------------------

OIDC_PROVIDERS = {
    "openid_connect": {
        "APPS": [
            {
                "provider_id": "university",
                "name": "Example University",
                "client_id": "c",
                "secret": "s",
                "settings": {"server_url": "http://localhost:9"},
            }
        ]
    }
}


@pytest.mark.django_db
def test_the_login_page_shows_the_idp_buttons_and_the_form(settings, client: Client) -> None:
    settings.SOCIALACCOUNT_PROVIDERS = OIDC_PROVIDERS
    page = client.get("/accounts/login/").content.decode()
    assert 'action="/accounts/oidc/university/login/"' in page
    assert ">Example University</button>" in page
    assert 'name="username"' in page and 'name="password"' in page and ">Log in</button>" in page


@pytest.mark.django_db
def test_local_login_can_be_turned_off(settings, client: Client) -> None:
    settings.SOCIALACCOUNT_PROVIDERS = OIDC_PROVIDERS
    settings.SSO_LOCAL_LOGIN = False
    User.objects.create_user("admin", password="pw-12345", is_staff=True)
    page = client.get("/accounts/login/").content.decode()
    assert ">Example University</button>" in page
    assert 'name="password"' not in page
    response = client.post("/accounts/login/", {"username": "admin", "password": "pw-12345"})
    assert response.status_code == 403
    assert "_auth_user_id" not in client.session


@pytest.mark.django_db
def test_local_login_still_works_by_default(client: Client) -> None:
    User.objects.create_user("admin", password="pw-12345", is_staff=True)
    response = client.post("/accounts/login/", {"username": "admin", "password": "pw-12345"})
    assert response.status_code == 302 and response.headers["location"] == "/"
    assert client.get("/").status_code == 200
    logout = client.post("/accounts/logout/")
    assert logout.status_code == 302 and logout.headers["location"] == "/accounts/login/"
