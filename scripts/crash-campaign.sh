#!/usr/bin/env bash
# The crash-consistency campaign (tests/crash_campaign.rs) against the
# release build of ciao-launcher: random START/STOP/RESTART/DELETE batches,
# SIGKILL at random points, a restart and a check after every kill.
#
#   scripts/crash-campaign.sh [--long] [--seed N] [--sim-only|--docker-only]
#
# --long: ≥ 1 000 kills in simulation and ≥ 150 with Docker (several minutes);
# without it, the size scripts/test.sh runs. The Docker part starts a private
# dockerd (scripts/start-dockerd.sh). Prints one line of counts per campaign.
set -euo pipefail
cd "$(dirname "$0")/.."

filter=campaign_
while [ $# -gt 0 ]; do
    case "$1" in
        --long) export CIAO_CAMPAIGN_LONG=1 ;;
        --seed) export CIAO_CAMPAIGN_SEED="$2"; shift ;;
        --sim-only) filter=campaign_simulation ;;
        --docker-only) filter=campaign_docker ;;
        *) echo "usage: $0 [--long] [--seed N] [--sim-only|--docker-only]" >&2; exit 2 ;;
    esac
    shift
done

cargo build --release --bin ciao-launcher
CIAO_CAMPAIGN_LAUNCHER="$PWD/target/release/ciao-launcher" \
    cargo test --test crash_campaign -- --nocapture --test-threads=1 "$filter"
