#!/usr/bin/env bash
# Builds the real Vault server that keystore/vault's tests run against, from
# the version pinned in tools/vault (a separate Go module), into
#
#   ${MESHCA_CACHE_DIR:-$HOME/.cache/meshca}/bin/<key>/vault
#
# and prints that directory as the last line of stdout (export it as
# MESHCA_VAULT_BIN_DIR). <key> names the version plus a hash of the tools
# module's pins and the Go toolchain, so changing a pin builds a new directory
# instead of reusing a stale one. A cached build costs milliseconds; a cold one
# about 15 minutes on 2 cores (3 to resolve 670 MB of modules, 12 to compile).
#
# hack/lib.sh holds the caching and locking it shares with hack/testenv.sh:
# both take one lock, as both clear leftover .tmp-* directories while holding
# it, which must never catch the other's build.
#
# Vault is BUSL-licensed: it is built and run as a test fixture only.
#
# Options: -q  print only the directory
#          -n  never build: fail unless the binary is already cached (used by
#              internal/vaulttest, as a cold build outlasts go test's timeout)
set -euo pipefail

quiet=0
nobuild=0
for arg in "$@"; do
	case "$arg" in
	-q) quiet=1 ;;
	-n) nobuild=1 ;;
	*) echo "usage: $0 [-q] [-n]" >&2; exit 2 ;;
	esac
done
prefix=vault
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/tools/vault"
# shellcheck source=hack/lib.sh
source "$root/hack/lib.sh"

VAULT_VERSION="$(pin github.com/hashicorp/vault)"
[[ -n "$VAULT_VERSION" ]] || die "cannot read the github.com/hashicorp/vault pin from $tools/go.mod"

# No build tags: the "ui" tag would embed the web UI, which tests never use.
ldflags="-s -w"
# -trimpath keeps the module cache's location out of stack traces and makes
# the binary independent of where it was built.
buildflags=(-trimpath)

goenv="$(cd "$tools" && "$GO" env GOVERSION GOOS GOARCH)" || die "go env failed"
hash="$(cat "$tools/go.mod" "$tools/go.sum" <(echo "$goenv ${buildflags[*]} $ldflags") | sha256sum | cut -c1-12)"
key="vault-${VAULT_VERSION}_${hash}"
bindir="$cache/bin/$key"

complete() { [[ -f "$bindir/.complete" && -x "$bindir/vault" ]]; }

exit_if_built

if [[ $nobuild == 1 ]]; then
	die "vault $VAULT_VERSION is not built in $bindir; build it with: bash hack/vault.sh (or make testenv), about 15 minutes cold"
fi

begin_build
# Dedicated build cache: the ~4 GB of compiled Vault packages are useless once
# the binary exists, so it is deleted after a successful build rather than
# left to bloat the user's GOCACHE. It survives a failed build so a retry
# resumes. MESHCA_KEEP_TOOLS_GOCACHE=1 keeps it.
gocache="$cache/go-build-vault"

cd "$tools"
export GOCACHE="$gocache"

t0=$SECONDS
log "resolving modules (GOMODCACHE=$("$GO" env GOMODCACHE))"
"$GO" list -deps github.com/hashicorp/vault >/dev/null ||
	die "module resolution failed in $tools (is the Go module proxy reachable?)"
log "modules resolved in $((SECONDS - t0))s"

t1=$SECONDS
log "building vault $VAULT_VERSION (about 12 minutes when cold)"
"$GO" build "${buildflags[@]}" -ldflags "$ldflags" -o "$tmp/vault" github.com/hashicorp/vault ||
	die "building vault failed"
log "vault built in $((SECONDS - t1))s"

"$tmp/vault" version | grep -q "^Vault $VAULT_VERSION\b" ||
	die "built vault reports '$("$tmp/vault" version)', want Vault $VAULT_VERSION"

finish_build "$gocache"
