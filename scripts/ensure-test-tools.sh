#!/usr/bin/env bash
# Install what the SSO and browser tests need outside .venv/, only when it is missing:
# Debian's xmlsec1 (the SAML test IdP signs with it), Debian's Chromium (never a downloaded
# browser), and the npm `oidc-provider` for the OIDC test IdP (from its package-lock.json).
# Without root or apt it says what is missing and goes on; the tests then fail saying the same.
set -uo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v xmlsec1 >/dev/null || missing+=(xmlsec1)
[ -x /usr/bin/chromium ] || missing+=(chromium)
# The session sandbox (bubblewrap; mkfs.ext4 and chattr from e2fsprogs) and the attacks the
# sandbox tests try (Debian's cron and at; without recommends, which would pull a mail server);
# HAProxy, the load balancer in front of two daphne processes in tests/test_web_processes.py.
lean=()
command -v bwrap >/dev/null || lean+=(bubblewrap)
command -v mkfs.ext4 >/dev/null || lean+=(e2fsprogs)
command -v crontab >/dev/null || lean+=(cron)
command -v at >/dev/null || lean+=(at)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || lean+=(haproxy)
if [ ${#lean[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's ${lean[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${lean[@]}" >/dev/null \
      || echo "warning: apt-get install ${lean[*]} failed" >&2
  else
    echo "warning: missing ${lean[*]}: run 'sudo apt-get install -y ${lean[*]}'" >&2
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || echo "warning: apt-get install ${missing[*]} failed" >&2
  else
    echo "warning: missing ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}'" >&2
  fi
fi

if [ ! -d tests/idp/oidc/node_modules ]; then
  if command -v npm >/dev/null; then
    npm ci --prefix tests/idp/oidc --no-audit --no-fund --loglevel=error \
      || echo "warning: npm ci --prefix tests/idp/oidc failed" >&2
  else
    echo "warning: Node.js 20+ and npm missing: the OIDC SSO tests need them" >&2
  fi
fi
exit 0
