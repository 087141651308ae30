#!/usr/bin/env bash
# The vLLM environment for tests/e2e/engines/test_vllm.py, built once per (python,
# vLLM version) in the cache outside the checkout (~9.5 GB, ~5.5 min cold here). vLLM
# pins its own torch (0.33.0: torch 2.14, the project's lock has 2.13), so it gets a
# venv of its own; Ferry's agent distribution is installed into it per test run from
# its wheel. Prints the environment's python on the last line.
set -euo pipefail
VLLM_VERSION="${FERRY_VLLM_VERSION:-0.33.0}"
# shellcheck source=hack/python-env.sh
source "$(dirname "$0")/python-env.sh"
FERRY_PYTHON="${FERRY_PYTHON:-python3.11}"
ferry_python setup-vllm
ENV="$(ferry_cache_root)/vllm/py${PYVER}-${VLLM_VERSION}"
if [[ ! -f "$ENV/.complete" ]]; then
  [[ -z "${FERRY_VLLM_CHECK_ONLY:-}" ]] || { echo "setup-vllm: $ENV not built" >&2; exit 1; }
  echo "setup-vllm: building vllm==$VLLM_VERSION in $ENV (once)" >&2
  cached_env "$ENV" "vllm==$VLLM_VERSION"
fi
echo "$ENV/bin/python"
