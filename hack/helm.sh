#!/usr/bin/env bash
# Provide a pinned helm binary and print its absolute path as the last line.
#
# Order: `helm` on PATH if it is exactly the pinned version; otherwise a cache
# outside the checkout keyed by that version; otherwise build it once with the
# Go toolchain from its published Go module (a few minutes on 2 cores).
set -euo pipefail

HELM_VERSION="${FERRY_HELM_VERSION:-v3.22.0}"
CACHE_ROOT="${FERRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry}"
DEST="$CACHE_ROOT/helm/helm-${HELM_VERSION}"

if command -v helm >/dev/null && helm version --template '{{.Version}}' 2>/dev/null | grep -qx "${HELM_VERSION}"; then
  command -v helm
  exit 0
fi
if [[ -x "$DEST/helm" ]]; then
  echo "$DEST/helm"
  exit 0
fi

command -v go >/dev/null || { echo "helm: need the Go toolchain to build helm ${HELM_VERSION}" >&2; exit 1; }
mkdir -p "$CACHE_ROOT/helm"
WORK="$(mktemp -d "$CACHE_ROOT/helm/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export GOFLAGS=-mod=mod CGO_ENABLED=0

echo "helm: building helm ${HELM_VERSION} (once; cached in $DEST)" >&2
cd "$WORK"
go mod init ferry.dev/helm >/dev/null 2>&1
go get "helm.sh/helm/v3@${HELM_VERSION}" >&2
# As helm's Makefile does: the default Kubernetes version of `helm template` and
# `helm lint` comes from the client-go it was built with (v0.35.x -> 1.35);
# without it helm assumes v1.20 and refuses charts needing newer.
client_go="$(go list -f '{{.Version}}' -m k8s.io/client-go)"
minor="${client_go#v0.}"; minor="${minor%%.*}"
pkg=helm.sh/helm/v3
go build -trimpath -o "$WORK/out/helm" \
  -ldflags "-s -w -X ${pkg}/internal/version.version=${HELM_VERSION} -X ${pkg}/internal/version.gitTreeState=clean \
    -X ${pkg}/pkg/lint/rules.k8sVersionMajor=1 -X ${pkg}/pkg/lint/rules.k8sVersionMinor=${minor} \
    -X ${pkg}/pkg/chartutil.k8sVersionMajor=1 -X ${pkg}/pkg/chartutil.k8sVersionMinor=${minor}" \
  helm.sh/helm/v3/cmd/helm >&2
rm -rf "$DEST.tmp" && mv "$WORK/out" "$DEST.tmp" && mv "$DEST.tmp" "$DEST"
echo "$DEST/helm"
