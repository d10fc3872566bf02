#!/bin/bash
# The slow-handler mix at several concurrencies: round-robin against
# least-connections, the cluster_hello example under the lab's load
# generator, one run each, the two modes back to back.
#
# usage: bench/scripts/slow_sweep.sh [workers=2] [secs=3] [block|spin] [connections...]
# EVERY and MS set the mix (default: one request in 200 takes 10 ms).
set -eu
cd "$(dirname "$0")/../.."
workers=${1:-2}; secs=${2:-3}; kind=${3:-slow}
[ "$kind" = block ] && kind=slow
shift $(( $# < 3 ? $# : 3 ))
conns=${*:-4 8 16 32 50}
cargo build --release -p uvcluster --example cluster_hello >/dev/null 2>&1
cargo build --release -p uvcluster-bench --bin loadgen >/dev/null 2>&1
port=$((21000 + $$ % 5000))
echo "| connections | mode | req/s | p99 | p99 others |"
echo "| --- | --- | --- | --- | --- |"
for c in $conns; do
  for policy in rr leastconn; do
    port=$((port + 1))
    log=$(mktemp)
    PORT=$port WORKERS=$workers NODE_CLUSTER_SCHED_POLICY=$policy \
      target/release/examples/cluster_hello >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 200); do grep -q ready "$log" && break; sleep 0.05; done
    line=$(EVERY=${EVERY:-200} MS=${MS:-10} target/release/loadgen "127.0.0.1:$port" "$c" "$secs" "$kind")
    kill -INT $pid; wait $pid 2>/dev/null || true; rm -f "$log"
    get() { echo "$line" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
    printf '| %s | %s | %s | %.2f ms | %.2f ms |\n' "$c" "$policy" "$(get rps)" \
      "$(echo "$(get p99_us) / 1000" | bc -l)" "$(echo "$(get fast_p99_us) / 1000" | bc -l)"
  done
done
