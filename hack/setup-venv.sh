#!/usr/bin/env bash
# Build the Python environment once per (python version, requirements.lock) in a
# cache outside the checkout, then make a light .venv/ here whose site-packages
# chain to the cached one and hold an editable install of Ferry.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${FERRY_PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; then
      PY="$(command -v "$cand")"; break
    fi
  done
fi
[[ -n "$PY" ]] || { echo "setup: need Python 3.11 or 3.12" >&2; exit 1; }
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

CACHE_ROOT="${FERRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}"
KEY="$(cat requirements.lock | sha256sum | cut -c1-16)"
DEPS="$CACHE_ROOT/venv/py${PYVER}-${KEY}"

if [[ ! -f "$DEPS/.complete" ]]; then
  echo "setup: building the dependency environment in $DEPS (once per lock)" >&2
  rm -rf "$DEPS.tmp"
  "$PY" -m venv "$DEPS.tmp"
  "$DEPS.tmp/bin/python" -m pip install -q --upgrade "pip>=24" >&2
  "$DEPS.tmp/bin/python" -m pip install -q --no-deps -r requirements.lock >&2
  "$DEPS.tmp/bin/python" -m pip check >&2 || true
  rm -rf "$DEPS" && mv "$DEPS.tmp" "$DEPS"
  # venv scripts hardcode their interpreter path; re-point them after the move.
  grep -rlI --exclude-dir=__pycache__ "$DEPS.tmp" "$DEPS/bin" | xargs -r sed -i "s#$DEPS.tmp#$DEPS#g"
  sed -i "s#$DEPS.tmp#$DEPS#g" "$DEPS/pyvenv.cfg"
  touch "$DEPS/.complete"
fi

VENV="${FERRY_VENV:-.venv}"
DEPS_SITE="$("$DEPS/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [[ ! -f "$VENV/.ferry-deps" ]] || [[ "$(cat "$VENV/.ferry-deps")" != "$DEPS" ]] || [[ ! -x "$VENV/bin/ferry" ]]; then
  rm -rf "$VENV"
  "$PY" -m venv --without-pip "$VENV"
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # addsitedir (not a bare path) so .pth files in the cached site-packages run too.
  echo "import site; site.addsitedir('$DEPS_SITE')" > "$SITE/ferry-deps.pth"
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >&2
  echo "$DEPS" > "$VENV/.ferry-deps"
fi
"$VENV/bin/python" -c 'import ferry_api, ferry_operator, ferry_agent' >&2
echo "setup: $VENV ready ($("$PY" --version), deps $DEPS)" >&2
touch "$VENV/.ferry-deps"
