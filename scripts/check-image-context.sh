#!/usr/bin/env bash
# Type-checks logbridge from exactly what the Dockerfile's build stage copies (no Docker engine
# needed), so that a file the build reads from outside those paths (an `include_str!` of a doc,
# a build script, a new top-level folder) fails the test command instead of `docker build`.
# Uses the repository's target folder: the dependencies checked by clippy are reused, and only
# the copy of the crate itself is checked again.
set -euo pipefail
cd "$(dirname "$0")/.."

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT

# The COPY lines of the first stage (up to the second FROM), without --from: sources, then the
# destination relative to WORKDIR.
copies=$(awk '/^FROM /{stage++} stage==1 && /^COPY / && !/--from/ {sub(/^COPY +/, ""); print}' Dockerfile)
if [ -z "$copies" ]; then
    echo "check-image-context: no COPY in the Dockerfile's build stage" >&2
    exit 1
fi
while read -r -a args; do
    dest=${args[-1]}
    unset 'args[-1]'
    for source in "${args[@]}"; do
        if [ ! -e "$source" ]; then
            echo "check-image-context: the Dockerfile copies $source, which does not exist" >&2
            exit 1
        fi
        if [[ $dest == */ ]]; then
            mkdir -p "$context/$dest"
            cp -R "$source" "$context/$dest"
        else
            mkdir -p "$(dirname "$context/$dest")"
            cp -R "$source" "$context/$dest"
        fi
    done
done <<< "$copies"

echo "check-image-context: $(cd "$context" && find . -type f | wc -l) files copied as the Dockerfile does" >&2
if ! CARGO_TARGET_DIR="$PWD/target" cargo check --quiet --offline --locked --bin logbridge \
    --manifest-path "$context/Cargo.toml"; then
    echo "check-image-context: the crate does not build from what the Dockerfile copies" >&2
    exit 1
fi
echo "check-image-context: the crate type-checks from the image's build context" >&2
