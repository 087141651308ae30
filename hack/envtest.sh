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
# shellcheck source=hack/k8s-module.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-module.sh"

build_etcd() {
  mkdir -p "$WORK/etcd" && cd "$WORK/etcd"
  go mod init ferry.dev/envtest-etcd >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@${ETCD_VERSION}" >&2
  go build -trimpath -ldflags "-s -w" -o "$WORK/out/etcd" go.etcd.io/etcd/server/v3 >&2
}

build_apiserver() {
  k8s_main_module "$WORK/k8s" "$K8S_VERSION"
  k8s_build "$K8S_VERSION" "$WORK/out" kube-apiserver
}

mkdir -p "$WORK/out"
echo "envtest: building etcd ${ETCD_VERSION} and kube-apiserver ${K8S_VERSION} (once; cached in $DEST)" >&2
build_etcd
build_apiserver
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.tmp" && mv "$WORK/out" "$DEST.tmp" && mv "$DEST.tmp" "$DEST"
echo "$DEST"
