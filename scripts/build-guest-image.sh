#!/usr/bin/env bash
# build-guest-image.sh - build the tiny bootable test guest used by the
# ciao-launcher-rs QEMU tests, from Debian packages only.
#
# Usage:
#   scripts/build-guest-image.sh [--out DIR] [--force] [--jobs N]
#     --out DIR  output directory
#                (default: ${XDG_CACHE_HOME:-$HOME/.cache}/ciao-launcher-rs/guest)
#     --force    ignore the cache stamp and rebuild the image (the kernel
#                build tree under DIR/build is still reused incrementally)
#     --jobs N   parallel make jobs (default: nproc)
#   The absolute path of DIR/guest.img is printed as the LAST line of stdout;
#   all progress goes to stderr.  A cached image (same sha256 of this script)
#   is reported in well under a second.
#
# Guest contract (what the tests can rely on):
#   * raw hybrid image: BIOS (ISOLINUX) and EFI (kernel EFI stub as
#     \EFI\BOOT\BOOTX64.EFI) boot from a virtio-blk disk, TCG is fine.
#   * finds the ISO9660 volume labelled "config-2" (OpenStack config drive),
#     reads openstack/latest/meta_data.json ("uuid", "hostname") and
#     openstack/latest/user_data (#cloud-config with "runcmd:" entries written
#     as "- shell string" or "- [argv, list]", or a "#!" script).
#   * serial console (ttyS0, 115200) prints, in this order:
#       GUEST-BOOTED uuid=<uuid> hostname=<hostname>
#       GUEST-PERSIST[ <file> ...]     (sorted names found in /persist)
#       GUEST-NIC <ifname> mac=<mac>   (one per NIC; none without a NIC)
#       ... output of the runcmd entries ...
#       GUEST-RUNCMD-DONE rc=<N>       (0, or the status of the last failing entry)
#     and on the ACPI power button (QMP system_powerdown):
#       GUEST-POWERDOWN
#   * networking: each virtio-net-pci NIC appears as eth0, eth1, ... (IPv4
#     only: TCP, UDP, ICMP, packet sockets). lo and every NIC are up before
#     runcmd; each NIC gets ONE short DHCP attempt in the background (~3 s;
#     QEMU user networking answers it) which, when it succeeds, prints
#       GUEST-DHCP <ifname> <ip>/<prefix>
#     at some point after GUEST-BOOTED and never removes other addresses.
#     With no server, runcmd sets the address itself, e.g.
#       - ip addr add 10.1.2.3/24 dev eth0
#     busybox applets: ip, ifconfig, route, ping, nc (server: nc -ll -p PORT
#     -e PROG), udhcpc (its event script is at the default path), arping,
#     brctl.
#   * /persist is a VFAT partition (label GUESTDATA) appended to the image;
#     /root is a symlink to it and runcmd runs with cwd /persist, so files
#     written there survive a reboot from the same qcow2 overlay.
#
# Requires: Debian (apt).  Missing build tools are installed with apt-get
# (qemu itself is NOT installed here; the caller provides it).
set -euo pipefail

# Everything but the final path goes to stderr: keep the real stdout on fd 3.
exec 3>&1 1>&2

readonly KERNEL_PKG=linux-source-6.1
readonly PERSIST_MIB=8           # size of the writable VFAT partition
readonly PERSIST_LABEL=GUESTDATA # FAT volume label the guest looks for
readonly ISO_LABEL=CIAOGUEST     # must differ from config-2
readonly SYSLINUX_BIOS=/usr/lib/syslinux/modules/bios
readonly ISOLINUX_DIR=/usr/lib/ISOLINUX

log() { printf '[build-guest-image] %s\n' "$*" >&2; }
die() { printf '[build-guest-image] ERROR: %s\n' "$*" >&2; exit 1; }

usage() { awk 'NR > 1 && !/^#/ || /^# Guest contract/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2; }

# ---------------------------------------------------------------- arguments
OUT="${XDG_CACHE_HOME:-$HOME/.cache}/ciao-launcher-rs/guest"
FORCE=0
JOBS="$(nproc 2>/dev/null || echo 1)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --force) FORCE=1; shift ;;
    --jobs) [[ $# -ge 2 ]] || die "--jobs needs a number"; JOBS="$2"; shift 2 ;;
    --jobs=*) JOBS="${1#--jobs=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage; die "unknown argument: $1" ;;
  esac
done
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, got '$JOBS'"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd -P)"
# gen_init_cpio list files and Kconfig strings are whitespace separated, so
# the build tree path must not contain blanks or quotes.
[[ "$OUT" =~ ^[A-Za-z0-9._/+@:=-]+$ ]] || die "output dir '$OUT' must not contain spaces or special characters"

IMG="$OUT/guest.img"
STAMP="$OUT/guest.img.stamp"
BUILD="$OUT/build"
SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}")"
KEY="$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)"

cache_hit() {
  [[ "$FORCE" -eq 0 && -s "$IMG" && -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]
}

# Fast path first: no locks, no tool checks, so a cached run stays < 1 s.
if cache_hit; then
  printf '%s\n' "$IMG" >&3
  exit 0
fi

# Serialise concurrent builders (e.g. parallel test binaries) on one lock,
# then re-check: another process may have finished the build meanwhile.
exec 9>"$OUT/.lock"
if ! flock -n 9; then
  log "waiting for another build holding $OUT/.lock"
  flock 9
fi
if cache_hit; then
  printf '%s\n' "$IMG" >&3
  exit 0
fi

TMP_DIRS=()
cleanup() {
  local d
  for d in "${TMP_DIRS[@]}"; do rm -rf -- "$d"; done
}
trap cleanup EXIT

T0=$SECONDS
mkdir -p "$BUILD"

# --------------------------------------------------------------- host tools
SUDO=()
if [[ $EUID -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 && SUDO=(sudo -n)
fi

# apt-get with a retry loop: other jobs on the machine may hold the dpkg/apt
# locks; we must wait for them rather than fail or run concurrently.
apt_run() {
  local attempt outf rc
  outf="$(mktemp)"
  for attempt in $(seq 1 30); do
    rc=0
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get -o DPkg::Lock::Timeout=60 "$@" 2>&1 | tee "$outf" >&2 || rc=$?
    if [[ $rc -eq 0 ]]; then rm -f "$outf"; return 0; fi
    if grep -qiE 'could not get lock|unable to acquire|unable to lock|is another process using it' "$outf"; then
      log "apt/dpkg lock busy (attempt $attempt/30), retrying in 10 s"
      sleep 10
      continue
    fi
    rm -f "$outf"
    return "$rc"
  done
  rm -f "$outf"
  return 1
}

APT_UPDATED=0
apt_update_once() {
  [[ $APT_UPDATED -eq 1 ]] && return 0
  apt_run update
  APT_UPDATED=1
}

apt_install() {
  log "installing missing packages: $*"
  if [[ $EUID -ne 0 && ${#SUDO[@]} -eq 0 ]]; then
    die "need root (or passwordless sudo) to install: $*"
  fi
  apt_run install -y --no-install-recommends "$@" && return 0
  # Package lists on a fresh CI machine may be missing or stale.
  apt_update_once || die "apt-get update failed"
  apt_run install -y --no-install-recommends "$@" || die "apt-get install $* failed"
}

# apt-get download needs no root; it only fetches the .deb into the cwd.
# As root, apt would drop to the _apt user, which may not be able to write
# into a private build tree (it then warns and falls back); say so upfront.
apt_download() { # pkg dir
  local pkg="$1" dir="$2" opts=()
  [[ $EUID -eq 0 ]] && opts=(-o APT::Sandbox::User=root)
  if (cd "$dir" && apt-get "${opts[@]}" download "$pkg" >&2); then return 0; fi
  apt_update_once || die "apt-get update failed"
  (cd "$dir" && apt-get "${opts[@]}" download "$pkg" >&2) || die "apt-get download $pkg failed"
}

# spec = kind:what:package; kind cmd = command on PATH, file = path that
# must exist.  The package is what provides it on Debian.
HOST_TOOLS=(
  cmd:make:make cmd:gcc:gcc cmd:ld:binutils cmd:readelf:binutils
  file:/usr/include/stdio.h:libc6-dev
  cmd:bc:bc cmd:bison:bison cmd:flex:flex cmd:xz:xz-utils cmd:perl:perl
  file:/usr/include/libelf.h:libelf-dev
  file:/usr/include/openssl/opensslv.h:libssl-dev
  cmd:xorriso:xorriso
  cmd:mformat:mtools cmd:mcopy:mtools cmd:mmd:mtools
  "file:$ISOLINUX_DIR/isolinux.bin:isolinux"
  "file:$ISOLINUX_DIR/isohdpfx.bin:isolinux"
  "file:$SYSLINUX_BIOS/ldlinux.c32:syslinux-common"
  cmd:flock:util-linux cmd:dpkg-deb:dpkg
)

have_tool() { # spec
  local kind="${1%%:*}" what="${1#*:}"
  what="${what%:*}"
  case "$kind" in
    cmd) command -v "$what" >/dev/null 2>&1 ;;
    file) [[ -e "$what" ]] ;;
    *) die "bad tool spec $1" ;;
  esac
}

ensure_host_tools() {
  local missing=() spec
  for spec in "${HOST_TOOLS[@]}"; do
    have_tool "$spec" || missing+=("${spec##*:}")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  apt_install "${missing[@]}"
  # Re-check: a package that installed but did not provide the expected
  # file should fail here with a clear message, not deep inside make.
  for spec in "${HOST_TOOLS[@]}"; do
    have_tool "$spec" || die "${spec#*:} (path:package) still missing after apt-get install"
  done
}

# A *static* busybox is needed inside the initramfs.  Debian's dynamic
# "busybox" package also ships /bin/busybox and conflicts with
# busybox-static, so instead of replacing the host's package we unpack the
# busybox-static .deb into the build tree when the host copy is dynamic.
BUSYBOX=""
find_static_busybox() {
  local cand
  for cand in /bin/busybox /usr/bin/busybox; do
    if [[ -x "$cand" ]] && ! readelf -l "$cand" 2>/dev/null | grep -q 'program interpreter'; then
      BUSYBOX="$cand"; return 0
    fi
  done
  cand="$BUILD/busybox-static/bin/busybox"
  if [[ ! -x "$cand" ]]; then
    local tmp
    tmp="$(mktemp -d "$BUILD/dl.XXXXXX")"; TMP_DIRS+=("$tmp")
    log "fetching busybox-static (host busybox missing or dynamic)"
    apt_download busybox-static "$tmp"
    rm -rf "$BUILD/busybox-static"
    dpkg-deb -x "$tmp"/busybox-static_*.deb "$BUILD/busybox-static"
  fi
  [[ -x "$cand" ]] || die "no static busybox found"
  BUSYBOX="$cand"
}

# ------------------------------------------------------------ kernel source
KSRC="$BUILD/$KERNEL_PKG"
fetch_kernel_source() {
  if [[ -f "$KSRC/.ciao-extracted" ]]; then
    log "reusing kernel source tree $KSRC"
    return 0
  fi
  local tmp tarball
  tmp="$(mktemp -d "$BUILD/dl.XXXXXX")"; TMP_DIRS+=("$tmp")
  log "downloading $KERNEL_PKG (not installed, only unpacked)"
  apt_download "$KERNEL_PKG" "$tmp"
  dpkg-deb -x "$tmp/${KERNEL_PKG}"_*.deb "$tmp/x"
  tarball="$tmp/x/usr/src/$KERNEL_PKG.tar.xz"
  [[ -f "$tarball" ]] || die "$tarball not found in the .deb"
  log "unpacking kernel source"
  rm -rf "$KSRC"
  tar -xJf "$tarball" -C "$BUILD"
  [[ -f "$KSRC/Makefile" ]] || die "unexpected layout of $tarball"
  touch "$KSRC/.ciao-extracted"
  rm -rf "$tmp"
}

# Write a file only when its content changes, so kbuild's mtime based
# dependency tracking does not relink the kernel for nothing.
put() { # path mode  (content on stdin)
  local dst="$1" mode="$2" tmp
  tmp="$(mktemp "$dst.XXXXXX")"
  cat >"$tmp"
  chmod "$mode" "$tmp"
  if [[ -f "$dst" ]] && cmp -s "$tmp" "$dst"; then
    rm -f "$tmp"
  else
    mv -f "$tmp" "$dst"
  fi
}

# --------------------------------------------------------------- initramfs
IRD="$BUILD/initramfs"
IRLIST="$BUILD/initramfs.list"
write_initramfs() {
  mkdir -p "$IRD"

  # /init: PID 1 from the initramfs. Mount the API filesystems busybox init
  # and the scripts need, then hand over to busybox init (reads /etc/inittab).
  put "$IRD/init" 0755 <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
exec /sbin/init
EOF

  put "$IRD/inittab" 0644 <<'EOF'
# sysinit runs to completion before "once" entries start.
::sysinit:/etc/init.d/rcS
::once:/etc/init.d/guest-boot
::ctrlaltdel:/etc/acpi/PWRF/00000080
EOF

  # rcS: start acpid before anything slow so an early power button press is
  # honoured, then locate and mount the config drive and the persist area.
  {
    printf '#!/bin/sh\nPERSIST_LABEL=%s\n' "$PERSIST_LABEL"
    cat <<'EOF'
# SeaBIOS' serial console answers the kernel's real-mode video mode switch
# with "ESC c ESC[?7l ESC[2J" and no newline; start on a fresh line so every
# GUEST-* line is a whole line on the console.
echo
# busybox acpid reads /dev/input/event* (ACPI power button input device) and
# runs /etc/acpi/PWRF/00000080 for the power button.
acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid
# acpid daemonizes before it opens the input devices: wait (<= 2 s) until it
# listens, then replay a press that came after the kernel enabled the ACPI
# power button but before acpid listened. The kernel still counts such a
# press in ff_pwr_btn; the handler's lock makes a double delivery harmless.
acpid_listening() {
  pid=$(cat /run/acpid.pid 2>/dev/null) || return 1
  for fd in "/proc/$pid/fd/"*; do
    case "$(readlink "$fd" 2>/dev/null)" in /dev/input/event*) return 0 ;; esac
  done
  return 1
}
i=0
while [ $i -lt 20 ] && ! acpid_listening; do
  i=$((i + 1))
  sleep 0.1
done
# shellcheck disable=SC2046 # word splitting is the point: first field = count
set -- $(cat /sys/firmware/acpi/interrupts/ff_pwr_btn 2>/dev/null || echo 0)
if [ "${1:-0}" -gt 0 ] 2>/dev/null; then
  /etc/acpi/PWRF/00000080 &
fi
# Keep kernel printk noise off the serial console so the GUEST-* lines stay
# clean (level 1 still shows panics).
dmesg -n 1
hostname guest
mkdir -p /tmp /mnt/config /persist
chmod 1777 /tmp

# Print the trimmed ISO9660 volume id of device $1 (primary volume
# descriptor: sector 16 = byte 32768, volume id at +40, 32 bytes).
iso_label() {
  dd if="$1" bs=1 skip=32808 count=32 2>/dev/null | tr -d '\000' | sed 's/ *$//'
}

find_config_drive() {
  dev=$(findfs LABEL=config-2 2>/dev/null) && [ -b "$dev" ] && { echo "$dev"; return 0; }
  for sys in /sys/class/block/*; do
    dev=/dev/${sys##*/}
    [ -b "$dev" ] || continue
    if [ "$(iso_label "$dev")" = "config-2" ]; then echo "$dev"; return 0; fi
  done
  return 1
}

# Devices normally exist already (drivers are built in), but give slow
# probes up to ~20 s.
cfgdev=""
i=0
while [ $i -lt 40 ]; do
  cfgdev=$(find_config_drive) && break
  cfgdev=""
  i=$((i + 1))
  sleep 0.5
done
uuid=""
name=""
if [ -n "$cfgdev" ] && mount -t iso9660 -o ro "$cfgdev" /mnt/config; then
  md=/mnt/config/openstack/latest/meta_data.json
  if [ -f "$md" ]; then
    # Flatten the JSON to one line and pick the first string value of each
    # key; quotes are dropped so the values can be stored in a sh file.
    uuid=$(tr -d '\r\n' <"$md" | sed -n 's/.*"uuid"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | tr -d "'")
    name=$(tr -d '\r\n' <"$md" | sed -n 's/.*"hostname"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | tr -d "'")
  fi
  echo "$cfgdev" >/run/config-drive.dev
else
  echo "GUEST-WARNING no config-2 drive found" >/dev/console
fi
[ -n "$name" ] && hostname "$name"
{
  echo "GUEST_UUID='$uuid'"
  echo "GUEST_HOSTNAME='$name'"
} >/run/guest.env

# Writable persistent area: the VFAT partition appended to the boot image.
pdev=""
i=0
while [ $i -lt 10 ]; do
  pdev=$(findfs "LABEL=$PERSIST_LABEL" 2>/dev/null) && [ -b "$pdev" ] && break
  pdev=""
  i=$((i + 1))
  sleep 0.5
done
if [ -n "$pdev" ] && mount -t vfat -o rw,noatime "$pdev" /persist; then
  echo "$pdev" >/run/persist.dev
else
  echo "GUEST-WARNING no writable $PERSIST_LABEL partition, /persist is RAM only" >/dev/console
fi

# Network: loopback up, every NIC up, and one short DHCP attempt per NIC in
# the background so boot is not delayed. A server answers under QEMU user
# networking; on a bare tap nobody does and udhcpc gives up after ~3 s,
# leaving the NIC to runcmd (its event script never removes addresses).
ip link set lo up
# Only NICs (a device behind them): not lo, nor the fallback tunnels
# (gre0, gretap0, erspan0) the built-in GRE driver makes.
for sys in /sys/class/net/*; do
  ifc=${sys##*/}
  [ -e "$sys/device" ] || continue
  ip link set "$ifc" up
  udhcpc -i "$ifc" -n -q -t 3 -T 1 </dev/null >/dev/null 2>&1 &
done
EOF
  } | put "$IRD/rcS" 0755

  # udhcpc event script (its default path): configure what the server gave,
  # never flush, so an address set by runcmd stays.
  put "$IRD/udhcpc.script" 0755 <<'EOF'
#!/bin/sh
# shellcheck disable=SC2154 # interface, ip, mask, router come from udhcpc
case "$1" in
  deconfig) ip link set "$interface" up ;;
  bound|renew)
    ip addr replace "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "GUEST-DHCP $interface $ip/${mask:-24}" >/dev/console ;;
esac
exit 0
EOF

  # guest-boot: the "once" job. Prints the status lines and runs user data.
  put "$IRD/guest-boot" 0755 <<'EOF'
#!/bin/sh
# shellcheck source=/dev/null # written by rcS at boot
. /run/guest.env
echo "GUEST-BOOTED uuid=$GUEST_UUID hostname=$GUEST_HOSTNAME"
# shellcheck disable=SC2012 # plain names for the status line are wanted
files=$(cd /persist && ls -A 2>/dev/null | sort | tr '\n' ' ' | sed 's/ *$//')
echo "GUEST-PERSIST${files:+ $files}"
for sys in /sys/class/net/*; do
  ifc=${sys##*/}
  [ -e "$sys/device" ] || continue
  echo "GUEST-NIC $ifc mac=$(cat "$sys/address")"
done

ud=/mnt/config/openstack/latest/user_data
script=/run/user-data.sh
rc=0
if [ -f "$ud" ]; then
  if head -n 1 "$ud" | grep -q '^#!'; then
    # A shell script user_data: run it with its interpreter if the guest has
    # it, otherwise with /bin/sh.
    tr -d '\r' <"$ud" >"$script"
    chmod 0755 "$script"
    interp=$(head -n 1 "$script" | sed 's/^#![[:space:]]*//; s/[[:space:]].*//')
    if [ -x "$interp" ]; then
      (cd /persist && "$script" </dev/null) || rc=$?
    else
      (cd /persist && sh "$script" </dev/null) || rc=$?
    fi
  else
    /etc/runcmd-to-sh "$ud" >"$script"
    (cd /persist && sh "$script" </dev/null) || rc=$?
  fi
fi
# Flush so runcmd results survive even a hard kill of the VM.
sync
echo "GUEST-RUNCMD-DONE rc=$rc"
EOF

  # runcmd-to-sh: turn the cloud-config "runcmd:" list into a shell script.
  # "- string" entries run through the shell as-is; "- [a, b]" flow lists
  # are quoted argument vectors (like cloud-init). All entries share one
  # shell; the script exits with the status of the last failing entry.
  # Not supported: block scalars ("- |"), multi-line flow lists.
  put "$IRD/runcmd-to-sh" 0755 <<'EOF'
#!/bin/sh
exec awk '
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function shq(s) { gsub(/\047/, "\047\\\047\047", s); return "\047" s "\047" }
function unquote(s,   q) {
  q = substr(s, 1, 1)
  if (length(s) >= 2 && (q == "\"" || q == "\047") && substr(s, length(s), 1) == q) {
    s = substr(s, 2, length(s) - 2)
    if (q == "\"") { gsub(/\\"/, "\"", s); gsub(/\\\\/, "\\", s) }
    else { gsub(/\047\047/, "\047", s) }
  }
  return s
}
# split a YAML flow sequence body on commas that are outside quotes
function flow(body,   i, c, q, cur, out, n) {
  q = ""; cur = ""; out = ""; n = 0
  for (i = 1; i <= length(body); i++) {
    c = substr(body, i, 1)
    if (q != "") { if (c == q) q = ""; cur = cur c; continue }
    if (c == "\"" || c == "\047") { q = c; cur = cur c; continue }
    if (c == ",") { out = out (n++ ? " " : "") shq(unquote(trim(cur))); cur = ""; continue }
    cur = cur c
  }
  if (trim(cur) != "" || n > 0) out = out (n++ ? " " : "") shq(unquote(trim(cur)))
  return out
}
BEGIN { inrc = 0; print "__rc=0" }
{ sub(/\r$/, "") }
/^runcmd:[ \t]*$/ { inrc = 1; next }
/^[^ \t#-]/ { inrc = 0 }
inrc && /^[ \t]*-[ \t]/ {
  item = $0
  sub(/^[ \t]*-[ \t]+/, "", item)
  item = trim(item)
  if (item ~ /^\[.*\]$/) cmd = flow(substr(item, 2, length(item) - 2))
  else cmd = unquote(item)
  if (cmd == "") next
  print cmd
  print "__s=$?; [ \"$__s\" -eq 0 ] || __rc=$__s"
}
END { print "exit $__rc" }
' "$1"
EOF

  # Power button handler (busybox acpid event PWRF/00000080).
  put "$IRD/pwrf" 0755 <<'EOF'
#!/bin/sh
# Run once even if the press is delivered twice (acpid + early-press replay).
mkdir /run/powerdown.lock 2>/dev/null || exit 0
echo "GUEST-POWERDOWN" >/dev/console
sync
# Unmount cleanly when possible; if something still uses /persist fall back
# to a read-only remount (sync above already flushed the data).
umount /persist 2>/dev/null || mount -o remount,ro /persist 2>/dev/null
poweroff -f
EOF

  put "$IRD/passwd" 0644 <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
  put "$IRD/group" 0644 <<'EOF'
root:x:0:
EOF

  # gen_init_cpio list. /dev/console must exist in the initramfs itself: the
  # kernel opens it for PID 1 before /init could mount devtmpfs.
  {
    cat <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /run 0755 0 0
dir /tmp 1777 0 0
dir /mnt 0755 0 0
dir /mnt/config 0755 0 0
dir /persist 0755 0 0
slink /root /persist 0777 0 0
dir /var 0755 0 0
dir /var/log 0755 0 0
slink /var/run /run 0777 0 0
dir /bin 0755 0 0
dir /sbin 0755 0 0
dir /usr 0755 0 0
dir /usr/bin 0755 0 0
dir /usr/sbin 0755 0 0
dir /etc 0755 0 0
dir /etc/init.d 0755 0 0
dir /etc/acpi 0755 0 0
dir /etc/acpi/PWRF 0755 0 0
dir /etc/udhcpc 0755 0 0
file /bin/busybox $BUSYBOX 0755 0 0
file /init $IRD/init 0755 0 0
file /etc/inittab $IRD/inittab 0644 0 0
file /etc/init.d/rcS $IRD/rcS 0755 0 0
file /etc/init.d/guest-boot $IRD/guest-boot 0755 0 0
file /etc/runcmd-to-sh $IRD/runcmd-to-sh 0755 0 0
file /etc/acpi/PWRF/00000080 $IRD/pwrf 0755 0 0
file /etc/udhcpc/default.script $IRD/udhcpc.script 0755 0 0
file /etc/passwd $IRD/passwd 0644 0 0
file /etc/group $IRD/group 0644 0 0
EOF
    # Applet symlinks at their canonical paths (busybox --list-full).
    "$BUSYBOX" --list-full | sort | while read -r applet; do
      [[ "$applet" == bin/busybox || "$applet" == linuxrc ]] && continue
      printf 'slink /%s /bin/busybox 0777 0 0\n' "$applet"
    done
  } | put "$IRLIST" 0644
  grep -q '^slink /sbin/init ' "$IRLIST" || die "busybox has no init applet"
  grep -q '^slink /sbin/acpid ' "$IRLIST" || die "busybox has no acpid applet"
  local applet
  for applet in ip ifconfig route ping nc udhcpc arping brctl; do
    grep -qE "^slink /(usr/)?s?bin/$applet " "$IRLIST" || die "busybox has no $applet applet"
  done
}

# ------------------------------------------------------------------ kernel
# Options appended to tinyconfig. Each one is checked after olddefconfig,
# because Kconfig silently drops options whose dependencies are missing.
kernel_fragment() {
  cat <<EOF
CONFIG_64BIT=y
CONFIG_SMP=y
CONFIG_PRINTK=y
CONFIG_BUG=y
CONFIG_MULTIUSER=y
CONFIG_FUTEX=y
CONFIG_POSIX_TIMERS=y
CONFIG_FILE_LOCKING=y
CONFIG_SHMEM=y
CONFIG_TMPFS=y
CONFIG_PROC_FS=y
CONFIG_SYSFS=y
CONFIG_DEVTMPFS=y
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_INITRAMFS_SOURCE="$IRLIST"
CONFIG_CMDLINE_BOOL=y
# no_timer_check: under TCG on a loaded host the IO-APIC timer check can fail and panic the guest
CONFIG_CMDLINE="console=ttyS0,115200n8 quiet no_timer_check"
CONFIG_KERNEL_GZIP=y
# CONFIG_RANDOMIZE_BASE is not set
CONFIG_PHYSICAL_START=0x200000
# CONFIG_MODULES is not set
CONFIG_HYPERVISOR_GUEST=y
CONFIG_PARAVIRT=y
CONFIG_KVM_GUEST=y
CONFIG_TTY=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_ACPI=y
CONFIG_ACPI_BUTTON=y
CONFIG_INPUT=y
CONFIG_INPUT_EVDEV=y
CONFIG_EFI=y
CONFIG_EFI_STUB=y
CONFIG_PCI=y
CONFIG_PCI_MSI=y
CONFIG_BLOCK=y
CONFIG_BLK_DEV=y
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_BLK=y
CONFIG_SCSI=y
CONFIG_SCSI_LOWLEVEL=y
CONFIG_SCSI_VIRTIO=y
CONFIG_BLK_DEV_SD=y
CONFIG_BLK_DEV_SR=y
CONFIG_ATA=y
CONFIG_ATA_SFF=y
CONFIG_ATA_BMDMA=y
CONFIG_ATA_PIIX=y
CONFIG_SATA_AHCI=y
CONFIG_ISO9660_FS=y
CONFIG_JOLIET=y
CONFIG_PARTITION_ADVANCED=y
CONFIG_MSDOS_PARTITION=y
CONFIG_EFI_PARTITION=y
CONFIG_FAT_FS=y
CONFIG_VFAT_FS=y
CONFIG_NLS=y
CONFIG_NLS_CODEPAGE_437=y
CONFIG_NLS_ISO8859_1=y
CONFIG_HOTPLUG_PCI=y
CONFIG_HOTPLUG_PCI_ACPI=y
# Networking for the NIC tests: IPv4 (ping, nc, the ARP the bridge tests
# need), packet sockets (udhcpc), unix sockets, the virtio NIC. Nothing else:
# no IPv6, no wireless, no other NIC drivers, so the kernel stays small.
CONFIG_NET=y
CONFIG_PACKET=y
CONFIG_UNIX=y
CONFIG_INET=y
# CONFIG_IPV6 is not set
# CONFIG_WIRELESS is not set
# CONFIG_WLAN is not set
CONFIG_NETDEVICES=y
CONFIG_NET_CORE=y
# CONFIG_ETHERNET is not set
CONFIG_VIRTIO_NET=y
# A compute node's tenant network (tests/gre_nodes.rs runs it in these
# guests): bridges, keyed Ethernet-over-GRE, persistent taps, veth pairs,
# macvtap and network namespaces for the instances.
CONFIG_NAMESPACES=y
CONFIG_NET_NS=y
CONFIG_BRIDGE=y
CONFIG_NET_IPGRE_DEMUX=y
CONFIG_NET_IPGRE=y
CONFIG_TUN=y
CONFIG_VETH=y
CONFIG_MACVLAN=y
CONFIG_MACVTAP=y
EOF
}

verify_kernel_config() {
  local line sym bad=0
  while IFS= read -r line; do
    case "$line" in
      "# CONFIG_"*" is not set")
        sym="${line#\# }"; sym="${sym%% *}"
        if grep -qE "^$sym=" "$KSRC/.config"; then
          log "kernel option $sym should be unset but is: $(grep -E "^$sym=" "$KSRC/.config")"
          bad=1
        fi ;;
      CONFIG_*)
        if ! grep -qxF -- "$line" "$KSRC/.config"; then
          log "kernel option lost after olddefconfig: $line (have: $(grep -E "^(# )?${line%%=*}[= ]" "$KSRC/.config" || echo nothing))"
          bad=1
        fi ;;
    esac
  done <"$BUILD/kernel.fragment"
  [[ $bad -eq 0 ]] || die "kernel configuration is incomplete (see above)"
}

KMAKE=(make -C "$KSRC" ARCH=x86_64 -j"$JOBS")
build_kernel() {
  kernel_fragment | put "$BUILD/kernel.fragment" 0644
  # Re-derive .config only when the fragment changed: keeps incremental
  # builds incremental (a pure initramfs change just relinks).
  if [[ ! -f "$KSRC/.config" ]] || ! cmp -s "$BUILD/kernel.fragment" "$KSRC/.ciao-fragment"; then
    log "configuring kernel (tinyconfig + fragment)"
    "${KMAKE[@]}" tinyconfig >&2
    cat "$BUILD/kernel.fragment" >>"$KSRC/.config"
    "${KMAKE[@]}" olddefconfig >&2
    cp "$BUILD/kernel.fragment" "$KSRC/.ciao-fragment"
  fi
  verify_kernel_config
  log "building bzImage with $JOBS jobs (first build takes several minutes)"
  local t=$SECONDS
  "${KMAKE[@]}" bzImage >&2
  log "bzImage ready in $((SECONDS - t)) s"
  BZIMAGE="$KSRC/arch/x86/boot/bzImage"
  [[ -s "$BZIMAGE" ]] || die "bzImage missing"
}

# -------------------------------------------------------------------- image
build_image() {
  local iso="$BUILD/iso" efi persist kib tmpimg
  rm -rf "$iso"
  mkdir -p "$iso/isolinux" "$iso/boot"
  cp "$ISOLINUX_DIR/isolinux.bin" "$SYSLINUX_BIOS/ldlinux.c32" "$iso/isolinux/"
  cp "$BZIMAGE" "$iso/isolinux/vmlinuz"
  # Kernel command line is built into the kernel (CONFIG_CMDLINE), the same
  # one EFI uses, so ISOLINUX only needs to load it.
  cat >"$iso/isolinux/isolinux.cfg" <<'EOF'
SERIAL 0 115200
DEFAULT guest
PROMPT 0
TIMEOUT 1
LABEL guest
  KERNEL /isolinux/vmlinuz
EOF

  # EFI: the kernel's EFI stub is the boot loader, stored as the default
  # removable-media path on a small FAT image (El Torito + GPT/MBR ESP).
  efi="$iso/boot/efi.img"
  kib=$(( ($(stat -c %s "$BZIMAGE") + 1023) / 1024 + 512 ))
  kib=$(( (kib + 63) / 64 * 64 ))
  truncate -s "${kib}K" "$efi"
  mformat -i "$efi" -N 0c1a0e71 -v EFIBOOT ::
  mmd -i "$efi" ::/EFI ::/EFI/BOOT
  mcopy -i "$efi" "$BZIMAGE" ::/EFI/BOOT/BOOTX64.EFI

  # Persistent writable area: an empty VFAT appended as MBR/GPT partition 3.
  persist="$BUILD/persist.img"
  rm -f "$persist"
  truncate -s "${PERSIST_MIB}M" "$persist"
  mformat -i "$persist" -N 0c1a0da7 -v "$PERSIST_LABEL" ::

  tmpimg="$BUILD/guest.img.tmp"
  rm -f "$tmpimg"
  xorriso -as mkisofs -o "$tmpimg" -V "$ISO_LABEL" -J -R \
    -isohybrid-mbr "$ISOLINUX_DIR/isohdpfx.bin" \
    -b isolinux/isolinux.bin -c isolinux/boot.cat \
    -no-emul-boot -boot-load-size 4 -boot-info-table \
    -eltorito-alt-boot -e boot/efi.img -no-emul-boot -isohybrid-gpt-basdat \
    -append_partition 3 0x0c "$persist" \
    "$iso" >&2
  mv -f "$tmpimg" "$IMG"
}

# --------------------------------------------------------------------- main
log "building guest image in $OUT (key ${KEY:0:12})"
ensure_host_tools
find_static_busybox
log "using static busybox $BUSYBOX"
fetch_kernel_source
write_initramfs
build_kernel
build_image
printf '%s\n' "$KEY" >"$STAMP.tmp"
mv -f "$STAMP.tmp" "$STAMP"
log "done in $((SECONDS - T0)) s: $(du -h "$IMG" | cut -f1) $IMG"
printf '%s\n' "$IMG" >&3
