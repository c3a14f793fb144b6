"""The nexcompute-jupyter server extension's handlers (``/nexcompute/api/…``) in a real
``jupyter lab`` from the session environment, configured by the agent's own
``write_server_config``, against a real Nexus (daphne on the test database): the lease and
Extend through the session capability, the user's activity (and that polling is none), the stop
handshake, the workspace zip, and the end."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import secrets
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from accounts.models import User
from nexcompute_agent.protocol import SessionStart
from nexcompute_agent.sessions.jupyter import JupyterSpec, jupyter_argv, write_server_config
from nexcompute_agent.sessions.warm import WARM_BASE, handover_path, write_handover
from sessions.models import ComputeSession
from sessions.services import session_mark_running, session_request, session_start_command
from tests.factories import MachineFactory, record_receipt
from tests.procs import ProcessSet, free_port, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(180),
]


class Lab:
    def __init__(self, base: str, token: str, session: ComputeSession, workspace: Path) -> None:
        self.base = base
        self.token = token
        self.session = session
        self.workspace = workspace
        self.start: SessionStart | None = None
        self.nexus_url = ""

    def call(self, method: str, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.base}/nexcompute/api/{path}",
            headers={"Authorization": f"token {self.token}"},
            json=body,
            timeout=kw.pop("timeout", 30),
            **kw,
        )


def start_lab(
    procs: ProcessSet, session_env: Path, tmp_path: Path, owner: User, *, warm: bool = False
) -> Lab:
    """A session's Jupyter as the agent starts it. ``warm``: as a warm sandbox is built (its
    own token, a warm id, no capability, a hand-over file to watch), not yet handed over; the
    Lab's token is then the warm one, and the session's start command is ``lab.start``."""
    _, nexus_port = procs.daphne()
    machine = MachineFactory()
    session = session_request(user=owner, machine_id=machine.pk, duration_minutes=60)
    start = session_start_command(session_id=session.pk)
    assert start is not None and start.capability
    workspace = tmp_path / "ws"
    (workspace / ".jupyter").mkdir(parents=True)
    port = free_port()
    token = "warm-" + secrets.token_urlsafe(16) if warm else start.token
    spec = JupyterSpec(
        command=[str(session_env / "bin" / "jupyter"), "lab"],
        workspace=str(workspace),
        port=port,
        bind_host="127.0.0.1",
        token=token,
        terminals=False,
        remote=False,
        trust_xheaders=False,
        user="student",
        shell="/bin/sh",
        session_id=WARM_BASE + 7 if warm else session.pk,
        nexus_url="" if warm else f"http://127.0.0.1:{nexus_port}",
        capability=None if warm else start.capability,
        handover_file=handover_path(str(workspace)) if warm else "",
    )
    write_server_config(spec, None, None)
    env = {
        "JUPYTER_CONFIG_DIR": str(workspace / ".jupyter"),
        "JUPYTER_DATA_DIR": str(workspace / ".local/share/jupyter"),
        "JUPYTER_RUNTIME_DIR": str(workspace / ".local/share/jupyter/runtime"),
        "HOME": str(workspace),
    }
    proc = procs.start("jupyter", [*jupyter_argv(spec), "--allow-root"], **env)
    base = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: httpx.get(f"{base}/api/status", headers={"Authorization": f"token {token}"})
        .status_code == 200 or (not proc.alive() and pytest.fail(proc.log()[-2000:])),
        timeout=60,
        what="jupyter up",
    )  # fmt: skip
    if not warm:
        assert session_mark_running(session=session, url=f"{base}/lab")
        session.refresh_from_db()
    lab = Lab(base, token, session, workspace)
    lab.start = start
    lab.nexus_url = f"http://127.0.0.1:{nexus_port}"
    return lab


@pytest.fixture
def lab(procs: ProcessSet, session_env: Path, tmp_path: Path, owner: User) -> Lab:
    return start_lab(procs, session_env, tmp_path, owner)


def test_it_reads_and_extends_the_lease_through_the_nexus(lab: Lab) -> None:
    # Jupyter's own auth guards it: nothing without the cookie or token.
    assert httpx.get(f"{lab.base}/nexcompute/api/lease").status_code == 403

    first = lab.call("GET", "lease")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["session_id"] == lab.session.pk
    assert body["stopping"] is False and body["ended"] is False
    lease = body["lease"]
    assert lease["state"] == "running"
    assert lease["machine"]["name"] == lab.session.machine.name
    # JSON carries milliseconds; the row, microseconds.
    expires = dt.datetime.fromisoformat(lease["expires_at"])
    assert abs(expires - lab.session.expires_at) < dt.timedelta(milliseconds=1)
    assert lease["extend"]["default_minutes"] == 30

    extended = lab.call("POST", "extend", {"minutes": 30})
    assert extended.status_code == 200, extended.text
    row = ComputeSession.objects.get(pk=lab.session.pk)
    assert row.expires_at - lab.session.expires_at == dt.timedelta(minutes=30)
    # The lease the Lab reads next is the new one (the cache took the answer).
    assert lab.call("GET", "lease").json()["lease"]["expires_at"] == extended.json()["expires_at"]
    # Refusals carry the Nexus's reason; bad input is a 400 with a detail.
    refused = lab.call("POST", "extend", {"minutes": 900})
    assert refused.status_code == 409 and "at most" in refused.json()["detail"]
    for bad in ({"minutes": "30"}, {"minutes": 0}, {}, ["x"]):
        resp = lab.call("POST", "extend", bad)
        assert resp.status_code == 400 and "minutes" in resp.json()["detail"], bad


def test_a_warm_sandbox_takes_the_sessions_capability_at_hand_over(
    procs: ProcessSet, session_env: Path, tmp_path: Path, owner: User
) -> None:
    """A warm sandbox's Jupyter starts before any session: its extension knows no session and
    holds no capability. The hand-over file the agent writes gives it the session's, so the
    in-Lab time left and Extend work after a warm hand-over as after a cold start."""
    lab = start_lab(procs, session_env, tmp_path, owner, warm=True)
    start = lab.start
    assert start is not None and start.capability
    before = lab.call("GET", "lease").json()
    assert before["session_id"] == WARM_BASE + 7 and before["lease"] is None
    assert "without a NexCompute session capability" in before["error"]
    assert lab.call("POST", "extend", {"minutes": 30}).status_code == 503

    # The agent's hand-over: what SessionManager's warm pool writes (warm.py, hand_over).
    write_handover(
        lab.workspace / ".jupyter",
        {"token": start.token, "session_id": lab.session.pk, "nexus_url": lab.nexus_url,
         "access_team_domain": "", "access_audience": "", "access_email": "",
         "capability": start.capability},
        None,
        None,
    )  # fmt: skip
    warm_token, lab.token = lab.token, start.token
    assert session_mark_running(session=lab.session, url=f"{lab.base}/lab")
    lab.session.refresh_from_db()

    after = lab.call("GET", "lease")
    assert after.status_code == 200, after.text
    body = after.json()
    assert body["session_id"] == lab.session.pk and body["error"] is None
    assert body["lease"]["state"] == "running"
    extended = lab.call("POST", "extend", {"minutes": 30})
    assert extended.status_code == 200, extended.text
    row = ComputeSession.objects.get(pk=lab.session.pk)
    assert row.expires_at - lab.session.expires_at == dt.timedelta(minutes=30)
    # The warm token opens nothing now, the extension's API neither.
    lab.token = warm_token
    assert lab.call("GET", "lease").status_code == 403


def test_interaction_is_activity_and_polling_is_not(lab: Lab) -> None:
    headers = {"Authorization": f"token {lab.token}"}
    assert lab.call("GET", "activity").json() == {"last_interaction": None}
    before = httpx.get(f"{lab.base}/api/status", headers=headers).json()["last_activity"]
    for _ in range(3):
        assert lab.call("GET", "lease").status_code == 200
        assert lab.call("GET", "activity").status_code == 200
    # Jupyter's own clock did not move for our polling.
    assert httpx.get(f"{lab.base}/api/status", headers=headers).json()["last_activity"] == before

    assert lab.call("POST", "activity").status_code == 204
    last = lab.call("GET", "activity").json()["last_interaction"]
    assert last.endswith("Z")
    at = dt.datetime.fromisoformat(last)
    assert abs((dt.datetime.now(dt.UTC) - at).total_seconds()) < 5


def test_the_stop_waits_for_the_labs_save_only_when_a_lab_is_open(lab: Lab) -> None:
    # No Lab tab has polled: the stop does not wait.
    t0 = time.monotonic()
    alone = lab.call("POST", "stopping", {"wait": 5})
    assert alone.json() == {"frontend": False, "saved": False}
    assert time.monotonic() - t0 < 2

    # A Lab tab polls, learns the session is stopping, and saves: the stop waits for that.
    polled = lab.call("GET", "lease").json()
    assert polled["stopping"] is True
    answer: dict[str, Any] = {}

    def stop() -> None:
        answer.update(lab.call("POST", "stopping", {"wait": 10}).json())

    waiter = threading.Thread(target=stop)
    t0 = time.monotonic()
    waiter.start()
    time.sleep(0.5)  # the agent's stop is waiting now (it would answer at once otherwise)
    assert waiter.is_alive()
    assert lab.call("POST", "saved").status_code == 204
    waiter.join(timeout=10)
    assert answer == {"frontend": True, "saved": True}
    assert time.monotonic() - t0 < 5
    assert lab.call("POST", "stopping", {"wait": "x"}).status_code == 400


def test_a_lab_that_never_saves_holds_the_stop_only_for_the_wait(lab: Lab) -> None:
    assert lab.call("GET", "lease").status_code == 200  # a Lab tab is there
    t0 = time.monotonic()
    answer = lab.call("POST", "stopping", {"wait": 1.5}).json()
    took = time.monotonic() - t0
    assert answer == {"frontend": True, "saved": False}
    assert 1.4 < took < 4


def test_it_zips_the_workspace_without_hidden_files_or_links(lab: Lab) -> None:
    ws = lab.workspace
    nb = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (ws / "work.ipynb").write_text(json.dumps(nb))
    (ws / "data").mkdir()
    (ws / "data" / "big.bin").write_bytes(os.urandom(3 << 20))  # spans several chunks
    (ws / ".secret").write_text("hidden")
    os.symlink("/etc/passwd", ws / "passwd-link")

    resp = lab.call("GET", "download", timeout=60)

    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/zip"
    assert "attachment" in resp.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
        names = set(zf.namelist())
        assert zf.testzip() is None
        assert json.loads(zf.read("work.ipynb")) == nb
        assert zf.read("data/big.bin") == (ws / "data" / "big.bin").read_bytes()
    assert "work.ipynb" in names and "data/big.bin" in names
    # The server's config (token, capability) and the link stay out.
    assert not [n for n in names if n.startswith(".") or "/." in n or "passwd" in n], names
    assert httpx.get(f"{lab.base}/nexcompute/api/download").status_code in (302, 403)


def test_after_the_end_the_lab_learns_it_is_over(lab: Lab) -> None:
    assert lab.call("GET", "lease").json()["ended"] is False
    session = lab.session
    from sessions.services import session_stop
    from sessions.states import EndReason

    session_stop(session=session, reason=EndReason.USER, actor=session.owner)
    record_receipt(session)
    # The cached lease expires within seconds; then the Nexus refuses the dead capability.
    ended = wait_for(
        lambda: (b := lab.call("GET", "lease").json())["ended"] and b, timeout=15, what="ended"
    )
    assert ended["error"] == "this session has ended"
    refused = lab.call("POST", "extend", {"minutes": 30})
    assert refused.status_code == 401
