"""SAML single sign-on against a real pysaml2 IdP (signing with xmlsec1, RSA-SHA256) and a real
site (daphne), through the real HTTP flow: the login button, the IdP's redirect binding and login
form, the auto-posted Response to the ACS, and a Django session checked against the database.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import urlsplit

import httpx
import pytest
from allauth.socialaccount.models import SocialAccount

from accounts.models import User
from accounts.tests.conftest import SamlSite
from tests.idp import find_form, submit

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BUTTON = "Test University SAML"
SIGNATURE = re.compile(r"<(\w+:)?Signature\b.*?</\1Signature>", re.DOTALL)


def http() -> httpx.Client:
    return httpx.Client(follow_redirects=True, timeout=30)


def idp_response_form(client: httpx.Client, site: SamlSite, username: str, password: str):
    """Log in at the IdP; return (page, form) of the auto-posting form carrying SAMLResponse,
    or of the IdP's login form when it refused the password."""
    page = client.get(f"{site.url}/")
    assert urlsplit(str(page.url)).path == "/accounts/login/", page.url
    idp_page = submit(client, page, find_form(page, button=BUTTON), button=BUTTON)
    assert idp_page.url.host == "localhost", (idp_page.url, idp_page.text[:2000])
    answer = submit(
        client, idp_page, find_form(idp_page, has="password"), username=username, password=password
    )
    assert answer.url.host == "localhost"
    for field in ("SAMLResponse", "password"):
        try:
            return answer, find_form(answer, has=field)
        except AssertionError:
            continue
    raise AssertionError(answer.text[:2000])


def saml_login(
    client: httpx.Client, site: SamlSite, username: str, password: str
) -> httpx.Response:
    page, form = idp_response_form(client, site, username, password)
    assert "SAMLResponse" in form.fields, page.text[:2000]
    assert form.action == f"{site.url}/accounts/saml/university/acs/"
    return submit(client, page, form)


def groups_of(user: User) -> set[str]:
    return set(user.groups.values_list("name", flat=True))


def assert_logged_in(client: httpx.Client, site: SamlSite, response: httpx.Response) -> None:
    assert response.status_code == 200, response.text[:2000]
    assert str(response.url) == f"{site.url}/", response.url
    again = client.get(f"{site.url}/", follow_redirects=False)
    assert again.status_code == 200, again.headers.get("location")


def assert_not_logged_in(client: httpx.Client, site: SamlSite) -> None:
    dashboard = client.get(f"{site.url}/", follow_redirects=False)
    assert dashboard.status_code == 302
    assert dashboard.headers["location"].startswith("/accounts/login/")


def test_it_serves_sp_metadata_at_the_fixed_url(saml_site: SamlSite) -> None:
    metadata = httpx.get(f"{saml_site.url}/accounts/saml/university/metadata/", timeout=10)
    assert metadata.status_code == 200
    assert f'Location="{saml_site.url}/accounts/saml/university/acs/"' in metadata.text
    assert "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST" in metadata.text


def test_it_creates_a_student_on_first_login(saml_site: SamlSite) -> None:
    with http() as client:
        assert_logged_in(client, saml_site, saml_login(client, saml_site, "bob", "bob-pw"))
    bob = User.objects.get(username="bob")
    assert (bob.email, bob.first_name, bob.last_name) == ("bob@uni.edu", "Bob", "Builder")
    assert not bob.is_staff
    assert groups_of(bob) == {"student"}
    assert SocialAccount.objects.get(user=bob).provider == "university-saml"


def test_it_reads_every_affiliation_value(saml_site: SamlSite) -> None:
    # dora's staff@uni.edu is the second value: a first-value mapping would make her a student.
    with http() as client:
        assert_logged_in(client, saml_site, saml_login(client, saml_site, "dora", "dora-pw"))
    dora = User.objects.get(username="dora")
    assert dora.is_staff and groups_of(dora) == {"staff"}


def test_it_reads_the_unscoped_affiliation(saml_site: SamlSite) -> None:
    with http() as client:
        assert_logged_in(client, saml_site, saml_login(client, saml_site, "erin", "erin-pw"))
    erin = User.objects.get(username="erin")
    assert (erin.first_name, erin.last_name) == ("Erin", "Unscoped")
    assert erin.is_staff and groups_of(erin) == {"staff"}


def test_it_resyncs_roles_on_every_login(saml_site: SamlSite) -> None:
    with http() as client:
        assert_logged_in(client, saml_site, saml_login(client, saml_site, "bob", "bob-pw"))
    assert groups_of(User.objects.get(username="bob")) == {"student"}

    saml_site.idp.set_attributes(
        "bob", eduPersonScopedAffiliation=["staff@uni.edu", "physics-gpu@uni.edu"]
    )
    with http() as client:
        assert_logged_in(client, saml_site, saml_login(client, saml_site, "bob", "bob-pw"))
    bob = User.objects.get(username="bob")
    assert bob.is_staff and groups_of(bob) == {"staff", "gpu-users"}

    saml_site.idp.set_attributes("bob", eduPersonScopedAffiliation=["student@uni.edu"])
    with http() as client:
        assert_logged_in(client, saml_site, saml_login(client, saml_site, "bob", "bob-pw"))
    bob = User.objects.get(username="bob")
    assert not bob.is_staff and groups_of(bob) == {"student"}


def test_a_wrong_password_stays_at_the_idp(saml_site: SamlSite) -> None:
    with http() as client:
        page, form = idp_response_form(client, saml_site, "bob", "wrong")
        assert "password" in form.fields and "SAMLResponse" not in form.fields
        assert "Invalid username or password" in page.text
        assert_not_logged_in(client, saml_site)
    assert not User.objects.filter(username="bob").exists()


def test_a_tampered_assertion_is_refused(saml_site: SamlSite) -> None:
    with http() as client:
        page, form = idp_response_form(client, saml_site, "bob", "bob-pw")
        xml = base64.b64decode(form.fields["SAMLResponse"]).decode()
        assert "student@uni.edu" in xml
        # Signed with RSA-SHA256 / SHA-256 (pysaml2's SHA-1 default would be refused anyway).
        assert xml.count('Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"') == 2
        assert "xmldsig#sha1" not in xml and "rsa-sha1" not in xml
        # Promote bob inside the signed assertion, as an attacker in the middle would.
        forged = xml.replace("student@uni.edu", "staff@uni.edu")
        form.fields["SAMLResponse"] = base64.b64encode(forged.encode()).decode()
        response = submit(client, page, form)
        assert "Third-Party Login Failure" in response.text
        assert_not_logged_in(client, saml_site)
    assert not User.objects.filter(username="bob").exists()
    assert not User.objects.filter(is_staff=True).exists()


def test_an_unsigned_response_is_refused(saml_site: SamlSite) -> None:
    with http() as client:
        page, form = idp_response_form(client, saml_site, "bob", "bob-pw")
        xml = base64.b64decode(form.fields["SAMLResponse"]).decode()
        # Drop every signature: the SP wants signed assertions.
        xml, removed = SIGNATURE.subn("", xml)
        assert removed == 2  # the Response's and the Assertion's
        form.fields["SAMLResponse"] = base64.b64encode(xml.encode()).decode()
        assert "Third-Party Login Failure" in submit(client, page, form).text
        assert_not_logged_in(client, saml_site)
    assert not User.objects.filter(username="bob").exists()


def test_logout_ends_the_local_session(saml_site: SamlSite) -> None:
    with http() as client:
        dashboard = saml_login(client, saml_site, "bob", "bob-pw")
        assert_logged_in(client, saml_site, dashboard)
        back = submit(client, dashboard, find_form(dashboard, button="Log out"))
        assert urlsplit(str(back.url)).path == "/accounts/login/"
        assert_not_logged_in(client, saml_site)
