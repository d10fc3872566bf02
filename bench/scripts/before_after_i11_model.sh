#!/bin/bash
# Before/after issue 11's ownership model: uv_bench and compare from two
# builds, interleaved (before, after, before, after, ...: 3 rounds each),
# so that a shared, noisy machine weighs on both alike.
#
#   bench/scripts/before_after_i11_model.sh BEFORE_TREE AFTER_TREE OUT_DIR
#
# Each tree is a checkout with `cargo build --release -p uvcluster-bench
# --bin uv_bench --bin compare` and `cargo build --release -p uvcluster
# --example cluster_hello` done (target/ inside the tree).
set -eu
B=$1/target/release
A=$2/target/release
OUT=$3
mkdir -p "$OUT"
uvb() { # $1 label, $2 release dir
  local bin=$2/uv_bench
  echo "== $1 million_timers"; "$bin" million_timers 1000000 1000
  echo "== $1 ping_pongs tcp"; taskset -c 0 "$bin" ping_pongs tcp 5000
  echo "== $1 ping_pongs unix"; taskset -c 0 "$bin" ping_pongs unix 5000
  echo "== $1 loop_count"; "$bin" loop_count 2000000
  echo "== $1 ipc_fd_pass"; "$bin" ipc_fd_pass 1000000 64
}
cmp() { # $1 tree, $2 release dir
  (cd "$1" && CLUSTER_HELLO=$2/examples/cluster_hello COMPARE_ONLY=ours \
    COMPARE_SVG=/dev/null "$2/compare" 2 50)
}
for r in 1 2 3; do
  uvb before "$B" > "$OUT/uv_before_$r.txt" 2>&1
  uvb after "$A" > "$OUT/uv_after_$r.txt" 2>&1
done
for r in 1 2 3; do
  cmp "$1" "$B" > "$OUT/cmp_before_$r.txt" 2>&1
  cmp "$2" "$A" > "$OUT/cmp_after_$r.txt" 2>&1
done
