#!/usr/bin/env bash
# The whole test suite: installs the Debian packages the tests need
# (scripts/deps.sh, skipped with --no-install), then formatting, lints, unit +
# integration tests, and a short fuzz run of the gob decoder. .ci/run calls
# only this.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*"; }

install=1
for a in "$@"; do
    case "$a" in
        --no-install) install=0 ;;
        *) echo "usage: scripts/test.sh [--no-install]" >&2; exit 2 ;;
    esac
done

. scripts/deps.sh
if [ "$install" -eq 1 ]; then
    step "Debian packages the tests need (scripts/deps.sh)"
    deps_install
else
    missing=$(deps_missing | tr '\n' ' ')
    [ -z "$missing" ] || echo "warning: not installed (tests needing them fail): $missing" >&2
fi
command -v cargo >/dev/null || { echo "cargo is missing (install a Rust toolchain: rustup.rs)" >&2; exit 1; }
if command -v rustup >/dev/null; then
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "test guest image for the VM tests (built once, then cached)"
scripts/build-guest-image.sh >/dev/null

step "release build of ciao-launcher (the crash campaign kills it; the package test ships it)"
cargo build --release --bins
export CIAO_CAMPAIGN_LAUNCHER="$PWD/target/release/ciao-launcher"

step "cargo test"
cargo test --all-targets 2>&1 | tee target/test.log
# cargo test exits non-zero on any failure; refuse a run that executed nothing.
passed=$(grep -Eo '^test result: ok\. [0-9]+ passed' target/test.log | awk '{s+=$4} END {print s+0}')
if [ "$passed" -eq 0 ]; then
    echo "no test ran" >&2
    exit 1
fi

if [ -x scripts/fuzz.sh ]; then
    step "fuzz the gob decoder (short run; scripts/fuzz.sh --long for 1M inputs)"
    scripts/fuzz.sh
fi

step "done: $passed tests passed"
