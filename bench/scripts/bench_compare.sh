#!/usr/bin/env bash
# Runs uv_bench beside libuv's C programs and the tokio / bare-mio programs
# of bench/reference/libuv-bench, three times each, and prints the raw
# one-line results. Medians and the table are in BENCHMARKS.md.
#
#   bench/scripts/bench_compare.sh | tee bench-raw.txt
#
# LIBUV_BENCH (default: bench/reference/libuv-bench) is a libuv-bench with
# the C programs built (`make`, needs libuv1-dev and pkg-config) and
# rust-compare built (`cd rust-compare && cargo build --release`). Ping-pong
# runs are pinned to one CPU (taskset -c 0), as in the reference
# measurements.
set -euo pipefail
cd "$(dirname "$0")/../.."
LB=${LIBUV_BENCH:-bench/reference/libuv-bench}
[ -x "$LB/timers_bench" ] || { echo "build $LB first: make -C $LB" >&2; exit 1; }
RS=$LB/rust-compare/target/release/rscmp
MS=${PINGPONG_MS:-5000}
RUNS=${RUNS:-3}
cargo build --release -p uvcluster-bench --bin uv_bench >&2
UV=target/release/uv_bench

for _ in $(seq "$RUNS"); do
  "$UV" million_timers 10000000 1000
  "$LB/timers_bench" -n 10000000 -s 1000
done
for _ in $(seq "$RUNS"); do
  "$UV" million_timers 10000000 0
  "$LB/timers_bench" -n 10000000 -s 0
done
for _ in $(seq "$RUNS"); do
  "$UV" million_timers 1000000 1000
  "$LB/timers_bench" -n 1000000 -s 1000
  "$RS" tokio-timers 1000000 1000
done
for t in tcp unix; do
  U=""; [ "$t" = unix ] && U="-U"
  for _ in $(seq "$RUNS"); do
    taskset -c 0 "$UV" ping_pongs "$t" "$MS"
    taskset -c 0 "$LB/pingpong_bench" -t "$MS" $U
    taskset -c 0 "$RS" tokio-pingpong "$MS" "$t"
    taskset -c 0 "$RS" mio-pingpong "$MS" "$t"
  done
done
for _ in $(seq "$RUNS"); do
  "$UV" loop_count 2000000
  "$LB/loopcount_bench" -n 2000000
done
for _ in $(seq "$RUNS"); do
  "$UV" ipc_fd_pass 1000000 64
done
