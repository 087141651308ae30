#!/usr/bin/env bash
# Provide what a kwok cluster adds to the test control plane: kube-controller-manager
# and kube-scheduler (the same Kubernetes version as hack/envtest.sh's
# kube-apiserver), kwok (fake nodes and pods), and etcdctl (to read stored object
# sizes). Prints their directory's absolute path as the last line.
#
# Order: $KUBEBUILDER_ASSETS if it holds all four; otherwise a cache outside the
# checkout keyed by the pinned versions; otherwise build them once with the Go
# toolchain from their published Go modules. The Kubernetes binaries are built in
# the same generated main module as kube-apiserver (hack/k8s-module.sh), so the
# Go build cache from that build is reused.
set -euo pipefail

K8S_VERSION="${FERRY_K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${FERRY_ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${FERRY_KWOK_VERSION:-v0.8.0}"
CACHE_ROOT="${FERRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}"
DEST="$CACHE_ROOT/kwok/k8s-${K8S_VERSION}-kwok-${KWOK_VERSION}-etcd-${ETCD_VERSION}"
BINARIES=(kube-controller-manager kube-scheduler kwok etcdctl)

# shellcheck source=hack/k8s-module.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-module.sh"
k8s_provide_cached kwok "$DEST" "${BINARIES[@]}"

build_k8s() {
  k8s_main_module "$WORK/k8s" "$K8S_VERSION"
  k8s_build "$K8S_VERSION" "$WORK/out" kube-controller-manager kube-scheduler
}

build_kwok() {
  # kwok's own go.mod (no replace directives) pins its client-go; build it as released.
  mkdir -p "$WORK/kwok" && cd "$WORK/kwok"
  go mod init ferry.dev/kwok >/dev/null 2>&1
  go get "sigs.k8s.io/kwok@${KWOK_VERSION}" >&2
  go build -trimpath -ldflags "-s -w" -o "$WORK/out/kwok" sigs.k8s.io/kwok/cmd/kwok >&2
}

build_etcdctl() {
  mkdir -p "$WORK/etcdctl" && cd "$WORK/etcdctl"
  go mod init ferry.dev/envtest-etcdctl >/dev/null 2>&1
  go get "go.etcd.io/etcd/etcdctl/v3@${ETCD_VERSION}" >&2
  go build -trimpath -ldflags "-s -w" -o "$WORK/out/etcdctl" go.etcd.io/etcd/etcdctl/v3 >&2
}

build_etcdctl
build_kwok
build_k8s
k8s_install "$DEST"
