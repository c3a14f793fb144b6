#!/bin/sh
# Build the read-only Python environment that Jupyter sessions run from.
#
#   sh make-session-env.sh DIR   (scripts/make-session-env.sh DIR in a checkout)
#
# It must be usable by the unprivileged session user, so it is built from Debian's
# /usr/bin/python3 (pyenv's Pythons live under /root, mode 0700, out of that user's reach) and
# made world-readable. Idempotent: an existing DIR whose jupyter-lab reports the pinned version
# is kept. Point the agent's jupyter_command at ["DIR/bin/jupyter", "lab"].
set -eu

JUPYTERLAB_VERSION=4.6.6
IPYKERNEL_VERSION=7.4.0
# Zip download of a folder (the student keeps their work before the wipe).
JUPYTER_ARCHIVE_VERSION=3.4.0  # 3.5 refuses Debian 12's Python 3.11.2
PYJWT_VERSION=2.15.1  # Cloudflare Access token check (with cryptography)
PYTHON=${SESSION_PYTHON:-/usr/bin/python3}
# NexCompute's own part (the door: identity provider), the `nexcompute-jupyter` package: a
# source folder or a wheel given in NEXCOMPUTE_JUPYTER_EXT (`nexcompute-agent install
# --jupyter-ext`), else the checkout's jupyter_ext/ (this file is agent/nexcompute_agent/data/).
EXT=${NEXCOMPUTE_JUPYTER_EXT:-$(dirname "$0")/../../../jupyter_ext}
if [ -d "$EXT" ]; then
    EXT=$(cd "$EXT" && pwd)
    # By content and name: the Python code, pyproject.toml and the prebuilt labextension and
    # settings (js/, the TypeScript source with its node_modules, is not installed).
    EXT_HASH=$(cd "$EXT" && find . \( -path ./js -o -path ./build -o -name '*.egg-info' \
        -o -name __pycache__ \) -prune -o -type f \( -name '*.py' -o -name '*.json' \
        -o -name '*.js' -o -name '*.css' -o -name pyproject.toml \) -print \
        | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
elif [ -f "$EXT" ]; then
    EXT=$(cd "$(dirname "$EXT")" && pwd)/$(basename "$EXT")
    EXT_HASH=$(sha256sum "$EXT" | cut -c1-16)
else
    echo "make-session-env: the nexcompute-jupyter package was not found at $EXT;" \
        "give its wheel (make dist builds it) in NEXCOMPUTE_JUPYTER_EXT" >&2
    exit 2
fi
# What the stamp says: the pins, NexCompute's package (by content), and that students'
# `pip install --user` works (user site on).
STAMP="jupyterlab==$JUPYTERLAB_VERSION ipykernel==$IPYKERNEL_VERSION jupyter-archive==$JUPYTER_ARCHIVE_VERSION pyjwt==$PYJWT_VERSION nexcompute-jupyter@$EXT_HASH user-site"

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
DIR=$1

up_to_date() {
    if [ -x "$DIR/bin/jupyter-lab" ] && [ -f "$DIR/.nexcompute-session-env" ] \
        && [ "$(cat "$DIR/.nexcompute-session-env")" = "$STAMP" ] \
        && "$DIR/bin/jupyter-lab" --version >/dev/null 2>&1; then
        echo "session environment $DIR is up to date (jupyterlab $JUPYTERLAB_VERSION)"
        return 0
    fi
    return 1
}

# Checked before the lock too: using an environment needs no write access to its directory.
if up_to_date; then
    exit 0
fi
# One builder at a time (the tests, `make test` and `make run` may all ask at once): the others
# wait here, then find the environment up to date.
mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9
if up_to_date; then
    exit 0
fi

if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
    echo "installing python3-venv (needed by $PYTHON -m venv)" >&2
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi

umask 022
rm -rf "$DIR.tmp"
"$PYTHON" -m venv "$DIR.tmp"
"$DIR.tmp/bin/pip" install -q --disable-pip-version-check \
    "jupyterlab==$JUPYTERLAB_VERSION" "ipykernel==$IPYKERNEL_VERSION" \
    "jupyter-archive==$JUPYTER_ARCHIVE_VERSION" "pyjwt[crypto]==$PYJWT_VERSION"
# A copy, not an editable install: the session sees the environment only (not this checkout).
if [ -d "$EXT" ]; then
    rm -rf "$DIR.build" && mkdir "$DIR.build"
    (cd "$EXT" && tar cf - --exclude=./js --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ .) | tar xf - -C "$DIR.build"
    "$DIR.tmp/bin/pip" install -q --disable-pip-version-check --no-deps "$DIR.build"
    rm -rf "$DIR.build"
else
    "$DIR.tmp/bin/pip" install -q --disable-pip-version-check --no-deps "$EXT"
fi
echo "$STAMP" > "$DIR.tmp/.nexcompute-session-env"
# venv scripts hold the absolute path of their venv in the shebang: build under DIR.tmp, then
# rebuild the entry points in place after the rename so they point at DIR.
rm -rf "$DIR"
mv "$DIR.tmp" "$DIR"
"$PYTHON" -m venv --upgrade "$DIR" >/dev/null
for f in "$DIR"/bin/*; do
    if [ -f "$f" ] && head -c 2 "$f" | grep -q '#!'; then
        sed -i "1s|$DIR.tmp/|$DIR/|" "$f"
    fi
done
sed -i "s|$DIR.tmp|$DIR|g" "$DIR/pyvenv.cfg" "$DIR/bin/activate"* 2>/dev/null || true
# Built isolated (every package pinned here), then opened up: Python enables the user site
# (HOME/.local, the session's workspace) only in a venv that includes the system site, and pip
# refuses `--user` otherwise. The venv itself stays read-only for the session.
sed -i "s|^include-system-site-packages = false|include-system-site-packages = true|" "$DIR/pyvenv.cfg"
chmod -R a+rX,go-w "$DIR"
"$DIR/bin/jupyter-lab" --version >/dev/null
"$DIR/bin/python" -c 'import nexcompute_jupyter.identity, nexcompute_jupyter.server'
test -f "$DIR/share/jupyter/labextensions/nexcompute-jupyter/package.json"
echo "session environment ready: $DIR (jupyterlab $JUPYTERLAB_VERSION)"
