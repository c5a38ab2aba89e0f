#!/usr/bin/env bash
# guest-smoke.sh - manual end-to-end check of the test guest image built by
# scripts/build-guest-image.sh (not part of `cargo test`).
#
# Usage:
#   scripts/guest-smoke.sh [--image PATH] [--out DIR] [--mode bios|efi|both] [--keep]
#     --image PATH  guest image to test (default: run build-guest-image.sh,
#                   which returns the cached image quickly)
#     --out DIR     passed to build-guest-image.sh when --image is not given
#     --mode M      firmware to test (default: both)
#     --keep        keep the private temp dir (console logs) for inspection
#   For each firmware: boots the image under TCG through a fresh qcow2
#   overlay with a config-2 drive, checks GUEST-BOOTED / GUEST-PERSIST /
#   GUEST-RUNCMD-DONE, powers it off via QMP system_powerdown (QEMU must exit
#   0), boots the same overlay again and checks that /root/marker persisted.
#   Exits non-zero on the first failure.  Needs qemu-system-x86_64,
#   qemu-img, xorriso, python3 or socat (for QMP; GUEST_SMOKE_QMP=socat
#   forces socat) and OVMF for EFI.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
IMAGE=""
OUT_ARGS=()
MODE=both
KEEP=0
BOOT_TIMEOUT_BIOS=60   # s until GUEST-BOOTED (measured ~3-5 s)
BOOT_TIMEOUT_EFI=120   # s until GUEST-BOOTED (measured ~8-10 s)
RUNCMD_TIMEOUT=30      # s from GUEST-BOOTED to GUEST-RUNCMD-DONE
POWEROFF_TIMEOUT=10    # s from system_powerdown to QEMU exit (expect < 2)

log() { printf '[guest-smoke] %s\n' "$*" >&2; }
die() { printf '[guest-smoke] FAIL: %s\n' "$*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --image) [[ $# -ge 2 ]] || die "--image needs a path"; IMAGE="$2"; shift 2 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; OUT_ARGS=(--out "$2"); shift 2 ;;
    --mode) [[ $# -ge 2 ]] || die "--mode needs bios|efi|both"; MODE="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
case "$MODE" in bios|efi|both) ;; *) die "--mode must be bios, efi or both" ;; esac

for tool in qemu-system-x86_64 qemu-img xorriso; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (install it first)"
done
# QMP client: python3 if present, else socat; GUEST_SMOKE_QMP=socat|python3
# forces one (used to test both paths).
QMP_TOOL="${GUEST_SMOKE_QMP:-}"
if [[ -z "$QMP_TOOL" ]]; then
  if command -v python3 >/dev/null 2>&1; then
    QMP_TOOL=python3
  elif command -v socat >/dev/null 2>&1; then
    QMP_TOOL=socat
  else
    die "need python3 or socat to talk QMP"
  fi
fi
case "$QMP_TOOL" in python3|socat) ;; *) die "GUEST_SMOKE_QMP must be python3 or socat" ;; esac
command -v "$QMP_TOOL" >/dev/null 2>&1 || die "$QMP_TOOL not found"

if [[ -z "$IMAGE" ]]; then
  IMAGE="$("$SCRIPT_DIR/build-guest-image.sh" "${OUT_ARGS[@]}" | tail -n 1)"
fi
IMAGE="$(readlink -f "$IMAGE")" # qcow2 backing paths must be absolute
[[ -s "$IMAGE" ]] || die "image $IMAGE missing"

# Private scratch dir; the EXIT trap kills only QEMU processes started here.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/guest-smoke.XXXXXX")"
QEMU_PIDS=()
cleanup() {
  local pid
  for pid in "${QEMU_PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  if [[ $KEEP -eq 1 ]]; then
    log "kept $WORK"
  else
    rm -rf -- "$WORK"
  fi
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# console.log without the CRs of the serial line discipline
console() { tr -d '\r' <"$1"; }

# wait_line LOG REGEX TIMEOUT PID: poll until a console line matches
# (grep -E, whole line); fail if QEMU dies or the timeout expires.
wait_line() {
  local logf="$1" re="$2" timeout="$3" pid="$4" start
  start=$(now)
  while :; do
    if [[ -f "$logf" ]] && console "$logf" | grep -qxE -- "$re"; then return 0; fi
    kill -0 "$pid" 2>/dev/null || { console "$logf" >&2 || true; die "QEMU exited while waiting for /$re/"; }
    if awk -v a="$start" -v b="$(now)" -v t="$timeout" 'BEGIN { exit !(b - a > t) }'; then
      console "$logf" >&2 || true
      die "timeout (${timeout}s) waiting for /$re/ in $logf"
    fi
    sleep 0.1
  done
}

# qmp_powerdown SOCKET: negotiate capabilities, then press the power button.
qmp_powerdown() {
  local sock="$1"
  if [[ $QMP_TOOL == python3 ]]; then
    python3 - "$sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
f = s.makefile("rw")
def reply():
    # skip asynchronous events until a command answer arrives
    while True:
        line = f.readline()
        if not line:
            sys.exit("QMP connection closed")
        msg = json.loads(line)
        if "return" in msg or "error" in msg:
            return msg
json.loads(f.readline())  # greeting
for cmd in ("qmp_capabilities", "system_powerdown"):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    r = reply()
    if "error" in r:
        sys.exit("QMP %s failed: %s" % (cmd, r["error"]))
PY
  else
    printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"system_powerdown"}' |
      socat -t 2 - "UNIX-CONNECT:$sock" >/dev/null
  fi
}

# wait_exit PID TIMEOUT: wait for QEMU to exit; sets EXIT_RC.
wait_exit() {
  local pid="$1" timeout="$2" start
  start=$(now)
  while kill -0 "$pid" 2>/dev/null; do
    if awk -v a="$start" -v b="$(now)" -v t="$timeout" 'BEGIN { exit !(b - a > t) }'; then
      die "QEMU (pid $pid) still running ${timeout}s after system_powerdown"
    fi
    sleep 0.02
  done
  EXIT_RC=0
  wait "$pid" || EXIT_RC=$?
}

make_config_iso() { # dir iso uuid hostname user_data_file
  local dir="$1" iso="$2"
  mkdir -p "$dir/openstack/latest"
  printf '{"uuid": "%s", "hostname": "%s", "name": "%s"}\n' "$3" "$4" "$4" \
    >"$dir/openstack/latest/meta_data.json"
  cp "$5" "$dir/openstack/latest/user_data"
  xorriso -as mkisofs -quiet -V config-2 -J -R -o "$iso" "$dir" 2>/dev/null \
    || die "xorriso failed for $iso"
}

find_ovmf() {
  local code vars
  for code in /usr/share/OVMF/OVMF_CODE_4M.fd /usr/share/OVMF/OVMF_CODE.fd; do
    vars="${code/CODE/VARS}"
    if [[ -f $code && -f $vars ]]; then
      OVMF_CODE="$code"; OVMF_VARS="$vars"; return 0
    fi
  done
  die "OVMF not found (apt-get install ovmf)"
}

# boot FW DIR TAG CFGISO: start QEMU and wait for the guest to finish its
# user data; sets QPID, LOG, BOOT_S.
boot() {
  local fw="$1" dir="$2" tag="$3" cfg="$4" t0 timeout
  local -a args
  LOG="$dir/console-$tag.log"
  rm -f "$dir/qmp.sock"
  args=(-accel tcg -machine pc -nodefaults -nographic -display none -nic none
        -serial "file:$LOG" -qmp "unix:$dir/qmp.sock,server=on,wait=off")
  if [[ $fw == bios ]]; then
    args+=(-m 64 -drive "file=$dir/overlay.qcow2,if=virtio,format=qcow2")
    timeout=$BOOT_TIMEOUT_BIOS
  else
    # OVMF needs more RAM; the boot disk gets bootindex=0 so OVMF picks it.
    args+=(-m 128
           -drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE"
           -drive "if=pflash,format=raw,unit=1,file=$dir/OVMF_VARS.fd"
           -drive "file=$dir/overlay.qcow2,if=none,id=bootdisk,format=qcow2"
           -device "virtio-blk-pci,drive=bootdisk,bootindex=0")
    timeout=$BOOT_TIMEOUT_EFI
  fi
  args+=(-drive "file=$cfg,if=virtio,format=raw,readonly=on")
  t0=$(now)
  qemu-system-x86_64 "${args[@]}" </dev/null >"$dir/qemu-$tag.out" 2>&1 &
  QPID=$!
  QEMU_PIDS+=("$QPID")
  wait_line "$LOG" 'GUEST-BOOTED .*' "$timeout" "$QPID"
  BOOT_S=$(elapsed "$t0" "$(now)")
  wait_line "$LOG" 'GUEST-RUNCMD-DONE rc=[0-9]+' "$RUNCMD_TIMEOUT" "$QPID"
}

powerdown() { # pid log
  local t0 s
  t0=$(now)
  qmp_powerdown "$WORK_DIR/qmp.sock" || die "QMP system_powerdown failed"
  wait_exit "$1" "$POWEROFF_TIMEOUT"
  s=$(elapsed "$t0" "$(now)")
  [[ $EXIT_RC -eq 0 ]] || die "QEMU exit status $EXIT_RC after powerdown"
  console "$2" | grep -qx 'GUEST-POWERDOWN' || die "no GUEST-POWERDOWN line in $2"
  POWEROFF_S=$s
}

expect_line() { # log exact-line
  console "$1" | grep -qxF -- "$2" || { console "$1" >&2; die "missing line '$2' in $1"; }
}

run_mode() {
  local fw="$1" uuid host
  WORK_DIR="$WORK/$fw"
  mkdir -p "$WORK_DIR"
  uuid="$(cat /proc/sys/kernel/random/uuid)"
  host="smoke-$fw"
  [[ $fw == efi ]] && { find_ovmf; cp "$OVMF_VARS" "$WORK_DIR/OVMF_VARS.fd"; }
  qemu-img create -q -f qcow2 -F raw -b "$IMAGE" "$WORK_DIR/overlay.qcow2" 64M

  # Boot 1: cloud-config runcmd with both entry styles.
  cat >"$WORK_DIR/ud1" <<'EOF'
#cloud-config
runcmd:
  - echo hi > /root/marker
  - [touch, /root/y]
  - echo "runcmd says hello"
EOF
  make_config_iso "$WORK_DIR/cfg1" "$WORK_DIR/cfg1.iso" "$uuid" "$host" "$WORK_DIR/ud1"
  boot "$fw" "$WORK_DIR" boot1 "$WORK_DIR/cfg1.iso"
  local boot1=$BOOT_S
  expect_line "$LOG" "GUEST-BOOTED uuid=$uuid hostname=$host"
  expect_line "$LOG" "GUEST-PERSIST"
  expect_line "$LOG" "runcmd says hello"
  expect_line "$LOG" "GUEST-RUNCMD-DONE rc=0"
  powerdown "$QPID" "$LOG"
  local off1=$POWEROFF_S
  log "$fw boot 1: GUEST-BOOTED after ${boot1}s, power-off ${off1}s, QEMU rc 0"

  # Boot 2: same overlay, a "#!" user_data script with a non-zero status;
  # the files written by boot 1 must have survived.
  printf '#!/bin/sh\necho second > /root/second\nexit 3\n' >"$WORK_DIR/ud2"
  make_config_iso "$WORK_DIR/cfg2" "$WORK_DIR/cfg2.iso" "$uuid" "$host" "$WORK_DIR/ud2"
  boot "$fw" "$WORK_DIR" boot2 "$WORK_DIR/cfg2.iso"
  local boot2=$BOOT_S
  expect_line "$LOG" "GUEST-BOOTED uuid=$uuid hostname=$host"
  expect_line "$LOG" "GUEST-PERSIST marker y"
  expect_line "$LOG" "GUEST-RUNCMD-DONE rc=3"
  powerdown "$QPID" "$LOG"
  local off2=$POWEROFF_S
  log "$fw boot 2: GUEST-BOOTED after ${boot2}s, power-off ${off2}s, persisted: marker y"
  printf '%s boot1=%ss boot2=%ss poweroff=%ss/%ss OK\n' "$fw" "$boot1" "$boot2" "$off1" "$off2"
}

log "image $IMAGE, scratch $WORK"
case "$MODE" in
  bios) run_mode bios ;;
  efi) run_mode efi ;;
  both) run_mode bios; run_mode efi ;;
esac
log "all checks passed"
