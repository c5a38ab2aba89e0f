#!/usr/bin/env bash
# Stops a private dockerd started by scripts/start-dockerd.sh DIR (by the PID
# in DIR/dockerd.pid: SIGTERM, a bounded wait, then SIGKILL) and removes DIR.
# Idempotent: a missing DIR or a dead daemon is not an error.
set -euo pipefail

die() { echo "stop-dockerd: ERROR: $*" >&2; exit 1; }
log() { echo "stop-dockerd: $*" >&2; }

[ $# -eq 1 ] && [ -n "$1" ] || die "usage: $0 DIR"
DIR=$1
[ -d "$DIR" ] || { log "$DIR does not exist: nothing to do"; exit 0; }
DIR=$(cd "$DIR" && pwd -P)
[ "$DIR" != / ] || die "refusing to remove /"
PIDFILE=$DIR/dockerd.pid
STOP_TIMEOUT=${STOP_TIMEOUT:-20}

pid=""
if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
fi
# Only signal the PID if it is still a dockerd using this DIR (PIDs get reused).
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$DIR/docker.sock"; then
    # The engine runs with --live-restore: its containers would outlive it.
    # Remove them through the engine first, so nothing it started is left.
    ids=$(docker -H "unix://$DIR/docker.sock" ps -aq 2>/dev/null || true)
    if [ -n "$ids" ]; then
        log "removing $(echo "$ids" | wc -w) container(s) left in this engine"
        # shellcheck disable=SC2086
        docker -H "unix://$DIR/docker.sock" rm -f -v $ids >/dev/null 2>&1 || true
    fi
    log "stopping dockerd pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$(( $(date +%s) + STOP_TIMEOUT ))
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log "dockerd pid $pid still alive after ${STOP_TIMEOUT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
else
    log "no running dockerd for $DIR"
fi

# containerd-shims of still-running containers keep mounts/files busy; the
# daemon stops its containers on SIGTERM, so normally nothing is left here.
# vfs leaves no mounts, but the exec-root may hold a netns/shm mount.
if command -v findmnt >/dev/null 2>&1; then
    { findmnt -rn -o TARGET || true; } | { grep -F -- "$DIR/" || true; } | sort -r |
        while read -r m; do
            umount -l "$m" 2>/dev/null || log "could not unmount $m"
        done
fi
rm -rf "$DIR" || die "could not remove $DIR"
log "removed $DIR"
