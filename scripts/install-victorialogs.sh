#!/usr/bin/env bash
# Installs VictoriaLogs, the server tests/loki.rs pushes to through Loki's push API
# (`/insert/loki/api/v1/push`; Loki itself is AGPL-licensed and not used here), built from its
# Go module (github.com/VictoriaMetrics/VictoriaLogs) into a cache folder. A fresh machine pays
# once: about 20 s of build and 60 MB of modules; later runs find the binary at once.
# Prints the binary's path. Needs Go 1.26+ and a C compiler (its zstd is cgo).
#   LOGBRIDGE_CACHE   cache root (default ~/.cache/logbridge)
set -euo pipefail

version=v1.52.2
cache=${LOGBRIDGE_CACHE:-$HOME/.cache/logbridge}
home=$cache/victorialogs-$version

if [ -f "$home/installed" ]; then
    echo "$home/bin/victoria-logs"
    exit 0
fi
command -v go >/dev/null || { echo "install-victorialogs: go not found (Go 1.26+ is needed)" >&2; exit 1; }
mkdir -p "$cache"
# Two test binaries (or two checkouts) may install at once: one does, the other waits.
exec 9>"$cache/victorialogs.lock"
flock 9
if [ ! -f "$home/installed" ]; then
    echo "install-victorialogs: building VictoriaLogs $version into $home" >&2
    # Modules and build objects go to a scratch folder, removed at the end.
    scratch=$(mktemp -d)
    trap 'chmod -R u+w "$scratch" 2>/dev/null; rm -rf "$scratch"' EXIT
    export GOMODCACHE=$scratch/mod GOCACHE=$scratch/build GOFLAGS=-modcacherw GOTOOLCHAIN=local
    rm -rf "$home"
    mkdir -p "$home/bin"
    GOBIN=$home/bin go install "github.com/VictoriaMetrics/VictoriaLogs/app/victoria-logs@$version"
    echo "$version" > "$home/installed"
fi
echo "$home/bin/victoria-logs"
