#!/bin/bash
# Instructions per churned connection (one request, `Connection: close`),
# counted by valgrind's callgrind: a repeatable measure of the CPU a
# server spends per connection, whatever else the machine runs.
#
# Each server runs twice under callgrind (every process of it: the
# primary, and the workers it forks or execs), the lab's load generator
# (natively) driving a fixed number of connections, N1 then N2; a process's
# instructions per connection are (I(N2) - I(N1)) / (N2 - N1), which
# cancels start-up and shutdown. A role's figure sums its processes
# ("workers": all of them).
#
# usage: bench/scripts/instr_per_conn.sh [servers="rr none"] [N1=500] [N2=1500]
#   servers: rr, none, rr-w<K> (round-robin, handoff window K), leastconn,
#            reuseport (cluster_hello with 2 workers). nginx is not here:
#            callgrind wrote no files for the workers its master forks;
#            cpu_per_conn.sh and `strace -f -c` measure it instead.
#   EXE=<cluster_hello> measures another build (default: this tree's,
#   built here); WORKERS (default 2); CONNS (generator connections, 50);
#   KEEP=<dir> keeps the callgrind files there (callgrind_annotate them).
# Prints one line per server and role:
#   <server> <role> <instructions per connection> <processes>
set -eu
cd "$(dirname "$0")/../.."
servers=${1:-"rr none"}; n1=${2:-500}; n2=${3:-1500}
workers=${WORKERS:-2}; conns=${CONNS:-50}
if [ -z "${EXE:-}" ]; then
  cargo build --release -p uvcluster --example cluster_hello >/dev/null 2>&1
  EXE=target/release/examples/cluster_hello
fi
cargo build --release -p uvcluster-bench --bin loadgen >/dev/null 2>&1
loadgen=$PWD/target/release/loadgen
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
port=$((26000 + $$ % 5000))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One run: server, connections -> callgrind files in $work/<server>-<n>/
run() {
  local name=$1 n=$2 out=$work/$1-$2 pid log
  mkdir -p "$out"; port=$((port + 1)); log=$out/log
  local vg=(valgrind --tool=callgrind --trace-children=yes
            "--callgrind-out-file=$out/cg.%p" --log-file="$out/vg.%p")
  local policy=$name window=1
  case $name in rr-w*) policy=rr; window=${name#rr-w} ;; esac
  PORT=$port WORKERS=$workers NODE_CLUSTER_SCHED_POLICY=$policy UVCLUSTER_HANDOFF_WINDOW=$window \
    "${vg[@]}" "$EXE" >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 1500); do grep -q ready "$log" && break; sleep 0.02; done
  REQUESTS=$n "$loadgen" "127.0.0.1:$port" "$conns" 3600 close >"$out/load" ||
    echo "($name: load generator failed)" >&2
  grep -q " errors=0 " "$out/load" || echo "($name $n: $(cat "$out/load"))" >&2
  kill -INT $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
}

# "primary <Ir>" / "worker <Ir>" lines of one run: the process whose parent
# is not among the run's processes is the primary.
roles() {
  local out=$1 f p ppid
  local pids=$(for f in "$out"/cg.*; do echo "${f##*.}"; done)
  for f in "$out"/cg.*; do
    p=${f##*.}
    ppid=$(sed -n 's/^==[0-9]*== Parent PID: //p' "$out/vg.$p" | head -1)
    local ir=$(sed -n 's/^summary: //p' "$f" | head -1)
    [ -n "$ir" ] || ir=$(sed -n 's/^totals: //p' "$f" | head -1)
    if echo "$pids" | grep -qx "$ppid"; then echo "worker $ir"; else echo "primary $ir"; fi
  done
}

for s in $servers; do
  run "$s" "$n1" || continue
  run "$s" "$n2" || continue
  for role in primary worker; do
    a=$(roles "$work/$s-$n1" | awk -v r=$role '$1 == r { s += $2; n++ } END { print s + 0, n + 0 }')
    b=$(roles "$work/$s-$n2" | awk -v r=$role '$1 == r { s += $2; n++ } END { print s + 0, n + 0 }')
    read -r ia na <<<"$a"; read -r ib nb <<<"$b"
    [ "$nb" -gt 0 ] || continue
    echo "$s $role $(( (ib - ia) / (n2 - n1) )) $nb"
  done
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp -r "$work/$s-$n1" "$work/$s-$n2" "$KEEP/"; fi
done
