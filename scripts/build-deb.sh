#!/bin/sh
# Builds the logbridge Debian package with dpkg-deb (no cargo-deb to compile) from
# packaging/deb/ and a logbridge binary:
#
#   scripts/build-deb.sh [--out DIR] [--compression xz|gzip|zstd|none] [--no-strip] [BINARY]
#
# BINARY (or LOGBRIDGE_DEB_BINARY) defaults to target/release/logbridge, built with
# `cargo build --release --locked` when it is missing. The package is written to
# DIR/logbridge_<version>_<arch>.deb (DIR defaults to target/), its path printed on stdout;
# everything else goes to stderr. Relative paths are taken from the repository's root. The
# version is Cargo.toml's, the architecture dpkg's.
# Shared-library dependencies come from dpkg-shlibdeps (dpkg-dev) or, without it, from the
# packages owning what `ldd` lists. LOGBRIDGE_DEB_MAINTAINER sets the Maintainer field.
set -eu
cd "$(dirname "$0")/.."

usage() {
    echo "usage: scripts/build-deb.sh [--out DIR] [--compression xz|gzip|zstd|none] [--no-strip] [BINARY]" >&2
    exit 2
}
die() {
    echo "build-deb: $*" >&2
    exit 1
}

out=target
compression=${LOGBRIDGE_DEB_COMPRESSION:-xz}
strip=yes
binary=${LOGBRIDGE_DEB_BINARY:-}
while [ $# -gt 0 ]; do
    case "$1" in
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    --compression) [ $# -ge 2 ] || usage; compression=$2; shift 2 ;;
    --no-strip) strip=no; shift ;;
    -h | --help) usage ;;
    -*) echo "build-deb: unknown option $1" >&2; usage ;;
    *) binary=$1; shift ;;
    esac
done
case "$compression" in xz | gzip | zstd | none) ;; *) die "--compression: xz, gzip, zstd or none" ;; esac

for tool in dpkg-deb dpkg gzip; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (Debian's dpkg and gzip packages)"
done

if [ -z "$binary" ]; then
    binary=target/release/logbridge
    if [ ! -x "$binary" ]; then
        echo "build-deb: $binary is missing: cargo build --release --locked" >&2
        cargo build --release --locked --bin logbridge >&2
    fi
fi
[ -f "$binary" ] && [ -x "$binary" ] || die "$binary is not an executable file"

# The version of [package] in Cargo.toml; a pre-release (0.2.0-rc.1) sorts before its release
# in Debian only with a tilde (0.2.0~rc.1).
cargo_version=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
[ -n "$cargo_version" ] || die "no version in Cargo.toml's [package]"
version=$(printf '%s' "$cargo_version" | tr '-' '~')
arch=$(dpkg --print-architecture)

# A stale binary would be packaged under the wrong version: it must say it is this one.
binary_version=$("$binary" --version 2>/dev/null | head -n 1) || die "$binary --version failed"
[ "$binary_version" = "logbridge $cargo_version" ] ||
    die "$binary says '$binary_version', Cargo.toml says $cargo_version: rebuild it"

# Same archive for the same commit: file times clamped to the last commit's.
if [ -z "${SOURCE_DATE_EPOCH:-}" ] && epoch=$(git log -1 --format=%ct 2>/dev/null); then
    SOURCE_DATE_EPOCH=$epoch
    export SOURCE_DATE_EPOCH
fi

umask 022
stage=$(mktemp -d "${TMPDIR:-/tmp}/logbridge-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
trap 'exit 130' INT TERM
root=$stage/root
doc=$root/usr/share/doc/logbridge
mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/default" \
    "$root/etc/logbridge" "$doc/examples"

if [ "$strip" = yes ] && command -v strip >/dev/null 2>&1; then
    # What dh_strip does to an executable (Debian policy 10.1: binaries are shipped stripped).
    strip --remove-section=.comment --remove-section=.note -o "$root/usr/bin/logbridge" "$binary"
else
    [ "$strip" = no ] || echo "build-deb: strip (binutils) is missing: the binary is not stripped" >&2
    cp "$binary" "$root/usr/bin/logbridge"
fi
chmod 0755 "$root/usr/bin/logbridge"

src=packaging/deb
install -m 0644 "$src/logbridge.service" "$root/lib/systemd/system/logbridge.service"
# May hold secrets: root only (systemd reads it as root before dropping to the logbridge user).
install -m 0600 "$src/logbridge.default" "$root/etc/default/logbridge"
# root:root here; the postinst gives it the logbridge group (which does not exist yet).
install -m 0640 "$src/logbridge.toml" "$root/etc/logbridge/logbridge.toml"
install -m 0644 "$src/conffiles" "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$src/$script" "$root/DEBIAN/$script"
done

install -m 0644 "$src/copyright" "$doc/copyright"
gzip -9n -c docs/runbook.md >"$doc/runbook.md.gz"
for file in alerts.yml alerts.test.yml; do
    gzip -9n -c "config/$file" >"$doc/examples/$file.gz"
done
chmod 0644 "$doc/runbook.md.gz" "$doc"/examples/*.gz

# Shared libraries the binary links (OpenSSL and librdkafka are built in), passwd for the
# postinst's useradd and procps for the unit's ExecReload=/bin/kill.
if command -v dpkg-shlibdeps >/dev/null 2>&1; then
    # dpkg-shlibdeps reads debian/control of a source tree: give it a minimal one.
    mkdir -p "$stage/src/debian"
    printf 'Source: logbridge\n\nPackage: logbridge\nArchitecture: any\n' >"$stage/src/debian/control"
    # Its one expected warning (the binary is not under debian/) is left out of what it prints.
    if ! shlibs=$(cd "$stage/src" && dpkg-shlibdeps -O "$root/usr/bin/logbridge" 2>"$stage/shlibdeps.err"); then
        cat "$stage/shlibdeps.err" >&2
        die "dpkg-shlibdeps failed on the binary"
    fi
    grep -v "should already be installed in their package's directory" "$stage/shlibdeps.err" >&2 || true
    shlibs=${shlibs#shlibs:Depends=}
else
    echo "build-deb: dpkg-shlibdeps (dpkg-dev) is missing: unversioned dependencies from ldd" >&2
    shlibs=$(ldd "$root/usr/bin/logbridge" | awk '$3 ~ /^\// { print $3 }' | while read -r lib; do
        dpkg -S "$lib" 2>/dev/null || dpkg -S "$(readlink -f "$lib")" 2>/dev/null || true
    done | sed 's/:.*//' | sort -u | paste -sd, - | sed 's/,/, /g')
    [ -n "$shlibs" ] || die "cannot tell which packages hold the binary's shared libraries"
fi
depends="$shlibs, passwd, procps"

installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
maintainer=${LOGBRIDGE_DEB_MAINTAINER:-logbridge maintainers <logbridge@localhost>}
# Taken literally by sed's replacement: \, & and the | delimiter escaped.
maintainer=$(printf '%s' "$maintainer" | sed 's/[\\&|]/\\&/g')
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
    -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@DEPENDS@|$depends|" \
    "$src/control.in" >"$root/DEBIAN/control"
chmod 0644 "$root/DEBIAN/control"
(cd "$root" && find . -type f ! -path './DEBIAN/*' -print0 | sort -z | xargs -0 md5sum |
    sed 's|  \./|  |') >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb=$out/logbridge_${version}_${arch}.deb
# gzip at level 1 is for tests (under a second, against about ten for xz); xz is dpkg's default.
case "$compression" in
gzip) level=1 ;;
none) level=0 ;;
*) level=6 ;;
esac
dpkg-deb --root-owner-group -Z"$compression" -z"$level" --build "$root" "$deb" >&2
echo "$deb"
