#!/usr/bin/env bash
# Docker benchmark (prints a table): N containers started together through
# the release ciao-launcher, then deleted, next to the same work issued
# directly to the engine in parallel (docker run -d / docker rm -f). Runs a
# private dockerd (scripts/start-dockerd.sh). Options: --n 10,50
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release --bins --example bench_docker
echo "+ target/release/examples/bench_docker --launcher target/release/ciao-launcher $*" >&2
exec target/release/examples/bench_docker --launcher target/release/ciao-launcher "$@"
