"""NexCompute lab-computer agent. Never imports Django."""

from __future__ import annotations

__version__ = "0.1.0"
