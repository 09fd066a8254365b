#!/usr/bin/env bash
# `make bench`: installs what the bench needs (idempotent, into the cache dir), then runs
# bench/run.py, which writes bench/results.json and prints the table.
#   nginx            Debian package (apt-get)
#   oha              crates.io, `cargo install oha --locked` into $KLPROXY_CACHE/oha
#   LiteLLM proxy    PyPI `litellm[proxy]` in a venv, $KLPROXY_CACHE/litellm-venv
#                    (when it cannot be installed, its rows say `skipped: why`)
# Every process the bench starts is stopped on exit (run.py stops its own; this trap stops
# whatever is left, by pid).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${KLPROXY_CACHE:-$HOME/.cache/kl-proxy}"
PY="${PYTHON:-python3}"
mkdir -p "$CACHE" bench/out
step() { printf '[bench setup] %s\n' "$*" >&2; }

cleanup() {
  if [ -f bench/out/pids ]; then
    while read -r pid; do
      [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done < bench/out/pids
  fi
}
trap cleanup EXIT INT TERM

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  step "apt-get install nginx"
  if [ "$(id -u)" = 0 ]; then APT=(apt-get); else APT=(sudo apt-get); fi
  "${APT[@]}" update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y -qq nginx >/dev/null \
    || step "nginx could not be installed: its rows will say skipped"
fi

if [ ! -x "$CACHE/oha/bin/oha" ]; then
  step "cargo install oha --locked (a few minutes the first time)"
  cargo install oha --locked --root "$CACHE/oha" -q
fi

if [ ! -x "$CACHE/litellm-venv/bin/litellm" ] && [ ! -f "$CACHE/litellm-venv/SKIPPED" ]; then
  step "pip install 'litellm[proxy]' into $CACHE/litellm-venv"
  if ! { "$PY" -m venv "$CACHE/litellm-venv" &&
         timeout 600 "$CACHE/litellm-venv/bin/pip" install --disable-pip-version-check -q 'litellm[proxy]'; } \
       >"$CACHE/litellm-install.log" 2>&1; then
    mkdir -p "$CACHE/litellm-venv"
    echo "pip install 'litellm[proxy]' failed: $(tail -n 1 "$CACHE/litellm-install.log")" >"$CACHE/litellm-venv/SKIPPED"
    step "LiteLLM not installed (see $CACHE/litellm-install.log): its rows will say skipped"
  fi
fi

"$PY" bench/run.py
