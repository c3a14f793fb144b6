"""One session with the real `jupyter lab`, from a session environment the session user can
run (built once by scripts/make-session-env.sh and reused), as a real unprivileged user."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from conftest import Sent, needs_root, session_config
from tests.kernel import http, run_code

from nexcompute_agent.protocol import SessionStart, SessionStop
from nexcompute_agent.sessions import SessionManager
from nexcompute_agent.sessions.cleanup import user_processes
from nexcompute_agent.sessions.wiper import Account, find_owned

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [needs_root, pytest.mark.timeout(600)]

TOKEN = "real-" + uuid.uuid4().hex

KERNEL_CODE = """
import os, subprocess
open(os.path.expanduser('~/from-kernel.txt'), 'w').write('hello' * 100)
open('/tmp/nexsess-real-kernel.txt', 'w').write('temp')
subprocess.Popen(['sleep', '300'], start_new_session=True)  # leaves the process group
os.system('(setsid sleep 301 &) ')                           # double-forked daemon
print('uid', os.getuid())
"""


async def test_real_jupyter_lab_session_end_to_end(
    tmp_path: Path, workspace_root: Path, session_user: str, session_env: Path
) -> None:
    import pwd

    uid = pwd.getpwnam(session_user).pw_uid
    config = session_config(
        tmp_path, workspace_root, session_user,
        jupyter_command=[str(session_env / "bin" / "jupyter"), "lab"],
        jupyter_start_timeout=60, session_stop_grace=3,
        session_max_processes=256, activity_seconds=0.3,
    )  # fmt: skip
    sent = Sent()
    mgr = SessionManager(config, sent)
    mgr.start(SessionStart(msgid="r1", session_id=42, token=TOKEN, duration_seconds=600))
    failed_or_ready = await asyncio.wait_for(_first(sent, ("session.ready", "session.failed")), 90)
    assert failed_or_ready.type == "session.ready", failed_or_ready
    url = failed_or_ready.url
    base = url.split("/lab?")[0]
    assert url == f"{base}/lab?token={TOKEN}"

    # session.activity: right after ready, then every activity_seconds; the agent's own polls
    # of /api/status and /api/kernels move nothing: untouched, the session is idle since its
    # start. (Right after the start, helpers Jupyter ran and reaped while starting may still
    # show as the session's CPU: "cpu" then, never a kernel, terminal or Lab.)
    first = await sent.wait("session.activity", timeout=10)
    assert first.session_id == 42 and first.last_activity is not None
    assert (first.kernels_busy, first.connections) == (0, 0)
    assert first.source == "start"
    third = await sent.wait("session.activity", count=3, timeout=10)
    assert third.source in ("start", "cpu") and third.cpu_percent is not None

    status, info = await asyncio.to_thread(http, "GET", f"{base}/api/status", TOKEN)
    assert status == 200 and "started" in info
    with pytest.raises(urllib.error.HTTPError):
        await asyncio.to_thread(http, "GET", f"{base}/api/contents", "wrong-token")
    nb = {"type": "notebook", "content": {"cells": [], "metadata": {}, "nbformat": 4,
                                          "nbformat_minor": 5}}  # fmt: skip
    status, _ = await asyncio.to_thread(http, "PUT", f"{base}/api/contents/t.ipynb", TOKEN, nb)
    assert status in (200, 201)
    assert (workspace_root / "42" / "t.ipynb").stat().st_uid == uid
    status, kernel = await asyncio.to_thread(
        http, "POST", f"{base}/api/kernels", TOKEN, {"name": "python3"}
    )
    assert status == 201
    output = await run_code(base, TOKEN, kernel["id"], KERNEL_CODE)
    assert f"uid {uid}" in output
    n = len(sent.of("session.activity"))
    later = await sent.wait("session.activity", count=n + 1, timeout=10)
    assert later.last_activity > first.last_activity  # the kernel's execution counts
    assert later.source in ("kernel", "cpu")  # (starting the kernel used CPU just now)
    await asyncio.sleep(0.3)
    assert len(user_processes(uid)) >= 4  # jupyter, kernel, two sleeps

    mgr.stop(SessionStop(msgid="r2", session_id=42, reason="test over"))
    receipt = await sent.wait("session.receipt", timeout=60)
    assert receipt.verified, receipt.details
    assert receipt.files_removed > 0 and receipt.processes_killed >= 4
    assert not user_processes(uid)
    assert find_owned(Account(name=session_user, uid=uid, gid=uid)) == ([], None)
    assert not (workspace_root / "42").exists()


async def _first(sent: Sent, types: tuple[str, ...]) -> Any:
    while True:
        for m in sent.messages:
            if m.type in types:
                return m
        await asyncio.sleep(0.05)
