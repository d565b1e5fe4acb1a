# Sourced by hack/testenv.sh and hack/vault.sh, which build test fixtures
# from a tools/<name> module into
#
#   ${MESHCA_CACHE_DIR:-$HOME/.cache/meshca}/bin/<key>
#
# and print that directory as the last line of stdout.
#
# A directory counts as built only when it holds the .complete stamp. Builds go
# to a temporary directory that is renamed into place after the stamp is
# written, so an interrupted build is never mistaken for a complete one. One
# lock, $cache/bin/.lock, serialises all builds (parallel test binaries call
# the scripts): holding it, a build clears the .tmp-* directories that killed
# builds left, which must never catch another build still running.
#
# Before sourcing, set prefix (for messages), quiet (0 or 1) and tools (the
# tools module's directory). Before calling the functions below, set key and
# bindir, and define complete() to test that bindir holds every binary.

log() { if [[ $quiet == 0 ]]; then echo "$prefix: $*" >&2; fi; }
die() { echo "$prefix: ERROR: $*" >&2; exit 1; }

cache="${MESHCA_CACHE_DIR:-$HOME/.cache/meshca}"
GO="${GO:-go}"

command -v "$GO" >/dev/null || die "go not found in PATH"
[[ -f "$tools/go.mod" ]] || die "$tools/go.mod missing"

# pin prints the version of module $1 pinned in the tools module's go.mod,
# read without running go (which would cost the cached path a tenth of a
# second each time).
pin() { awk -v m="$1" '{ sub(/^require[ \t]+/, "") } $1 == m { print $2; exit }' "$tools/go.mod"; }

# Keep the build independent of the caller's environment: a go.work, GOFLAGS
# such as -mod=vendor or a cgo toolchain must not change what gets built.
export GOWORK=off GOFLAGS=-mod=readonly CGO_ENABLED=0

# exit_if_built prints bindir and exits if it is complete.
exit_if_built() {
	if complete; then
		log "cached: $bindir"
		echo "$bindir"
		exit 0
	fi
}

# begin_build takes the build lock, exits if another caller built bindir
# while we waited, and makes the temporary directory $tmp, removed on exit
# unless finish_build moves it into place.
begin_build() {
	mkdir -p "$cache/bin" || die "cannot create $cache/bin"
	exec 9>"$cache/bin/.lock"
	if command -v flock >/dev/null; then
		log "waiting for build lock $cache/bin/.lock"
		flock 9
		# Holding the lock, no other build is running: temporary directories
		# left are from builds that were killed, and only waste space.
		rm -rf "$cache/bin"/.tmp-*
	fi
	exit_if_built
	tmp="$(mktemp -d "$cache/bin/.tmp-$key.XXXXXX")"
	chmod 755 "$tmp" # mktemp makes it 0700; the cache may be shared
	trap 'rm -rf "$tmp"' EXIT
}

# finish_build stamps $tmp complete, moves it to bindir, deletes the build's
# dedicated GOCACHE $1 (unless MESHCA_KEEP_TOOLS_GOCACHE=1) and prints bindir.
# The build began at $t0 (in SECONDS).
finish_build() {
	date -u +%FT%TZ >"$tmp/.complete"
	rm -rf "$bindir" # an incomplete leftover from a build that predates the stamp
	mv "$tmp" "$bindir" || die "cannot move $tmp to $bindir"
	trap - EXIT
	if [[ "${MESHCA_KEEP_TOOLS_GOCACHE:-}" != 1 ]]; then rm -rf "$1"; fi
	log "built in $((SECONDS - t0))s: $bindir"
	echo "$bindir"
}
