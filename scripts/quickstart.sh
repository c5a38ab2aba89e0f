#!/usr/bin/env bash
# Quick start: build, make ciao-style certificates in a private directory, run
# the embedded scheduler (ciao-lc serve) and a launcher (simulated instances)
# on 127.0.0.1, start a few instances, list them, stop, restart and delete
# them while `ciao-lc watch` shows what happens, then stop everything (by PID)
# and clean up.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "build (release)"
cargo build --release --bins
bin=$PWD/target/release
work=$(mktemp -d -t ciao-quickstart.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
lc() { "$bin/ciao-lc" "$@"; }
wait_for() { # wait_for DESCRIPTION COMMAND...: poll (max 15 s)
    local what=$1; shift
    for _ in $(seq 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for $what" >&2; return 1
}

say "certificates (ciao style: the scheduler's certificate is the CA) in $work/certs"
lc certs --dir certs

say "scheduler: ciao-lc serve (log in $work/serve.log)"
# Background the binaries themselves (not a shell function) so $! is their PID.
"$bin/ciao-lc" serve --certs certs --listen 127.0.0.1:0 > serve.log 2>&1 &
pids+=($!)
wait_for "the scheduler" grep -q listening serve.log
addr=$(grep -o 'listening on [0-9.:]*' serve.log | awk '{print $3}')
echo "listening on $addr"

say "launcher: ciao-launcher -simulation, data in $work/data (log in $work/data/logs)"
"$bin/ciao-launcher" -cacert certs/CAcert.pem -cert certs/cert-CNAgent.pem -server "$addr" \
    --data-dir "$work/data" -simulation --disk-limit=false --stats-interval 1 &
launcher=$!
pids+=($launcher)
wait_for "the launcher to connect" sh -c "'$bin/ciao-lc' stats | grep -q READY"
lc stats

say "watching events (ciao-lc watch, lines marked 'watch |')"
"$bin/ciao-lc" watch > >(sed -u 's/^/   watch | /') &
pids+=($!)

say "start 3 instances"
ids=()
for n in 1 2 3; do
    id=$(lc start --sim --vcpus 2 --mem-mb $((256 * n)) | awk '{print $2}')
    echo "started $id"
    ids+=("$id")
done
wait_for "3 running instances" sh -c "[ \$('$bin/ciao-lc' list | grep -c running) -eq 3 ]"
lc list

say "stop ${ids[0]}"
lc stop "${ids[0]}"
wait_for "the instance to stop" sh -c "'$bin/ciao-lc' list | grep '${ids[0]}' | grep -q exited"
lc list

say "restart ${ids[0]}"
lc restart "${ids[0]}"
wait_for "the instance to run" sh -c "'$bin/ciao-lc' list | grep '${ids[0]}' | grep -q running"

say "delete all three"
for id in "${ids[@]}"; do lc delete "$id"; done
wait_for "no instances" sh -c "[ \$('$bin/ciao-lc' list | wc -l) -eq 1 ]"
lc list

say "SIGTERM to the launcher (pid $launcher): instances would keep running"
kill -TERM "$launcher"
wait "$launcher" && echo "launcher exited with status 0"
say "done: everything ran in $work, which is now removed"
