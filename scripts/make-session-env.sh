#!/bin/sh
# Build the read-only Python environment that Jupyter sessions run from:
#
#   scripts/make-session-env.sh DIR
#
# The recipe ships inside the agent package (`nexcompute-agent install` runs the same one from
# an installed wheel); this wrapper keeps the old path for `make session-env` and the tests.
exec sh "$(dirname "$0")/../agent/nexcompute_agent/data/make-session-env.sh" "$@"
