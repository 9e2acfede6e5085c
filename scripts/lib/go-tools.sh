# Sourced by the install scripts that build a test tool from the Go module proxy into the cache
# (install-k8s-tools.sh, install-otelcol.sh, install-victorialogs.sh). The caller sets `cache`.

# Takes the lock `$cache/<name>.lock` after checking that Go is there: two test binaries (or two
# checkouts) may install at once; one builds, the other waits and then finds the marker.
go_tools_lock() {
    command -v go >/dev/null || { echo "$1: go not found (Go 1.26+ is needed)" >&2; exit 1; }
    mkdir -p "$cache"
    exec 9>"$cache/$1.lock"
    flock 9
}

# Puts Go's module and build caches in a scratch folder removed when the script exits (only
# what the caller copies out is kept), and refuses toolchain downloads (none is reachable: the
# Go on the PATH builds, or the build fails). Sets `scratch`.
go_tools_scratch() {
    scratch=$(mktemp -d)
    # shellcheck disable=SC2064 # the folder is known now
    trap "chmod -R u+w '$scratch' 2>/dev/null; rm -rf '$scratch'" EXIT
    export GOMODCACHE=$scratch/mod GOCACHE=$scratch/build GOFLAGS=-modcacherw GOTOOLCHAIN=local
}
