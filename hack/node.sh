#!/usr/bin/env bash
# Provide what a real node adds to the test control plane: kubelet and kube-proxy,
# built from the same Kubernetes module and version as hack/envtest.sh's
# kube-apiserver. Prints their directory's absolute path as the last line.
#
# containerd, runc and the CNI plugins are not built here: they come from Debian's
# packages (`apt-get install containerd runc containernetworking-plugins iptables`);
# `ferry dev up --node` and tests/node say which one is missing.
#
# Order: $KUBEBUILDER_ASSETS if it holds both; otherwise a cache outside the
# checkout keyed by the pinned version; otherwise build them once with the Go
# toolchain. They are built in the generated main module of hack/k8s-module.sh,
# so the Go build cache from the kube-apiserver build serves most packages.
set -euo pipefail

K8S_VERSION="${FERRY_K8S_VERSION:-v1.35.4}"
CACHE_ROOT="${FERRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}"
DEST="$CACHE_ROOT/node/k8s-${K8S_VERSION}"
BINARIES=(kubelet kube-proxy)

# shellcheck source=hack/k8s-module.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-module.sh"
k8s_provide_cached node "$DEST" "${BINARIES[@]}"

k8s_main_module "$WORK/k8s" "$K8S_VERSION"
k8s_build "$K8S_VERSION" "$WORK/out" "${BINARIES[@]}"
k8s_install "$DEST"
