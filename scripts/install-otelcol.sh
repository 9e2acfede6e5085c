#!/usr/bin/env bash
# Builds the OpenTelemetry Collector that tests/otlp.rs sends OTLP logs to: scripts/otelcol/
# (the OTLP receiver and the contrib file exporter, collector release v0.161.0 / v1.67.0), from
# the Go module proxy, into ${LOGBRIDGE_CACHE:-~/.cache/logbridge}/otelcol-<version>-<sum>/.
# A fresh machine pays once: 105 s on 2 cores (modules from the proxy and the build, in scratch
# caches removed afterwards), 33 MB kept; later runs find the marker and return at once. Prints the path of the binary. Needs Go 1.26+.
#   LOGBRIDGE_CACHE   cache root (default ~/.cache/logbridge)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$here/otelcol

version=v0.161.0
# A change to the distribution (main.go, go.mod, go.sum) builds a new binary.
sum=$(cat "$src/main.go" "$src/go.mod" "$src/go.sum" | sha256sum | cut -c1-12)
cache=${LOGBRIDGE_CACHE:-$HOME/.cache/logbridge}
home=$cache/otelcol-$version-$sum
binary=$home/otelcol-logbridge

# A finished install leaves this marker, written last: a run cut short is done again.
if [ -f "$home/installed" ]; then
    echo "$binary"
    exit 0
fi
# shellcheck source=lib/go-tools.sh
. "$here/lib/go-tools.sh"
go_tools_lock otelcol
if [ ! -f "$home/installed" ]; then
    go_tools_scratch
    echo "install-otelcol: building the collector $version into $home" >&2
    rm -rf "$home"
    mkdir -p "$home"
    # The source folder may be read-only (a CI clone): build from a copy.
    cp "$src/main.go" "$src/go.mod" "$src/go.sum" "$scratch/"
    (cd "$scratch" && go build -trimpath -ldflags=-s -o "$binary" .)
    "$binary" --version >&2
    echo "$version" > "$home/installed"
fi
echo "$binary"
