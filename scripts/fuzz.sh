#!/usr/bin/env bash
# Runs the stable-toolchain gob fuzzer (examples/fuzz_gob.rs) in a release build.
#
#   scripts/fuzz.sh [--long] [fuzz_gob options...]
#
# Without options: the CI default (200 000 inputs or 60 s, whichever first).
# --long: 10 000 000 inputs with a one-hour cap; later options still override.
# Options are passed through: --iterations N --seconds S --seed X
# --max-rss-mb M --replay FILE... (see the example's header).
# Reproducers of failures land in target/fuzz-crashes/.
set -euo pipefail

cd "$(dirname "$0")/.."

args=()
for a in "$@"; do
    if [[ "$a" == "--long" ]]; then
        args+=(--iterations 10000000 --seconds 3600)
    else
        args+=("$a")
    fi
done

cmd=(cargo run --release --example fuzz_gob -- ${args[@]+"${args[@]}"})
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
