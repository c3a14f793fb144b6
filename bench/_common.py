"""What the benchmarks share: a throw-away PostgreSQL database next to ``DATABASE_URL``,
Django set up on it, and a logged-in browser session for the dashboard socket."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def bench_database_url(suffix: str) -> str:
    """``DATABASE_URL`` with ``_<suffix>`` added to the database name (exits if not PostgreSQL)."""
    base = os.environ.get("DATABASE_URL", "")
    if not base.startswith("postgres"):
        sys.exit(f"{Path(sys.argv[0]).name} needs DATABASE_URL pointing at PostgreSQL")
    parts = urlsplit(base)
    name = parts.path.lstrip("/") or "nexcompute"
    return urlunsplit(parts._replace(path=f"/{name}_{suffix}"))


def _admin(url: str, sql: str) -> None:
    import psycopg

    parts = urlsplit(url)
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as conn:
        conn.execute(sql)


def drop_database(url: str) -> None:
    _admin(url, f'DROP DATABASE IF EXISTS "{urlsplit(url).path.lstrip("/")}" WITH (FORCE)')


def fresh_django(url: str) -> None:
    """Drop and create the database at ``url``, set Django up on it and migrate."""
    drop_database(url)
    _admin(url, f'CREATE DATABASE "{urlsplit(url).path.lstrip("/")}"')
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nexcompute.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def browser_session(user: Any) -> str:
    """The key of a logged-in Django session for ``user`` (the dashboard socket's cookie)."""
    from django.contrib.sessions.backends.db import SessionStore

    store = SessionStore()
    store["_auth_user_id"] = str(user.pk)
    store["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
    store["_auth_user_hash"] = user.get_session_auth_hash()
    store.create()
    return str(store.session_key)
