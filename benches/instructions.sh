#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: a figure that the other load on the machine does
# not move (wall-clock CPU per request does), for A/B comparisons of two builds. Where the CPU's counters are
# reachable, `perf stat -e instructions:u -p PID` over a load run does the same faster.
#   benches/instructions.sh BIN [BOOTSTRAP] [SECONDS]
#   benches/instructions.sh target/release/remora                                  # remora-bench-full.yaml, 8 s
#   benches/instructions.sh /tmp/remora-main config/bench/remora-bench.yaml 8
# Runs bench-upstream and bench-load (from $CARGO_TARGET_DIR/release, default target/release) and BIN under
# callgrind (instrumentation off until the pool is warm), 50 HTTP/1.1 keep-alive connections, then prints
# `requests=N Ir/req=M` (requests from the cluster's upstream_rq_total). Callgrind runs the proxy some 50 times
# slower, so more requests are ready per wake-up than at full speed: compare builds with this, not with the
# wall-clock figures. The profile is kept (callgrind.out.*; `callgrind_annotate --inclusive=yes FILE`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$(realpath "$1")"
cfg="$(realpath "${2:-$root/config/bench/remora-bench-full.yaml}")"
secs="${3:-8}"
rel="${CARGO_TARGET_DIR:-$root/target}/release"
out="$PWD/callgrind.out.$(basename "$bin").$$"
tmp="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

taskset -c 1 "$rel/bench-upstream" --listen 127.0.0.1:0 >"$tmp/up.out" 2>&1 &
pids+=($!)
for _ in $(seq 50); do grep -q listening "$tmp/up.out" && break; sleep 0.1; done
up_port="$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/up.out")"
port=$((20000 + RANDOM % 20000))
admin=$((port + 1))
sed -e "s/\${ADMIN_PORT}/$admin/; s/\${LISTEN_PORT}/$port/; s/\${UPSTREAM_PORT}/$up_port/" "$cfg" >"$tmp/cfg.yaml"
taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "$bin" -c "$tmp/cfg.yaml" --concurrency 1 >"$tmp/proxy.out" 2>&1 &
proxy=$!
pids+=($proxy)
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2; done
load() { timeout $(($1 + 30)) taskset -c 1 "$rel/bench-load" --target "127.0.0.1:$port" --connections 50 \
    --duration "${1}s" --warmup 0s >/dev/null 2>&1; }
requests() { curl -s "http://127.0.0.1:$admin/stats" | awk '/^cluster\.upstream\.upstream_rq_total:/ {print $2}'; }
load 2 # the pool warm
before="$(requests)"
callgrind_control -i on "$proxy" >/dev/null
load "$secs"
callgrind_control -i off "$proxy" >/dev/null
after="$(requests)"
callgrind_control -d "$proxy" >/dev/null
sleep 1
ir="$(callgrind_annotate "$out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !n++ {gsub(",", "", $1); print $1}')"
echo "$(basename "$bin") requests=$((after - before)) Ir/req=$((ir / (after - before))) profile=$out.1"
