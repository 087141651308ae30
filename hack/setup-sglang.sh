#!/usr/bin/env bash
# Build SGLang's environment once per (python version, SGLang version) in a cache
# outside the checkout, then make a light .venv-sglang/ here whose site-packages chain
# to the cached one and hold an editable install of ferry-agent (so SGLang finds
# Ferry's loader plugin through its `sglang.srt.plugins` entry point).
#
# Separate from .venv because SGLang pins its own torch and transformers, and is
# heavy (see docs/sglang.md for the size and time measured here). The tests in
# tests/e2e/engines/sglang run SGLang's side in this interpreter and skip, naming
# this script, when it is not built.
set -euo pipefail
cd "$(dirname "$0")/.."

SGLANG_VERSION="${FERRY_SGLANG_VERSION:-0.5.23}"
# shellcheck source=hack/python-env.sh
source hack/python-env.sh
ferry_python setup-sglang
DEPS="$(ferry_cache_root)/sglang/py${PYVER}-${SGLANG_VERSION}"

VENV="${FERRY_SGLANG_VENV:-.venv-sglang}"
if [[ -n "${FERRY_SGLANG_CHECK_ONLY:-}" ]]; then
  # Only say where it is: the tests ask this when make did not pass FERRY_SGLANG_PYTHON.
  [[ -f "$DEPS/.complete" && -x "$VENV/bin/python" ]] || { echo "setup-sglang: not built ($DEPS)" >&2; exit 1; }
  echo "$PWD/$VENV/bin/python"; exit 0
fi

if [[ ! -f "$DEPS/.complete" ]]; then
  echo "setup-sglang: installing sglang==$SGLANG_VERSION into $DEPS (once per version)" >&2
  # ferry-agent's client side (what an SGLang scheduler imports) needs only torch and
  # numpy, which SGLang brings; the agent itself runs from .venv.
  cached_env "$DEPS" "sglang==$SGLANG_VERSION"
fi

STAMP="$DEPS#$(sha256sum agent/pyproject.toml crds/pyproject.toml | sha256sum | cut -c1-16)"
if light_venv "$VENV" "$DEPS" "$STAMP" crds agent; then
  "$VENV/bin/python" -c 'import sglang, ferry_agent.engines.sglang' >&2
fi
echo "setup-sglang: $VENV ready (sglang $SGLANG_VERSION, deps $DEPS)" >&2
echo "$PWD/$VENV/bin/python"
