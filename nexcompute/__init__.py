from __future__ import annotations

from nexcompute.celery import app as celery_app

__all__ = ["celery_app"]
