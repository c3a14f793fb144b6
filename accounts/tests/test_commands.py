"""The management commands that print secrets once: createapitoken, createenrollmenttoken."""

from __future__ import annotations

import io
import shlex
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from accounts.models import ApiToken, User
from machines.models import EnrollmentToken, Lab

pytestmark = pytest.mark.django_db


def run(*args: str) -> list[str]:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue().strip().splitlines()


def test_createapitoken_prints_a_working_token_on_its_last_line(owner: User) -> None:
    lines = run("createapitoken", "owner")

    token = lines[-1]
    assert token.startswith("nxp_")
    response = Client(HTTP_AUTHORIZATION=f"Bearer {token}").get("/api/sessions")
    assert response.status_code == 200
    assert ApiToken.objects.get().user == owner
    assert not ApiToken.objects.filter(digest=token).exists()


def test_createapitoken_makes_a_new_token_each_time(owner: User) -> None:
    assert run("createapitoken", "owner")[-1] != run("createapitoken", "owner", "--name", "ci")[-1]
    assert sorted(ApiToken.objects.values_list("name", flat=True)) == ["api", "ci"]


def test_createapitoken_refuses_an_unknown_user() -> None:
    with pytest.raises(CommandError, match="no user named 'ghost'"):
        run("createapitoken", "ghost")
    assert not ApiToken.objects.exists()


def test_createenrollmenttoken_creates_the_lab_and_prints_the_command_and_token() -> None:
    lines = run("createenrollmenttoken", "--lab", "Chemistry B")

    token = lines[-1]
    assert token.startswith("nxe_")
    command = shlex.split(lines[-2])
    assert command[:2] == ["nexcompute-agent", "enroll"]
    assert command[command.index("--server") + 1] == "http://127.0.0.1:8000"
    assert f"--token={token}" in command
    lab = Lab.objects.get(name="Chemistry B")
    assert EnrollmentToken.objects.get().lab == lab
    response = Client().post(
        "/api/agents/enroll",
        {"token": token, "hostname": "chem-01"},
        content_type="application/json",
    )
    assert response.status_code == 201


def test_createenrollmenttoken_reuses_an_existing_lab_and_honours_the_ttl() -> None:
    Lab.objects.create(name="Physics")

    run("createenrollmenttoken", "--lab", "Physics", "--ttl-hours", "2")

    assert Lab.objects.filter(name="Physics").count() == 1
    row = EnrollmentToken.objects.get()
    assert 7190 <= (row.expires_at - row.created_at).total_seconds() <= 7210


@pytest.mark.parametrize("args", [["--lab", "  "], ["--lab", "X", "--ttl-hours", "0"]])
def test_createenrollmenttoken_refuses_bad_arguments(args: list[str]) -> None:
    with pytest.raises(CommandError):
        run("createenrollmenttoken", *args)
    assert not EnrollmentToken.objects.exists()


def test_createenrollmenttoken_makes_a_token_for_a_whole_lab() -> None:
    lines = run("createenrollmenttoken", "--lab", "Imaging", "--uses", "40", "--reclaim")
    assert "usable by 40 computers" in lines[0] and "take back their records" in lines[0]
    token = EnrollmentToken.objects.get()
    assert (token.max_uses, token.uses, token.reclaim) == (40, 0, True)
    for i in range(2):
        response = Client().post(
            "/api/agents/enroll",
            {"token": lines[-1], "hostname": f"img-{i}"},
            content_type="application/json",
        )
        assert response.status_code == 201, response.content


def test_createenrollmenttoken_refuses_a_nonsense_count() -> None:
    with pytest.raises(CommandError, match="uses must be between"):
        run("createenrollmenttoken", "--lab", "Imaging", "--uses", "0")


def test_createenrollmenttoken_refuses_a_mistyped_lab() -> None:
    Lab.objects.create(name="Physics 101")

    with pytest.raises(
        CommandError, match=r"no lab named 'Phsyics 101'\. Did you mean 'Physics 101'"
    ):
        run("createenrollmenttoken", "--lab", "Phsyics 101")

    assert list(Lab.objects.values_list("name", flat=True)) == ["Physics 101"]
    assert not EnrollmentToken.objects.exists()


def test_createenrollmenttoken_creates_a_new_lab_when_asked() -> None:
    Lab.objects.create(name="Physics 101")

    lines = run("createenrollmenttoken", "--lab", "Chemistry", "--create-lab")

    assert lines[-1].startswith("nxe_")
    assert EnrollmentToken.objects.get().lab.name == "Chemistry"


def test_createenrollmenttoken_prints_the_public_url(settings: Any) -> None:
    settings.NEXCOMPUTE_PUBLIC_URL = "http://127.0.0.1:8123"

    lines = run("createenrollmenttoken", "--lab", "Local lab")

    command = shlex.split(lines[-2])
    assert command[command.index("--server") + 1] == "http://127.0.0.1:8123"


def test_createenrollmenttoken_creates_a_lab_whose_name_is_no_typo() -> None:
    """CONTRACT: "The lab is created if missing" still holds for a name like no other."""
    Lab.objects.create(name="Physics 101")

    lines = run("createenrollmenttoken", "--lab", "Chemistry")

    assert lines[-1].startswith("nxe_")
    assert sorted(Lab.objects.values_list("name", flat=True)) == ["Chemistry", "Physics 101"]
