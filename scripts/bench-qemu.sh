#!/usr/bin/env bash
# QEMU benchmark (prints a table): N VMs of the test guest started together
# through the release ciao-launcher — START → all QMP connected, START → all
# GUEST-BOOTED, graceful STOP → all exited — next to the same work done bare
# (qemu-img create + config-drive ISO + qemu-system-x86_64, in parallel), once
# as a plain script and once with QEMU started through setsid. Prints the
# launcher's peak RSS (VmHWM) and thread count.
# Builds the test guest first (cached). Options: --n 1,5,20  --mem 48  --runs 5 (medians, order rotating)
set -euo pipefail
cd "$(dirname "$0")/.."
image=$(scripts/build-guest-image.sh | tail -n 1)
cargo build -q --release --bins --example bench_qemu
echo "+ target/release/examples/bench_qemu --launcher target/release/ciao-launcher --image $image $*" >&2
exec target/release/examples/bench_qemu --launcher target/release/ciao-launcher --image "$image" "$@"
