#!/usr/bin/env python
"""Wipe time: a session whose workspace holds 100,000 small files, from `session.stop` to the
verified receipt (the sandbox ended, the workspace removed, the account proved clean).

    .venv/bin/python bench/wipe.py [--files 100000] [--runs 3]

Run as root (sessions run as a session account in their sandbox; one is created here and removed
after). The agent's session manager runs in this process with the stand-in Jupyter
(agent/tests/bin/fake-jupyter); the files are written by the session account itself. Two
workspaces are measured: the size-capped one (a loop-mounted ext4 image, the default where the
host can) and the plain folder (hosts without loop devices), which the iterative remover walks.
Prints each median. Target: < 10 s. Local only, bounded, stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "agent"))

from nexcompute_agent.config import config_from_dict  # noqa: E402
from nexcompute_agent.protocol import SessionStart, SessionStop  # noqa: E402
from nexcompute_agent.sessions import SessionManager  # noqa: E402
from nexcompute_agent.sessions.accounts import create_accounts, remove_accounts  # noqa: E402

USER = "nxs-wipebench"
FAKE = ROOT / "agent" / "tests" / "bin" / "fake-jupyter"
WRITER = """
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for d in range(n // 1000 + 1):
    os.makedirs(f"{root}/d{d}", exist_ok=True)
for i in range(n):
    with open(f"{root}/d{i // 1000}/f{i}", "w") as fh:
        fh.write("x" * 16)
"""


async def one(workspace_gb: float, files: int, work: Path, sid: int) -> tuple[float, Any]:
    sent: list[Any] = []
    config = config_from_dict({
        "server": "http://127.0.0.1:1", "credential": "x", "workspace_root": str(work / "ws"),
        "state_dir": str(work / "state"), "session_user": USER,
        "jupyter_command": [str(FAKE), "lab"], "session_workspace_gb": workspace_gb,
        "session_stop_grace": 1,
    })  # fmt: skip
    mgr = SessionManager(config, lambda m: sent.append(m) or True)
    mgr.start(SessionStart(msgid="b", session_id=sid, token="t" * 32, duration_seconds=600))

    async def first(kind: str) -> Any:
        while True:
            for m in sent:
                if m.type == kind:
                    return m
                if m.type == "session.failed":
                    raise SystemExit(f"session failed: {m.error}")
            await asyncio.sleep(0.01)

    await asyncio.wait_for(first("session.ready"), 60)
    ws = work / "ws" / str(sid)
    import pwd

    pw = pwd.getpwnam(USER)
    await asyncio.to_thread(
        subprocess.run,
        ["/usr/bin/python3", "-c", WRITER, str(ws / "many"), str(files)],
        user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], check=True, timeout=600,
    )  # fmt: skip
    t0 = time.monotonic()
    mgr.stop(SessionStop(msgid="s", session_id=sid, reason="bench"))
    receipt = await asyncio.wait_for(first("session.receipt"), 600)
    took = time.monotonic() - t0
    await mgr.wait_idle()
    if not receipt.verified:
        raise SystemExit(
            f"unverified wipe: {[c for c in receipt.checks if not c.ok]} {receipt.details}"
        )
    return took, receipt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the session runs as a session account this script creates")
    if not 1 <= args.runs <= 20 or not 1 <= args.files <= 1_000_000:
        sys.exit("--runs must be 1..20 and --files 1..1000000")
    create_accounts([USER])
    work = Path(tempfile.mkdtemp(prefix="nexcompute-wipebench-", dir="/var/tmp"))
    work.chmod(0o711)
    try:
        sid = 1
        for label, gb in (("size-capped workspace (loop-mounted ext4)", 2.0),
                          ("plain workspace folder", 0.0)):  # fmt: skip
            times = []
            for run in range(args.runs):
                took, receipt = asyncio.run(one(gb, args.files, work, sid))
                sid += 1
                times.append(took)
                print(f"{label}: run {run + 1}: {took:.2f} s, {receipt.files_removed} entries, "
                      f"{receipt.bytes_removed} bytes, checks "
                      f"{','.join(c.name for c in receipt.checks)}", flush=True)  # fmt: skip
            print(f"wipe of {args.files} files, {label}: median {statistics.median(times):.2f} s "
                  f"over {args.runs} runs (target < 10 s)", flush=True)  # fmt: skip
    finally:
        subprocess.run(["pkill", "-KILL", "-u", USER], check=False)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if line.split()[4].startswith(f"{work}/"):  # a run that failed half-way
                subprocess.run(["umount", "-l", line.split()[4]], check=False)
        remove_accounts([USER])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
