#!/bin/bash
# Two builds of cluster_hello, A and B, under one policy with the
# slow-handler mix (16 connections, one request in 200 blocks its
# worker's loop for 10 ms), taking turns and alternating which goes
# first each round (the machine's load drifts; whichever runs first in a
# pair is otherwise favoured or penalised). Prints each run's p99 and
# req/s, then each build's p99 values sorted.
#
# usage: bench/scripts/ab_slow_p99.sh A_EXE B_EXE [policy=leastconn] [rounds=10] [secs=3]
set -eu
cd "$(dirname "$0")/../.."
A=$1; B=$2; policy=${3:-leastconn}; rounds=${4:-10}; secs=${5:-3}
cargo build --release -p uvcluster-bench --bin loadgen >/dev/null 2>&1
loadgen=target/release/loadgen
port=$((31000 + $$ % 3000)); out=$(mktemp); trap 'rm -f "$out"' EXIT
one() { # name exe
  local log pid line; log=$(mktemp); port=$((port + 1))
  PORT=$port WORKERS=2 NODE_CLUSTER_SCHED_POLICY=$policy "$2" >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do grep -q ready "$log" && break; sleep 0.02; done
  line=$("$loadgen" "127.0.0.1:$port" 16 "$secs" slow)
  kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$log"
  get() { echo "$line" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  echo "$1 p99_us=$(get p99_us) rps=$(get rps)" | tee -a "$out"
}
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then one A "$A"; one B "$B"; else one B "$B"; one A "$A"; fi
done
for n in A B; do
  echo "$n p99 sorted (µs): $(awk -v n=$n '$1 == n { sub("p99_us=", "", $2); print $2 }' "$out" | sort -n | tr '\n' ' ')"
done
