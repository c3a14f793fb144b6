"""NexCompute's part inside a session's Jupyter (installed into the session environment by
``scripts/make-session-env.sh``).

- :mod:`.door`: the one-time codes the Nexus mints and Jupyter redeems (stdlib only; the Nexus
  imports it too).
- :mod:`.access`: the Cloudflare Access JWT check (``Cf-Access-Jwt-Assertion``).
- :mod:`.identity`: the Jupyter identity provider that puts both at Jupyter's door; selected
  with ``--ServerApp.identity_provider_class=nexcompute_jupyter.identity.NexusIdentityProvider``.
- :mod:`.server`: the server extension (``/nexcompute/api/…``: lease, Extend, activity, save
  before the stop, workspace download), enabled as ``nexcompute_jupyter`` in
  ``ServerApp.jpserver_extensions``; and the prebuilt JupyterLab extension in ``labextension/``
  (source in ``jupyter_ext/js``), installed to ``share/jupyter/labextensions/nexcompute-jupyter``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "nexcompute_jupyter"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "nexcompute-jupyter"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from nexcompute_jupyter.server import load  # jupyter_server only where it runs

    load(serverapp)
