"""The session environment: the read-only Python environment Jupyter sessions run from.

Its recipe (``data/make-session-env.sh``: a venv of Debian's ``/usr/bin/python3`` with pinned
JupyterLab, ipykernel and jupyter-archive, world-readable) ships inside the agent package, so an
agent installed from the wheel builds the same environment a checkout does.
"""

from __future__ import annotations

import os
import subprocess
from importlib import resources
from pathlib import Path

DEFAULT_DIR = Path("/opt/nexcompute/session-env")
STAMP = ".nexcompute-session-env"
ENV_VAR = "NEXCOMPUTE_SESSION_ENV"
BUILD_TIMEOUT = 1800.0


def recipe() -> Path:
    """The packaged build script."""
    return Path(str(resources.files("nexcompute_agent") / "data" / "make-session-env.sh"))


def looks_usable(path: Path) -> bool:
    """A built environment: its ``jupyter`` and ``jupyter-lab`` are executable files."""
    return all(os.access(path / "bin" / exe, os.X_OK) for exe in ("jupyter", "jupyter-lab"))


def find(given: str | None = None) -> Path | None:
    """The environment to use: ``given`` (only if usable), else ``$NEXCOMPUTE_SESSION_ENV``,
    else :data:`DEFAULT_DIR`, whichever is built. None: there is none on this host."""
    if given:
        path = Path(given).absolute()
        return path if looks_usable(path) else None
    for candidate in (os.environ.get(ENV_VAR), str(DEFAULT_DIR)):
        if candidate and looks_usable(Path(candidate)):
            return Path(candidate).absolute()
    return None


def jupyter_command(env: Path) -> list[str]:
    return [str(env / "bin" / "jupyter"), "lab"]


def build(path: Path, *, timeout: float = BUILD_TIMEOUT) -> None:
    """Build (or bring up to date) the environment at ``path`` with the packaged recipe.
    Raises ``subprocess.CalledProcessError``/``TimeoutExpired``/``OSError`` on failure."""
    subprocess.run(  # noqa: S603
        ["sh", str(recipe()), str(path)],  # noqa: S607
        check=True,
        timeout=timeout,
    )
