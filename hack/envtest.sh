#!/usr/bin/env bash
# Provide etcd and kube-apiserver (plus optional extras) in one directory and
# print that directory's absolute path as the last line.
#
# Order: $KUBEBUILDER_ASSETS if it holds both binaries; otherwise a cache
# outside the checkout keyed by the pinned versions; otherwise build them once
# with the Go toolchain from their published Go modules.
set -euo pipefail

K8S_VERSION="${FERRY_K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${FERRY_ETCD_VERSION:-v3.6.16}"
CACHE_ROOT="${FERRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}"
DEST="$CACHE_ROOT/envtest/k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}"

has_assets() { [[ -x "$1/etcd" && -x "$1/kube-apiserver" ]]; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]] && has_assets "$KUBEBUILDER_ASSETS"; then
  cd "$KUBEBUILDER_ASSETS" && pwd
  exit 0
fi
if has_assets "$DEST"; then
  echo "$DEST"
  exit 0
fi

command -v go >/dev/null || { echo "envtest: need the Go toolchain to build kube-apiserver and etcd" >&2; exit 1; }
mkdir -p "$CACHE_ROOT/envtest"
WORK="$(mktemp -d "$CACHE_ROOT/envtest/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export GOFLAGS=-mod=mod CGO_ENABLED=0

build_etcd() {
  mkdir -p "$WORK/etcd" && cd "$WORK/etcd"
  go mod init ferry.dev/envtest-etcd >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@${ETCD_VERSION}" >&2
  go build -trimpath -ldflags "-s -w" -o "$WORK/out/etcd" go.etcd.io/etcd/server/v3 >&2
}

build_apiserver() {
  mkdir -p "$WORK/k8s" && cd "$WORK/k8s"
  go mod init ferry.dev/envtest-k8s >/dev/null 2>&1
  # k8s.io/kubernetes points its staging modules at ./staging; replace each
  # with the published module of the matching v0.X.Y version.
  local staging="v0.${K8S_VERSION#v1.}"
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "require k8s.io/kubernetes ${K8S_VERSION}"
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$gomod" \
      | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } >> go.mod
  go mod tidy >/dev/null 2>&1 || true
  go get "k8s.io/kubernetes/cmd/kube-apiserver@${K8S_VERSION}" >&2
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local pkg=k8s.io/component-base/version
  go build -trimpath -o "$WORK/out/kube-apiserver" \
    -ldflags "-s -w -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean" \
    k8s.io/kubernetes/cmd/kube-apiserver >&2
}

mkdir -p "$WORK/out"
echo "envtest: building etcd ${ETCD_VERSION} and kube-apiserver ${K8S_VERSION} (once; cached in $DEST)" >&2
build_etcd
build_apiserver
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.tmp" && mv "$WORK/out" "$DEST.tmp" && mv "$DEST.tmp" "$DEST"
echo "$DEST"
