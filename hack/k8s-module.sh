# Sourced by hack/envtest.sh and hack/kwok.sh: the one generated main module that
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
