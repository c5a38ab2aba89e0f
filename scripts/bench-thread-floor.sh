#!/usr/bin/env bash
# The floor under scripts/bench-sim.sh (prints a table): N bare threads shaped
# like the launcher's instance threads (inbox, monitor channel, tick, shared
# shutdown, blocked in select!), with no launcher code: spawn time, peak RSS,
# wake + join + exit, and exit without waking them (the kernel's share).
# Options: --n 1000,4000,10000  --stack-kib 128
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release --example bench_thread_floor
exec target/release/examples/bench_thread_floor "$@"
