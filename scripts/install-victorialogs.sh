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
# shellcheck source=lib/go-tools.sh
. "$(dirname "$0")/lib/go-tools.sh"
go_tools_lock victorialogs
if [ ! -f "$home/installed" ]; then
    echo "install-victorialogs: building VictoriaLogs $version into $home" >&2
    go_tools_scratch
    rm -rf "$home"
    mkdir -p "$home/bin"
    GOBIN=$home/bin go install "github.com/VictoriaMetrics/VictoriaLogs/app/victoria-logs@$version"
    echo "$version" > "$home/installed"
fi
echo "$home/bin/victoria-logs"
