#!/bin/sh
# Rebuild the prebuilt JupyterLab extension from its TypeScript source:
#
#   scripts/build-labextension.sh      (make labextension)
#
# jupyter_ext/js (src/, style/) → jupyter_ext/nexcompute_jupyter/labextension/ (package.json +
# static/), which is committed: the session environment installs it without node. The core
# packages it shares with JupyterLab come from a jupyterlab Python package: JUPYTERLAB_CORE, or
# the session environment's (NEXCOMPUTE_SESSION_ENV, make session-env).
set -eu
cd "$(dirname "$0")/../jupyter_ext/js"
if [ -z "${JUPYTERLAB_CORE:-}" ]; then
    ENV=${NEXCOMPUTE_SESSION_ENV:-/var/tmp/nexcompute-session-env}
    JUPYTERLAB_CORE=$("$ENV/bin/python" -c 'import jupyterlab, os; print(os.path.join(os.path.dirname(jupyterlab.__file__), "staging"))')
fi
export JUPYTERLAB_CORE
npm ci --no-audit --no-fund
rm -rf lib ../nexcompute_jupyter/labextension
npm run build
echo "built jupyter_ext/nexcompute_jupyter/labextension (commit it)"
