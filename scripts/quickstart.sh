#!/usr/bin/env bash
# Quick start: build, make ciao-style certificates in a private directory, run
# the embedded scheduler (ciao-lc serve) and a launcher against it on
# loopback, show what happens, then stop both (by PID) and clean up.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "build (release)"
cargo build --release --bins
bin=target/release
work=$(mktemp -d -t ciao-quickstart.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
port=$(( 20000 + RANDOM % 20000 ))

say "certificates in $work/certs"
"$bin/ciao-lc" certs --dir "$work/certs"

say "scheduler: ciao-lc serve on 127.0.0.1:$port"
"$bin/ciao-lc" serve --certs "$work/certs" --listen "127.0.0.1:$port" > "$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do grep -q listening "$work/serve.log" && break; sleep 0.1; done

say "launcher: ciao-launcher -cacert … -cert … -server 127.0.0.1:$port --data-dir $work/data"
"$bin/ciao-launcher" -cacert "$work/certs/CAcert.pem" -cert "$work/certs/cert-CNAgent.pem" \
    -server "127.0.0.1:$port" --data-dir "$work/data" > "$work/launcher.log" 2>&1 &
launcher=$!
pids+=($launcher)
for _ in $(seq 50); do grep -q "connected to the" "$work/launcher.log" && break; sleep 0.1; done

say "launcher log"
cat "$work/launcher.log"
say "scheduler log"
cat "$work/serve.log"

say "SIGTERM to the launcher (pid $launcher)"
kill -TERM "$launcher"
wait "$launcher" && echo "launcher exited with status 0"
sleep 0.2
cat "$work/serve.log" | tail -n 1
say "node UUID kept in $work/data/local/uuid-storage/role/client/0x4: $(cat "$work/data/local/uuid-storage/role/client/0x4")"
