#!/usr/bin/env bash
# Docker benchmark (prints a table): N containers started together through
# the release ciao-launcher, then deleted, next to the same work issued
# directly to the engine: N threads doing create + start (then remove) over
# the unix socket, and with --cli one `docker run -d` / `docker rm -f` process
# per container. Prints the launcher's peak RSS and threads, and where its
# memory is (thread stacks, malloc arenas). Runs a private dockerd
# (scripts/start-dockerd.sh).
# Options: --n 10,50  --runs 3 (medians)  --cli  --baseline BIN (another
# launcher binary, run alternately in the same run)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release --bins --example bench_docker
echo "+ target/release/examples/bench_docker --launcher target/release/ciao-launcher $*" >&2
exec target/release/examples/bench_docker --launcher target/release/ciao-launcher "$@"
