#!/usr/bin/env bash
# The opt-in `gssapi` feature (SASL GSSAPI/Kerberos through the system's Cyrus SASL): proves it
# still builds. Installs libsasl2-dev when its header is missing. Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2; return 1; fi
}

if [ ! -e /usr/include/sasl/sasl.h ]; then
    printf '\n== installing libsasl2-dev (for the gssapi feature)\n' >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
        libsasl2-dev pkg-config >/dev/null
fi
# Its own target directory: the feature rebuilds librdkafka, which must not replace the
# default build the tests use.
cargo build --features gssapi --bin logbridge --quiet --target-dir target/gssapi
./target/gssapi/debug/logbridge --version
