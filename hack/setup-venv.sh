#!/usr/bin/env bash
# Build the Python environment once per (python version, requirements.lock) in a
# cache outside the checkout, then make a light .venv/ here whose site-packages
# chain to the cached one and hold an editable install of Ferry.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=hack/python-env.sh
source hack/python-env.sh

ferry_python setup
KEY="$(sha256sum < requirements.lock | cut -c1-16)"
DEPS="$(ferry_cache_root)/venv/py${PYVER}-${KEY}"
if [[ ! -f "$DEPS/.complete" ]]; then
  echo "setup: building the dependency environment in $DEPS (once per lock)" >&2
  cached_env "$DEPS" --no-deps -r requirements.lock
fi

VENV="${FERRY_VENV:-.venv}"
# The light venv is rebuilt when the dependency environment or a distribution's
# pyproject (its packages, entry points) changes; one editable install per
# distribution (see pyproject.toml).
STAMP="$DEPS#$(cat crds/pyproject.toml operator/pyproject.toml agent/pyproject.toml tools/pyproject.toml | sha256sum | cut -c1-16)"
[[ -x "$VENV/bin/ferry" ]] || rm -f "$VENV/.ferry-deps"
light_venv "$VENV" "$DEPS" "$STAMP" crds operator agent tools || true
"$VENV/bin/python" -c 'import ferry_api, ferry_operator, ferry_agent, ferry_dev, ferry_bench, ferry_kubectl' >&2
echo "setup: $VENV ready ($("$PY" --version), deps $DEPS)" >&2
touch "$VENV/.ferry-deps"
