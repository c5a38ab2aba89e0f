#!/usr/bin/env bash
# Starts a PRIVATE Docker engine for tests and prints its socket path as the
# last line of stdout.
#
#   scripts/start-dockerd.sh [DIR]      (DIR defaults to a new mktemp -d)
#
# Everything lives under DIR: docker.sock, dockerd.pid, dockerd.log, root/
# (data-root) and exec/ (exec-root). The host's /var/run/docker.sock and any
# host dockerd are never used. No networking is set up (--iptables=false
# --bridge=none), so containers must use network mode "none"; vfs storage
# avoids needing overlayfs in nested sandboxes. --live-restore keeps containers
# running while dockerd itself restarts (tests of a dockerd restart rely on it).
#
# Needs docker.io and busybox-static (installed by scripts/test.sh; missing,
# it fails at once naming them), and imports a test image ciao-busybox:latest
# (busybox + applet symlinks; no registry is needed). Idempotent: if a dockerd from DIR is already running it is reused.
# Stop it with scripts/stop-dockerd.sh DIR.
set -euo pipefail

die() { echo "start-dockerd: ERROR: $*" >&2; exit 1; }
log() { echo "start-dockerd: $*" >&2; }

IMAGE=ciao-busybox:latest
READY_TIMEOUT=30

# Nothing is installed here: scripts/test.sh installs every test dependency
# (scripts/deps.sh). A missing one is one line and a failure at once.
command -v dockerd >/dev/null 2>&1 || die "dockerd not found in PATH: install docker.io (scripts/deps.sh lists every test dependency)"
command -v docker >/dev/null 2>&1 || die "docker (the CLI) not found in PATH: install docker.io"
dpkg -s busybox-static >/dev/null 2>&1 || die "busybox-static is not installed (the test image is made from it)"
BUSYBOX=$(dpkg -L busybox-static | grep -E '/busybox$' | head -n1 || true)
[ -n "$BUSYBOX" ] && [ -x "$BUSYBOX" ] || die "busybox-static installed but its busybox binary not found"
command -v tar >/dev/null 2>&1 || die "tar missing"

DIR=${1:-}
if [ -z "$DIR" ]; then
    DIR=$(mktemp -d /tmp/ciao-dockerd.XXXXXX)
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd -P)
SOCK=$DIR/docker.sock
PIDFILE=$DIR/dockerd.pid
LOGFILE=$DIR/dockerd.log
# Unix socket paths are limited to 108 bytes.
[ ${#SOCK} -lt 100 ] || die "socket path too long for a unix socket: $SOCK"

# The docker CLI (any version) negotiates the API version itself; curl is
# only used when present, for the readiness probe.
api_version_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --max-time 2 --unix-socket "$SOCK" http://docker/version >/dev/null 2>&1
    else
        timeout 3 docker -H "unix://$SOCK" version >/dev/null 2>&1
    fi
}

running_pid() {
    local pid
    [ -f "$PIDFILE" ] || return 1
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    # Make sure the PID really is a dockerd (PIDs get reused).
    grep -q dockerd "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

if pid=$(running_pid) && api_version_ok; then
    log "reusing dockerd pid $pid in $DIR"
else
    rm -f "$SOCK" "$PIDFILE"
    mkdir -p "$DIR/root" "$DIR/exec"
    start_ns=$(date +%s%N)
    # setsid: the daemon must not die with the caller's terminal/process group.
    setsid dockerd \
        --iptables=false --ip-masq=false --bridge=none --storage-driver=vfs --live-restore \
        -H "unix://$SOCK" --data-root "$DIR/root" --exec-root "$DIR/exec" \
        --pidfile "$PIDFILE" >"$LOGFILE" 2>&1 </dev/null &
    dpid=$!
    deadline=$(( $(date +%s) + READY_TIMEOUT ))
    until api_version_ok; do
        if ! kill -0 "$dpid" 2>/dev/null; then
            echo "---- $LOGFILE ----" >&2; tail -n 40 "$LOGFILE" >&2 || true
            die "dockerd exited before answering on $SOCK"
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "---- $LOGFILE ----" >&2; tail -n 40 "$LOGFILE" >&2 || true
            kill "$dpid" 2>/dev/null || true
            die "dockerd did not answer GET /version on $SOCK within ${READY_TIMEOUT}s"
        fi
        sleep 0.2
    done
    log "dockerd pid $dpid ready on $SOCK after $(( ($(date +%s%N) - start_ns) / 1000000 )) ms"
fi

if docker -H "unix://$SOCK" image inspect "$IMAGE" >/dev/null 2>&1; then
    log "image $IMAGE already present"
else
    start_ns=$(date +%s%N)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/rootfs/bin" "$work/rootfs/tmp"
    chmod 1777 "$work/rootfs/tmp"
    cp "$BUSYBOX" "$work/rootfs/bin/busybox"
    for a in sh sleep echo cat touch ls true false pwd env id mkdir rm; do
        ln -s busybox "$work/rootfs/bin/$a"
    done
    tar -C "$work/rootfs" -cf "$work/img.tar" . || die "tar of the image rootfs failed"
    docker -H "unix://$SOCK" import \
        --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' \
        "$work/img.tar" "$IMAGE" >&2 || die "docker import of $IMAGE failed"
    log "imported $IMAGE in $(( ($(date +%s%N) - start_ns) / 1000000 )) ms"
fi

echo "$SOCK"
