#!/usr/bin/env bash
# Builds the real kube-apiserver and etcd that meshca's tests run against, from
# the versions pinned in tools/kube (a separate Go module), into
#
#   ${MESHCA_CACHE_DIR:-$HOME/.cache/meshca}/bin/<key>/{kube-apiserver,etcd}
#
# and prints that directory as the last line of stdout (export it as
# MESHCA_KUBE_BIN_DIR). <key> names the versions plus a hash of the tools
# module's pins and the Go toolchain, so changing a pin builds a new directory
# instead of reusing a stale one. A cached build costs milliseconds; a cold one
# about 5 minutes on 2 cores.
#
# hack/lib.sh holds the caching and locking it shares with hack/vault.sh.
#
# Options: -q  print only the directory (used by internal/testenv).
set -euo pipefail

quiet=0
if [[ "${1:-}" == "-q" ]]; then quiet=1; fi
prefix=testenv
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/tools/kube"
# shellcheck source=hack/lib.sh
source "$root/hack/lib.sh"

KUBE_VERSION="$(pin k8s.io/kubernetes)"
ETCD_VERSION="$(pin go.etcd.io/etcd/server/v3)"
[[ -n "$KUBE_VERSION" && -n "$ETCD_VERSION" ]] || die "cannot read the kubernetes and etcd pins from $tools/go.mod"

major="${KUBE_VERSION#v}"; major="${major%%.*}"
minor="${KUBE_VERSION#v*.}"; minor="${minor%%.*}"
# Without these the apiserver reports v0.0.0-master, which client-go and
# feature gates treat as an unreleased version.
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
# -trimpath keeps the module cache's location out of stack traces and makes
# the binaries independent of where they were built.
buildflags=(-trimpath)

goenv="$(cd "$tools" && "$GO" env GOVERSION GOOS GOARCH)" || die "go env failed"
hash="$(cat "$tools/go.mod" "$tools/go.sum" "$tools/cmd/etcd/main.go" <(echo "$goenv ${buildflags[*]} $ldflags") | sha256sum | cut -c1-12)"
key="kube-${KUBE_VERSION}_etcd-${ETCD_VERSION}_${hash}"
bindir="$cache/bin/$key"

complete() { [[ -f "$bindir/.complete" && -x "$bindir/kube-apiserver" && -x "$bindir/etcd" ]]; }

exit_if_built
begin_build
# Dedicated build cache: the 2.5 GB of compiled kubernetes packages are useless
# once the binaries exist, so it is deleted after a successful build rather
# than left to bloat the user's GOCACHE. It survives a failed build so a retry
# resumes. MESHCA_KEEP_TOOLS_GOCACHE=1 keeps it.
gocache="$cache/go-build-tools"

cd "$tools"
export GOCACHE="$gocache"

t0=$SECONDS
log "resolving modules (GOMODCACHE=$("$GO" env GOMODCACHE))"
"$GO" list -deps k8s.io/kubernetes/cmd/kube-apiserver ./cmd/etcd >/dev/null ||
	die "module resolution failed in $tools (is the Go module proxy reachable?)"
log "modules resolved in $((SECONDS - t0))s"

t1=$SECONDS
log "building etcd $ETCD_VERSION"
"$GO" build "${buildflags[@]}" -ldflags "-s -w" -o "$tmp/etcd" ./cmd/etcd || die "building etcd failed"
log "etcd built in $((SECONDS - t1))s"

t2=$SECONDS
log "building kube-apiserver $KUBE_VERSION (a few minutes when cold)"
"$GO" build "${buildflags[@]}" -ldflags "$ldflags" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver ||
	die "building kube-apiserver failed"
log "kube-apiserver built in $((SECONDS - t2))s"

"$tmp/kube-apiserver" --version | grep -qx "Kubernetes $KUBE_VERSION" ||
	die "built kube-apiserver reports '$("$tmp/kube-apiserver" --version)', want Kubernetes $KUBE_VERSION"
"$tmp/etcd" --version | grep -q "etcd Version: ${ETCD_VERSION#v}" ||
	die "built etcd reports the wrong version: $("$tmp/etcd" --version | head -1)"

finish_build "$gocache"
