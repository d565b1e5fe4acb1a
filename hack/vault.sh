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
# A directory counts as built only when it holds the .complete stamp. Builds go
# to a temporary directory that is renamed into place after the stamp is
# written, so an interrupted build is never mistaken for a complete one. The
# lock is the one hack/testenv.sh takes: both scripts clear leftover .tmp-*
# directories while holding it, which must never catch the other's build.
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
log() { if [[ $quiet == 0 ]]; then echo "vault: $*" >&2; fi; }
die() { echo "vault: ERROR: $*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/tools/vault"
cache="${MESHCA_CACHE_DIR:-$HOME/.cache/meshca}"
GO="${GO:-go}"

command -v "$GO" >/dev/null || die "go not found in PATH"
[[ -f "$tools/go.mod" ]] || die "$tools/go.mod missing"

# The version is the pin in tools/vault/go.mod, read without running go.
pin() { awk -v m="$1" '{ sub(/^require[ \t]+/, "") } $1 == m { print $2; exit }' "$tools/go.mod"; }
VAULT_VERSION="$(pin github.com/hashicorp/vault)"
[[ -n "$VAULT_VERSION" ]] || die "cannot read the github.com/hashicorp/vault pin from $tools/go.mod"

# Keep the build independent of the caller's environment: a go.work, GOFLAGS
# such as -mod=vendor or a cgo toolchain must not change what gets built.
export GOWORK=off GOFLAGS=-mod=readonly CGO_ENABLED=0

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

if complete; then
	log "cached: $bindir"
	echo "$bindir"
	exit 0
fi

if [[ $nobuild == 1 ]]; then
	die "vault $VAULT_VERSION is not built in $bindir; build it with: bash hack/vault.sh (or make testenv), about 15 minutes cold"
fi

mkdir -p "$cache/bin" || die "cannot create $cache/bin"
exec 9>"$cache/bin/.lock"
if command -v flock >/dev/null; then
	log "waiting for build lock $cache/bin/.lock"
	flock 9
	# Holding the lock, no other build is running: temporary directories
	# left are from builds that were killed, and only waste space.
	rm -rf "$cache/bin"/.tmp-*
fi
if complete; then # another caller built it while we waited
	log "cached: $bindir"
	echo "$bindir"
	exit 0
fi

tmp="$(mktemp -d "$cache/bin/.tmp-$key.XXXXXX")"
chmod 755 "$tmp" # mktemp makes it 0700; the cache may be shared
# Dedicated build cache: the ~4 GB of compiled Vault packages are useless once
# the binary exists, so it is deleted after a successful build rather than
# left to bloat the user's GOCACHE. It survives a failed build so a retry
# resumes. MESHCA_KEEP_TOOLS_GOCACHE=1 keeps it.
gocache="$cache/go-build-vault"
trap 'rm -rf "$tmp"' EXIT

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

date -u +%FT%TZ >"$tmp/.complete"
rm -rf "$bindir" # an incomplete leftover from a build that predates the stamp
mv "$tmp" "$bindir" || die "cannot move $tmp to $bindir"
trap - EXIT
if [[ "${MESHCA_KEEP_TOOLS_GOCACHE:-}" != 1 ]]; then rm -rf "$gocache"; fi
log "built in $((SECONDS - t0))s: $bindir"
echo "$bindir"
