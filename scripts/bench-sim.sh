#!/usr/bin/env bash
# Simulation scale benchmark (prints a table): N simulated STARTs sent back to
# back over TLS to the release ciao-launcher; acks, all-running, peak RSS,
# threads, SIGTERM → exit. Options go to the benchmark: --n 1000,4000,10000
# --stack-kib K.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release --bins --example bench_sim
echo "+ target/release/examples/bench_sim --launcher target/release/ciao-launcher $*" >&2
exec target/release/examples/bench_sim --launcher target/release/ciao-launcher "$@"
