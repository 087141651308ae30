# Sourced by hack/setup-venv.sh, hack/setup-vllm.sh and hack/setup-sglang.sh: the
# interpreter choice, the cached dependency environments (built once per key, outside
# the checkout) and the light venvs in the checkout that chain to them.

# ferry_python NAME: FERRY_PYTHON, else the first python3.11 / 3.12 / python3 that is
# 3.11 or 3.12. Sets PY and PYVER ("3.11").
ferry_python() {
  PY="${FERRY_PYTHON:-}"
  if [[ -z "$PY" ]]; then
    for cand in python3.11 python3.12 python3; do
      if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; then
        PY="$(command -v "$cand")"; break
      fi
    done
  fi
  [[ -n "$PY" ]] || { echo "$1: need Python 3.11 or 3.12" >&2; exit 1; }
  PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
}

# ferry_cache_root: where every cached environment lives.
ferry_cache_root() {
  echo "${FERRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}"
}

# cached_env DEST PIP_ARGS...: a venv at DEST with `pip install PIP_ARGS`, built once
# (DEST/.complete marks it). Built under DEST.tmp and moved, so an interrupted build is
# never taken for a finished one; venv scripts hardcode their interpreter path, so they
# are re-pointed after the move.
cached_env() {
  local dest="$1"; shift
  [[ -f "$dest/.complete" ]] && return 0
  rm -rf "$dest.tmp"
  "$PY" -m venv "$dest.tmp"
  "$dest.tmp/bin/python" -m pip install -q --upgrade "pip>=24" >&2
  "$dest.tmp/bin/python" -m pip install -q "$@" >&2
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  grep -rlI --exclude-dir=__pycache__ "$dest.tmp" "$dest/bin" | xargs -r sed -i "s#$dest.tmp#$dest#g"
  sed -i "s#$dest.tmp#$dest#g" "$dest/pyvenv.cfg"
  touch "$dest/.complete"
}

# light_venv VENV DEPS STAMP EDITABLE...: a venv in the checkout whose site-packages
# chain to DEPS's and hold editable installs of the named distribution folders; rebuilt
# when STAMP (the dependency environment and the distributions' pyprojects) changes.
# Returns 1 when it was already current.
light_venv() {
  local venv="$1" deps="$2" stamp="$3"; shift 3
  if [[ -f "$venv/.ferry-deps" ]] && [[ "$(cat "$venv/.ferry-deps")" == "$stamp" ]]; then
    return 1
  fi
  local deps_site site
  deps_site="$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  rm -rf "$venv"
  "$PY" -m venv --without-pip "$venv"
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # addsitedir (not a bare path) so .pth files in the cached site-packages run too.
  echo "import site; site.addsitedir('$deps_site')" > "$site/ferry-deps.pth"
  local editable=()
  for d in "$@"; do editable+=(-e "$d"); done
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation "${editable[@]}" >&2
  echo "$stamp" > "$venv/.ferry-deps"
}
