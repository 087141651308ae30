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

# shellcheck source=hack/k8s-module.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-module.sh"
k8s_provide_cached envtest "$DEST" etcd kube-apiserver

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

build_etcd
build_apiserver
k8s_install "$DEST"
