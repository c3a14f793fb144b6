"""The agent imports, probes and refuses sessions on Windows and macOS.

Those systems are not available here, so a child Python plays one: the POSIX-only modules
(``pwd``, ``grp``, ``resource``, ``fcntl``, ``termios``, ``pty``) are made unimportable by a
meta-path blocker and ``sys.platform`` says ``win32`` or ``darwin``. Third-party packages that
ship per-platform builds (psutil, pydantic, websockets) and the stdlib's own platform layers
(asyncio) are imported first, as the real platform's builds would be.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

CHILD = textwrap.dedent(
    """
    import asyncio, importlib, importlib.abc, json, pkgutil, sys
    import psutil, pydantic, websockets.asyncio.client  # the platform's own builds
    import pydantic.types, pydantic.type_adapter, sysconfig, zoneinfo
    sysconfig.get_config_vars()  # the stdlib reads its build of the real platform once

    BLOCKED = {"pwd", "grp", "resource", "fcntl", "termios", "pty"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: not {PLATFORM})")
            return None

    PLATFORM = sys.argv[1]
    for mod in BLOCKED:
        sys.modules.pop(mod, None)
    sys.meta_path.insert(0, Blocker())
    try:
        import pwd  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not block")
    sys.platform = PLATFORM

    import nexcompute_agent
    root = __import__("pathlib").Path(nexcompute_agent.__file__).parent
    names = sorted(
        "nexcompute_agent." + ".".join(p.relative_to(root).with_suffix("").parts)
        for p in root.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")  # __main__ runs the command line
    )
    for name in names:
        importlib.import_module(name)
    print(json.dumps({"imported": names}))

    from nexcompute_agent.cli import main
    rc = main(["probe", "--config", sys.argv[2]])
    print(json.dumps({"probe_rc": rc}))

    from nexcompute_agent.config import load_config
    from nexcompute_agent.protocol import SessionStart
    from nexcompute_agent.sessions import SessionManager, SessionRefused
    manager = SessionManager(load_config(__import__("pathlib").Path(sys.argv[2]),
                                         require_credential=False), lambda m: True)
    try:
        manager.start(SessionStart(msgid="m1", session_id=1, token="t", duration_seconds=60))
    except SessionRefused as exc:
        print(json.dumps({"refused": str(exc)}))
    """
)


@pytest.mark.parametrize(("platform", "name"), [("win32", "Windows"), ("darwin", "macOS")])
def test_agent_imports_probes_and_refuses_sessions(
    platform: str, name: str, tmp_path: Path
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'server = "http://127.0.0.1:9"\nworkspace_root = "{tmp_path}/ws"\n'
        f'state_dir = "{tmp_path}/state"\n'
    )
    done = subprocess.run(
        [sys.executable, "-c", CHILD, platform, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    imported = json.loads(out.splitlines()[0])["imported"]
    assert "nexcompute_agent.sessions.manager" in imported and "nexcompute_agent.cli" in imported
    # The probe's JSON follows: specs, metrics and presence of this host.
    probe_text = out[out.index("\n") + 1 : out.index('{"probe_rc"')]
    probe = json.loads(probe_text)
    assert probe["specs"]["cpu_count"] >= 1 and probe["specs"]["memory_bytes"] > 0
    assert 0 <= probe["metrics"]["memory_percent"] <= 100
    assert isinstance(probe["owner_present"], bool) and probe["presence_source"] == "users"
    assert probe["sessions"].startswith(f"sessions run only on Linux; this {name} machine")
    assert "sandbox" not in probe
    assert '{"probe_rc": 0}' in out
    refused = json.loads(out.strip().splitlines()[-1])["refused"]
    assert f"this {name} machine" in refused
