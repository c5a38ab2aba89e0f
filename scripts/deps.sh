# Debian packages the test suite needs: the one list, sourced by
# scripts/test.sh (and through it by .ci/run). Not run on its own:
#
#   . scripts/deps.sh
#   deps_missing          # prints the packages not installed, one a line
#   deps_install          # installs them (root or passwordless sudo); idempotent
#
# - a Docker engine (tests start a private dockerd, scripts/start-dockerd.sh)
#   and busybox-static for its test image; curl for its readiness probe;
# - QEMU, qemu-img, OVMF and xorriso for the VM tests;
# - what scripts/build-guest-image.sh needs to build the tiny test guest
#   (a kernel from linux-source-6.1, fetched by that script itself);
# - dpkg-dev for the package test (dpkg-deb itself is in dpkg), systemd for
#   systemd-analyze, which checks the unit;
# - iproute2 (ip netns, ip tuntap) and iptables for the network namespace
#   tests (tests/network_ns.rs, tests/qemu_tap.rs) and the FORWARD rule of
#   tenant bridges; tests/gre_nodes.rs also copies the host's iproute2 `ip`
#   and glibc (found with ldd) into its guests and strips (binutils, in
#   build-essential) the netnode example it sends them.
CIAO_TEST_PACKAGES=(docker.io busybox-static curl
                    qemu-system-x86 qemu-utils ovmf xorriso
                    build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils
                    isolinux syslinux-common mtools
                    dpkg-dev systemd
                    iproute2 iptables)

deps_missing() {
    local p
    for p in "${CIAO_TEST_PACKAGES[@]}"; do
        dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || echo "$p"
    done
}

deps_install() {
    local missing=() p pinned=() v sudo=()
    mapfile -t missing < <(deps_missing)
    if [ ${#missing[@]} -eq 0 ]; then
        echo "deps: all ${#CIAO_TEST_PACKAGES[@]} packages already installed"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "deps: need root (or passwordless sudo) to install: ${missing[*]}" >&2
            return 1
        fi
    fi
    echo "deps: installing ${missing[*]}"
    # qemu-img must come from the same QEMU as qemu-system-x86: a newer
    # qemu-utils (from backports) conflicts with Debian's qemu-system-x86, and
    # installing one without the other would remove qemu-img. So either of
    # them missing installs both, qemu-utils pinned to qemu-system-x86's version.
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive
               apt-get -q -o DPkg::Lock::Timeout=600)
    "${apt[@]}" update || return 1
    for p in "${missing[@]}"; do
        case "$p" in
            qemu-utils | qemu-system-x86) ;;
            *) pinned+=("$p") ;;
        esac
    done
    if printf '%s\n' "${missing[@]}" | grep -qx 'qemu-utils\|qemu-system-x86'; then
        v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        [ -n "$v" ] && [ "$v" != "(none)" ] || { echo "deps: no qemu-system-x86 candidate" >&2; return 1; }
        pinned+=("qemu-system-x86=$v" "qemu-utils=$v")
    fi
    "${apt[@]}" install -y --allow-downgrades "${pinned[@]}" || return 1
    mapfile -t missing < <(deps_missing)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "deps: still missing after apt-get install: ${missing[*]}" >&2
        return 1
    fi
}
