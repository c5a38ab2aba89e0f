#!/usr/bin/env bash
# Simulation scale benchmark (prints a table): N simulated STARTs sent back to
# back over TLS to the release ciao-launcher; acks, all-running, peak RSS,
# threads, SIGTERM → exit, each beside the floor measured in the same run
# (bare instance-shaped threads: scripts/bench-thread-floor.sh) and the ratios.
# Options go to the benchmark: --n 1000,4000,10000  --stack-kib K
# --baseline BIN (another launcher, run alternately)
# --idle N [--window SECONDS] (idle cost of N instances: CPU and wake-ups/s)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release --bins --example bench_sim --example bench_thread_floor
set -- --launcher target/release/ciao-launcher --floor target/release/examples/bench_thread_floor "$@"
echo "+ target/release/examples/bench_sim $*" >&2
exec target/release/examples/bench_sim "$@"
