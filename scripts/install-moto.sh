#!/usr/bin/env bash
# Installs moto's S3 server (PyPI `moto[server]`, Apache-2.0; MinIO is AGPL-licensed and not
# used here), the S3 store tests/object_store.rs archives to, into a virtualenv in a cache
# folder with boto3 beside it (the store's standard client, which the tests read objects with).
# A fresh machine pays once (about 20 s); later runs find it at once.
# Prints the virtualenv's bin folder (`moto_server`, `python`). Needs Python 3.9+ with venv.
#   LOGBRIDGE_CACHE   cache root (default ~/.cache/logbridge)
set -euo pipefail

version=5.2.6
cache=${LOGBRIDGE_CACHE:-$HOME/.cache/logbridge}
home=$cache/moto-$version

if [ -f "$home/installed" ]; then
    echo "$home/bin"
    exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/moto.lock"
flock 9
if [ ! -f "$home/installed" ]; then
    echo "install-moto: installing moto[server] $version into $home" >&2
    rm -rf "$home"
    python3 -m venv "$home"
    "$home/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$version" boto3 >&2
    "$home/bin/python" -c 'import moto, boto3, flask' >&2
    echo "$version" > "$home/installed"
fi
echo "$home/bin"
