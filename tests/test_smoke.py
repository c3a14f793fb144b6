from __future__ import annotations

from django.test import Client

from accounts.models import User
from machines.models import Machine


def test_it_lists_machines_for_a_token_user(owner_client: Client, machine: Machine) -> None:
    response = owner_client.get("/api/machines")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()] == [machine.pk]


def test_it_creates_a_session(owner_client: Client, owner: User, machine: Machine) -> None:
    response = owner_client.post("/api/sessions", {}, content_type="application/json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == "requested"
    assert body["machine"]["id"] == machine.pk
    machine.refresh_from_db()
    assert machine.status == "reserved"
