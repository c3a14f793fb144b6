"""Keeps a session program's output (stdin) in a size-capped file, as its own process.

Started by :class:`~nexcompute_agent.sessions.process.ManagedProcess` with the read end of the
program's stdout/stderr pipe as stdin, in its own session: it outlives an agent that is
upgraded, restarted or killed (``kill -9``), so Jupyter and cloudflared never write into a pipe
with no reader (SIGPIPE ends a Go program such as cloudflared at once; Python programs lose
their log). It ends by itself when the last writer closes the pipe (the program and all its
children are gone). Imports nothing of the package: ``python -I -S logkeeper.py PATH LIMIT``.
"""

from __future__ import annotations

import os
import signal
import sys


def keep(fd: int, path: str, limit: int) -> None:
    """Copy what arrives on ``fd`` into ``path`` until every writer closed it, keeping the file
    under ``limit`` bytes (older output is dropped): a session's program cannot fill the host
    disk through its log."""
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    size = 0
    try:
        while chunk := os.read(fd, 65536):
            if size + len(chunk) > limit:
                os.ftruncate(out, 0)
                os.lseek(out, 0, os.SEEK_SET)
                size = os.write(out, b"[earlier output dropped]\n")
            size += os.write(out, chunk[-limit // 2 :])
    finally:
        os.close(out)


def main(argv: list[str]) -> int:
    # The agent's stop signals are for the programs, not for the keeper of their last words:
    # it ends when they are gone (end of file).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keep(0, argv[1], int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
