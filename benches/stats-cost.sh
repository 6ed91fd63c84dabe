#!/usr/bin/env bash
# What stats cost: Remora as built against Remora built with `--features stats-off` (every counter add, gauge
# set and histogram record compiled out), same bootstrap, arms interleaved in one harness run.
#   benches/stats-cost.sh                   # HTTP/1.1 keep-alive, 50 connections: 5 s runs x 5 repetitions (~2 min)
#   benches/stats-cost.sh --reps 9          # any bench-harness option; the last occurrence wins
# Results go to benches/results/<date>-stats-cost/ (the table is also printed).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
export CARGO_TARGET_DIR="$target"

# Same target dir for both: the dependencies are built once; only the remora crate is built twice.
cargo build --release -p remora --features stats-off
cp "$target/release/remora" "$target/release/remora-nostats"
cargo build --release -p remora -p remora-benches

exec "$target/release/bench-harness" \
    --bin-dir "$target/release" \
    --config-dir "$root/config/bench" \
    --out "$root/benches/results/$(date -u +%Y-%m-%d)-stats-cost" \
    --workloads h1-c50 --arms remora,remora-nostats \
    --duration 5s --reps 5 --no-open-loop \
    "$@"
