"""What this operating system lets the agent do.

The agent reports specs, metrics and presence on Linux, Windows and macOS, but runs sessions
only on Linux: the sandbox (bubblewrap, namespaces, cgroups, loop-mounted workspaces) and the
wipe's proof are Linux facilities. Everything POSIX- or Linux-only (``pwd``, ``grp``,
``resource``, ``fcntl``, ``termios``, libc through ``ctypes``) is imported inside the functions
that use it, so ``import nexcompute_agent`` and ``nexcompute-agent probe`` work everywhere
(``agent/tests/test_foreign_os.py`` proves it with those modules made unavailable).
"""

from __future__ import annotations

import sys


def sessions_unsupported() -> str | None:
    """Why this host cannot run sessions, or None on Linux."""
    if sys.platform.startswith("linux"):
        return None
    name = {"win32": "Windows", "darwin": "macOS"}.get(sys.platform, sys.platform)
    return (
        f"sessions run only on Linux; this {name} machine reports its specs, metrics and "
        "presence but is never lent out"
    )
