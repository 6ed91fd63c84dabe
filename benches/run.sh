#!/usr/bin/env bash
# Builds Remora and the load harness in release mode, then runs the comparison.
#   benches/run.sh --quick          # HTTP/1.1 keep-alive, 50 connections, 5 s x 3 repetitions
#   benches/run.sh                  # every workload, 10 s x 3 repetitions
#   benches/run.sh --help           # every option
# Results go to benches/results/<date>/ (and <date>-quick/ for --quick); the table is also printed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
export CARGO_TARGET_DIR="$target"

extra=()
if ! cargo build --release -p remora -p remora-benches; then
    # The proxy may not build while it is being worked on: measure the other arms and say so.
    echo "run.sh: building remora failed; building the harness alone and reporting Remora as not measured" >&2
    cargo build --release -p remora-benches
    extra+=(--remora-build-failed)
fi

exec "$target/release/bench-harness" \
    --bin-dir "$target/release" \
    --config-dir "$root/config/bench" \
    --results-dir "$root/benches/results" \
    "${extra[@]}" "$@"
