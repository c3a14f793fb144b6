"""Sessions: JupyterLab for a student on this machine, and a verified wipe when it ends."""

from __future__ import annotations

from nexcompute_agent.sessions.manager import SessionManager, SessionRefused

__all__ = ["SessionManager", "SessionRefused"]
