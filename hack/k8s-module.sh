# Sourced by hack/envtest.sh, hack/kwok.sh and hack/node.sh: the one generated main module that
# every Kubernetes binary (kube-apiserver, kube-controller-manager,
# kube-scheduler) is built in. Identical go.mod content means identical
# dependency versions, so the Go build cache compiled for one serves the others.

# k8s_main_module DIR VERSION: a main module in DIR requiring k8s.io/kubernetes@VERSION.
k8s_main_module() {
  local dir="$1" version="$2"
  mkdir -p "$dir" && cd "$dir"
  go mod init ferry.dev/envtest-k8s >/dev/null 2>&1
  # k8s.io/kubernetes points its staging modules at ./staging; replace each
  # with the published module of the matching v0.X.Y version.
  local staging="v0.${version#v1.}"
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@${version}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "require k8s.io/kubernetes ${version}"
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$gomod" \
      | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } >> go.mod
  go mod tidy >/dev/null 2>&1 || true
}

# k8s_build VERSION OUTDIR CMD...: build k8s.io/kubernetes/cmd/CMD (in the current
# module) into OUTDIR, stamped with VERSION as the release build does.
k8s_build() {
  local version="$1" out="$2"
  shift 2
  local minor="${version#v1.}"; minor="${minor%%.*}"
  local pkg=k8s.io/component-base/version cmd
  for cmd in "$@"; do
    go get "k8s.io/kubernetes/cmd/${cmd}@${version}" >&2
  done
  for cmd in "$@"; do
    go build -trimpath -o "$out/$cmd" \
      -ldflags "-s -w -X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean" \
      "k8s.io/kubernetes/cmd/${cmd}" >&2
  done
}

# What every hack/*.sh that provides Kubernetes-side binaries shares (envtest.sh,
# kwok.sh, node.sh): each keeps its own cache key (DEST) and binary list.
#
# k8s_provide_cached TOOL DEST BIN...: when $KUBEBUILDER_ASSETS holds every BIN, print
# it and exit; else when DEST does, print DEST and exit; else check for the Go
# toolchain, make a build directory under DEST's parent (removed on exit) in $WORK
# with $WORK/out for the binaries, and set the build environment. TOOL names the
# script in messages.
k8s_provide_cached() {
  local tool="$1" dest="$2"
  shift 2
  if [[ -n "${KUBEBUILDER_ASSETS:-}" ]] && k8s_has_all "$KUBEBUILDER_ASSETS" "$@"; then
    cd "$KUBEBUILDER_ASSETS" && pwd
    exit 0
  fi
  if k8s_has_all "$dest" "$@"; then
    echo "$dest"
    exit 0
  fi
  command -v go >/dev/null || { echo "${tool}: need the Go toolchain to build $*" >&2; exit 1; }
  mkdir -p "$(dirname "$dest")"
  WORK="$(mktemp -d "$(dirname "$dest")/build.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  mkdir -p "$WORK/out"
  export GOFLAGS=-mod=mod CGO_ENABLED=0
  echo "${tool}: building $* (once; cached in $dest)" >&2
}

# k8s_has_all DIR BIN...: DIR holds every BIN, executable.
k8s_has_all() {
  local dir="$1" b
  shift
  for b in "$@"; do [[ -x "$dir/$b" ]] || return 1; done
}

# k8s_install DEST: move $WORK/out into place as DEST (atomically) and print DEST.
k8s_install() {
  local dest="$1"
  rm -rf "$dest.tmp" && mv "$WORK/out" "$dest.tmp" && mv "$dest.tmp" "$dest"
  echo "$dest"
}
