"""Tiny loopback HTTP helpers for readiness probes (no extra dependency, no thread pool)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from nexcompute_agent.aio import wait_for

MAX_RESPONSE_BYTES = 1 << 20


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago. Another process may take it before we bind it;
    callers treat a bind failure like any other start failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def http_get(
    host: str,
    port: int,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 2.0,
    max_bytes: int = MAX_RESPONSE_BYTES,
    tls: bool = False,
) -> tuple[int, bytes]:
    """GET ``path``: :func:`http_request` without a body."""
    return await http_request(
        host, port, path, headers=headers, timeout=timeout, max_bytes=max_bytes, tls=tls
    )


async def http_request(
    host: str,
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 2.0,
    max_bytes: int = MAX_RESPONSE_BYTES,
    tls: bool = False,
) -> tuple[int, bytes]:
    """``method`` ``path`` (with ``body``, if any) over HTTP/1.0; returns ``(status, body)``.
    Raises OSError or TimeoutError when nothing answers, and OSError when the answer exceeds
    ``max_bytes`` (the server is the session user's process: it must not be able to make the
    agent buffer without limit).

    ``tls``: HTTPS to our own loopback Jupyter, whose certificate names the public host, not
    127.0.0.1: encrypted, unverified (the token it carries is the session's, and the peer is
    the port we started Jupyter on)."""
    context: ssl.SSLContext | None = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

    payload = body

    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
        try:
            lines = [f"{method} {path} HTTP/1.0", f"Host: {host}:{port}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            if payload is not None:
                lines.append(f"Content-Length: {len(payload)}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (payload or b""))
            await writer.drain()
            raw = await reader.read(1 << 16)
            while chunk := await reader.read(1 << 16):
                raw += chunk
                if len(raw) > max_bytes:
                    raise OSError(f"answer from {host}:{port} exceeds {max_bytes} bytes")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise OSError(f"not an HTTP answer from {host}:{port}")
        return int(status_line[1]), body

    return await wait_for(go(), timeout)
