#!/usr/bin/env bash
# Quick start: build, make ciao-style certificates in a private directory, run
# the embedded scheduler (ciao-lc serve) and a launcher (simulated instances)
# on 127.0.0.1, start a few instances, list them, stop, restart and delete
# them while `ciao-lc watch` shows what happens, then stop everything (by PID)
# and clean up.
#
# Then, where QEMU and a Docker engine are available (or with --real, which
# installs them with scripts/deps.sh, as the tests do), it also runs one real
# container (a private dockerd) and one real VM of the test guest (built once,
# then cached: a few minutes the first time) through a second launcher without
# -simulation, shows them in `ciao-lc list` with their figures, stops and
# deletes them. --sim-only skips that part.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

real=auto
for a in "$@"; do
    case "$a" in
        --real) real=yes ;;
        --sim-only) real=no ;;
        *) echo "usage: scripts/quickstart.sh [--real | --sim-only]" >&2; exit 2 ;;
    esac
done
if [ "$real" = yes ]; then
    say "installing what real instances need (scripts/deps.sh)"
    . scripts/deps.sh
    deps_install
fi

say "build (release)"
cargo build --release --bins
bin=$PWD/target/release
work=$(mktemp -d -t ciao-quickstart.XXXXXX)
pids=()
dockerd_dir=
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "$dockerd_dir" ]; then "$OLDPWD_REPO/scripts/stop-dockerd.sh" "$dockerd_dir" >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
OLDPWD_REPO=$PWD
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

# ---------------------------------------------------------------- real instances
missing=()
for p in qemu-system-x86_64 qemu-img xorriso dockerd docker; do
    command -v "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "$real" = no ]; then
    say "done (--sim-only): everything ran in $work, which is now removed"
    exit 0
fi
if [ ${#missing[@]} -gt 0 ] || [ "$(id -u)" -ne 0 ]; then
    why=${missing[*]:+missing: ${missing[*]}}
    [ "$(id -u)" -eq 0 ] || why="${why:+$why; }a private Docker engine needs root"
    say "no real instances ($why; scripts/quickstart.sh --real installs them)"
    say "done: everything ran in $work, which is now removed"
    exit 0
fi

say "real instances: the test guest image (cached after the first build)"
image=$("$OLDPWD_REPO/scripts/build-guest-image.sh" | tail -n 1)
image_uuid=7e57a9e0-0c1a-4000-8000-000000000001
mkdir -p "$work/real/images"
cp "$image" "$work/real/images/$image_uuid"
echo "$image → $work/real/images/$image_uuid"

say "a private Docker engine (scripts/start-dockerd.sh; no networking, test image ciao-busybox)"
dockerd_dir=$(mktemp -d /tmp/ciao-qs-dockerd.XXXXXX)
sock=$("$OLDPWD_REPO/scripts/start-dockerd.sh" "$dockerd_dir" | tail -n 1)
echo "engine on $sock"

say "launcher without -simulation: data in $work/real (its start-up checks below)"
"$bin/ciao-launcher" -cacert certs/CAcert.pem -cert certs/cert-CNAgent.pem -server "$addr" \
    --data-dir "$work/real" --docker-socket "$sock" --disk-limit=false --stats-interval 1 \
    --usage-interval 1 --stop-timeout 5 -logtostderr 2> real-launcher.log &
launcher=$!
pids+=($launcher)
wait_for "the launcher to connect" sh -c "'$bin/ciao-lc' stats | grep -q READY"
grep -E 'virtual machines: |containers: ' real-launcher.log | sed 's/^/   /'

say "start one container and one VM (legacy BIOS, 64 MB, TCG or KVM as the launcher chose)"
printf '#cloud-config\nruncmd:\n  - [ sh, -c, "busybox dd if=/dev/zero of=/tmp/f bs=1M count=5; trap \\"exit 0\\" TERM; sleep 600 & wait" ]\n' > ud-container
printf '#cloud-config\nruncmd:\n  - [ sh, -c, "echo hello from the VM" ]\n' > ud-vm
ct=$(lc start --docker-image ciao-busybox:latest --mem-mb 64 --user-data ud-container | awk '{print $2}')
vm=$(lc start --image "$image_uuid" --legacy --mem-mb 64 --user-data ud-vm | awk '{print $2}')
echo "container $ct, VM $vm"
wait_for "both running" sh -c "[ \$('$bin/ciao-lc' list | grep -c running) -eq 2 ]"
for _ in $(seq 600); do
    grep -q GUEST-BOOTED "$work/real/instances/$vm/console.log" 2>/dev/null && break
    sleep 0.2
done
grep -a GUEST- "$work/real/instances/$vm/console.log" | tr -d '\r' | sed 's/^/   console | /' || true
# Figures come with the next usage samples and STATS (a second or two).
for _ in $(seq 50); do
    lc list | grep "$ct" | grep -qv ' 0 MiB  *0 MiB' && break
    sleep 0.2
done
lc list

say "stop both"
lc stop "$ct"
lc stop "$vm"
wait_for "both to stop" sh -c "[ \$('$bin/ciao-lc' list | grep -c exited) -eq 2 ]"
lc list

say "delete both"
lc delete "$ct"
lc delete "$vm"
wait_for "no instances" sh -c "[ \$('$bin/ciao-lc' list | wc -l) -eq 1 ]"
lc list
kill -TERM "$launcher"
wait "$launcher" && echo "launcher exited with status 0"
say "done: everything ran in $work, which is now removed"
