"""The real-process fixtures of tests/conftest.py (``live_env``, ``procs``) for this app's
integration tests, and the report hook that prints the processes' logs when one fails."""

from __future__ import annotations

from tests.conftest import live_env, procs, pytest_runtest_makereport

__all__ = ["live_env", "procs", "pytest_runtest_makereport"]
