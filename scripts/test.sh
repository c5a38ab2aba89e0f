#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit + integration tests, and a
# short fuzz run of the gob decoder. This is what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "test guest image for the VM tests (built once, then cached)"
scripts/build-guest-image.sh >/dev/null

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
