"""NexCompute's part inside a session's Jupyter (installed into the session environment by
``scripts/make-session-env.sh``).

- :mod:`.door`: the one-time codes the Nexus mints and Jupyter redeems (stdlib only; the Nexus
  imports it too).
- :mod:`.access`: the Cloudflare Access JWT check (``Cf-Access-Jwt-Assertion``).
- :mod:`.identity`: the Jupyter identity provider that puts both at Jupyter's door; selected
  with ``--ServerApp.identity_provider_class=nexcompute_jupyter.identity.NexusIdentityProvider``.
"""

from __future__ import annotations

__version__ = "0.1.0"
