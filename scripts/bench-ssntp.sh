#!/usr/bin/env bash
# SSNTP throughput benchmark: gob codec and end-to-end TLS over loopback.
# Prints a markdown table. Arguments go to the benchmark (--frames N, --codec-frames N).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "+ cargo run --release --example bench_ssntp -- $*" >&2
cargo run -q --release --example bench_ssntp -- "$@"
