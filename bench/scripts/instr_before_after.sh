#!/bin/bash
# "No slower than before", repeatably: instructions (valgrind's callgrind,
# user space) per unit of work of two builds, on the same inputs, so that
# a machine shared with other work cannot move the figures.
#
#   bench/scripts/instr_before_after.sh BEFORE_RELEASE_DIR AFTER_RELEASE_DIR [rounds=1]
#
# Each directory is a cargo `target/release` with `uv_bench` and
# `examples/cluster_hello` built, e.g. for 84a4ccb:
#   git archive 84a4ccb | tar -x -C /tmp/before-src
#   (cd /tmp/before-src && CARGO_TARGET_DIR=/tmp/before-target cargo build --release \
#      -p uvcluster --example cluster_hello && CARGO_TARGET_DIR=/tmp/before-target \
#      cargo build --release -p uvcluster-bench --bin uv_bench)
#   bench/scripts/instr_before_after.sh /tmp/before-target/release target/release
#
# Rows (instructions per unit; the unit in brackets):
#   uv_bench million_timers 200000 1000   [timer: armed, fired, closed]
#   uv_bench loop_count 500000            [loop iteration]
#   uv_bench ipc_fd_pass 20000 64         [fd passed, both ends]
#   uv_bench ping_pongs tcp|unix 2000     [round trip, the client; runs 2 s]
#   cluster_hello rr/none: primary and workers per connection
#     (bench/scripts/instr_per_conn.sh, 500 and 1500 connections)
# Prints a markdown table: row, before, after, after/before.
set -eu
cd "$(dirname "$0")/../.."
B=$(cd "$1" && pwd); A=$(cd "$2" && pwd); rounds=${3:-1}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

# Instructions of one uv_bench run divided by its unit count.
uvb() { # release dir, unit-count source (arg|count), args...
  local dir=$1 per=$2; shift 2
  local f=$work/cg.$RANDOM out
  out=$(valgrind --tool=callgrind --callgrind-out-file="$f" --log-file=/dev/null \
    "$dir/uv_bench" "$@" 2>/dev/null | tail -1)
  local ir; ir=$(sed -n 's/^summary: //p;s/^totals: //p' "$f" | head -1)
  local n=$per
  [ "$per" = count ] && n=$(echo "$out" | tr ' ' '\n' | sed -n 's/^count=//p')
  echo $(( ir / n ))
}

rows=()
add() { rows+=("$1|$2|$3"); }
for _ in $(seq "$rounds"); do
  for side in B A; do
    dir=${!side}
    eval "${side}_t=\$(uvb $dir 200000 million_timers 200000 1000)"
    eval "${side}_l=\$(uvb $dir 500000 loop_count 500000)"
    eval "${side}_f=\$(uvb $dir 20000 ipc_fd_pass 20000 64)"
    eval "${side}_pt=\$(uvb $dir count ping_pongs tcp 2000)"
    eval "${side}_pu=\$(uvb $dir count ping_pongs unix 2000)"
    per=$(EXE=$dir/examples/cluster_hello bench/scripts/instr_per_conn.sh "rr none" 500 1500)
    eval "${side}_per=\"\$per\""
  done
  add "uv_bench million_timers (per timer)" "$B_t" "$A_t"
  add "uv_bench loop_count (per iteration)" "$B_l" "$A_l"
  add "uv_bench ipc_fd_pass (per fd)" "$B_f" "$A_f"
  add "uv_bench ping_pongs tcp (per round trip)" "$B_pt" "$A_pt"
  add "uv_bench ping_pongs unix (per round trip)" "$B_pu" "$A_pu"
  while read -r s role ir _; do
    # `none`: the primary does nothing per connection.
    [ "$s $role" = "none primary" ] && continue
    b=$(echo "$B_per" | awk -v s="$s" -v r="$role" '$1 == s && $2 == r { print $3 }')
    add "cluster_hello $s, $role (per connection)" "$b" "$ir"
  done <<<"$A_per"
done
echo "| row | before | after | after / before |"
echo "| --- | ---: | ---: | ---: |"
for r in "${rows[@]}"; do
  IFS='|' read -r name b a <<<"$r"
  printf '| %s | %s | %s | %.2f |\n' "$name" "$b" "$a" "$(echo "$a / $b" | bc -l)"
done
