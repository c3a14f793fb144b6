"""Driving a real Jupyter server as a student's browser would: the REST API and code run in a
kernel over its websocket (the messaging protocol, v5.3). Shared by the server's end-to-end
tests and the agent's session tests."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import connect


def http(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"token {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=20) as resp:
        return resp.status, json.loads(resp.read() or b"null")


async def run_code(
    base: str, token: str, kernel_id: str, code: str, timeout: float = 60, *, leave: bool = False
) -> str:
    """Run ``code`` in the kernel; its stdout. A Python error fails the test. ``leave``: return
    ("") as soon as the kernel is executing it, and close the connection (nobody watching)."""
    host = urlsplit(base).netloc
    msg_id = uuid.uuid4().hex
    request = {
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                   "msg_type": "execute_request", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }  # fmt: skip
    out = []
    replied = done = False
    async with connect(
        f"ws://{host}/api/kernels/{kernel_id}/channels",
        additional_headers={"Authorization": f"token {token}"},
        origin=f"http://{host}",  # type: ignore[arg-type]
        max_size=None,
    ) as ws:
        await ws.send(json.dumps(request))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            state = msg["content"].get("execution_state") if msg["msg_type"] == "status" else None
            if leave and state == "busy":
                return ""
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            if msg["msg_type"] == "error":
                raise AssertionError(msg["content"])
            if msg["msg_type"] == "execute_reply":
                replied = True
            # Outputs (iopub) and the reply (shell) are not ordered against each other; the
            # kernel's "idle" on iopub comes after every output of the request.
            idle = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
            if idle:
                done = True
            if replied and done:
                return "".join(out)


async def start_kernel(base: str, token: str) -> str:
    status, kernel = await asyncio.to_thread(
        http, "POST", f"{base}/api/kernels", token, {"name": "python3"}
    )
    assert status == 201, kernel
    return str(kernel["id"])
