#!/usr/bin/env bash
# Builds a Debian package of ciao-launcher with dpkg-deb:
#
#   scripts/package-deb.sh [--bin-dir DIR] [--out DIR] [--fast]
#
# It holds both binaries (/usr/bin/ciao-launcher, /usr/bin/ciao-lc), both man
# pages, the systemd unit (/lib/systemd/system/ciao-launcher.service), its
# flags file /etc/default/ciao-launcher (a conffile), and the directories
# /var/lib/ciao and /etc/pki/ciao. Without --bin-dir the release binaries
# are built first (cargo build --release); with it, the binaries in DIR are
# packaged as they are (the tests package their debug build). Prints the
# path of the .deb as the last line of stdout. --fast compresses with gzip -1
# (for tests of debug builds) instead of xz. No maintainer scripts: after
# installing, run `systemctl daemon-reload && systemctl enable --now
# ciao-launcher` once the certificates are in /etc/pki/ciao.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "package-deb: $*" >&2; exit 1; }

bin_dir=
out=target/deb
compress=(-Zxz)
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --fast) compress=(-Zgzip -z1); shift ;;
        *) die "usage: scripts/package-deb.sh [--bin-dir DIR] [--out DIR] [--fast]" ;;
    esac
done
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (package dpkg)"

if [ -z "$bin_dir" ]; then
    cargo build --release --bins >&2
    bin_dir=target/release
fi
for b in ciao-launcher ciao-lc; do
    [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing"
done

name=ciao-launcher
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || die "no version in Cargo.toml"
arch=$(dpkg --print-architecture)
# The glibc the binaries need: the newest GLIBC_x.y version they require,
# and 2.36 if they are linked with packed relative relocations (DT_RELR,
# build.rs), which older loaders cannot read.
glibc=$( { objdump -p "$bin_dir/ciao-launcher" "$bin_dir/ciao-lc" 2>/dev/null \
    | grep -o 'GLIBC_[0-9.]*[0-9]\|GLIBC_ABI_DT_RELR' \
    | sed 's/GLIBC_ABI_DT_RELR/2.36/; s/GLIBC_//'; } | sort -uV | tail -n 1 || true)
libc_dep=libc6${glibc:+ (>= $glibc)}

mkdir -p "$out"
root=$(mktemp -d "$out/root.XXXXXX")
trap 'rm -rf "$root"' EXIT

install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/man/man1" \
    "$root/usr/share/man/man8" "$root/lib/systemd/system" "$root/etc/default" \
    "$root/usr/share/doc/$name"
install -d -m 0755 "$root/var/lib/ciao"
# Private keys live here.
install -d -m 0700 "$root/etc/pki/ciao"
install -m 0755 "$bin_dir/ciao-launcher" "$bin_dir/ciao-lc" "$root/usr/bin/"
gzip -9n -c man/ciao-launcher.8 > "$root/usr/share/man/man8/ciao-launcher.8.gz"
gzip -9n -c man/ciao-lc.1 > "$root/usr/share/man/man1/ciao-lc.1.gz"
install -m 0644 packaging/ciao-launcher.service "$root/lib/systemd/system/"
install -m 0644 packaging/ciao-launcher.default "$root/etc/default/ciao-launcher"
cat > "$root/usr/share/doc/$name/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ciao-launcher-rs
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF
chmod 0644 "$root/usr/share/doc/$name/copyright"

size=$(du -sk --exclude=DEBIAN "$root" | awk '{print $1}')
cat > "$root/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: ciao-launcher-rs developers <ciao-launcher-rs@localhost>
Installed-Size: $size
Depends: $libc_dep, qemu-system-x86, qemu-utils, xorriso | genisoimage, ovmf
Recommends: docker.io
Section: admin
Priority: optional
Homepage: https://github.com/ciao-project/ciao
Description: compute-node agent of the CIAO cloud orchestrator
 ciao-launcher runs on every compute node of a CIAO cloud. It holds one
 mutually authenticated TLS connection (SSNTP) to the ciao scheduler,
 reports the node's capacity and its instances' statistics, and starts,
 stops and deletes the QEMU/KVM virtual machines and Docker containers the
 scheduler asks for. ciao-lc makes certificates and runs a small scheduler
 to try it out.
EOF
echo /etc/default/ciao-launcher > "$root/DEBIAN/conffiles"

deb="$out/${name}_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >&2
echo "$deb"
