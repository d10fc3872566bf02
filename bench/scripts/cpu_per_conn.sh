#!/bin/bash
# CPU time (user + system, every process of the server: `perf stat`'s
# task-clock, children included) and context switches per churned
# connection (one request, `Connection: close`), for a fixed number of
# connections driven by the lab's load generator. Unlike instructions
# (instr_per_conn.sh) this counts the kernel's work too (accept, the fd
# passing, the loopback TCP handshake the server side's softirq does
# while a server process runs), but it moves with the machine's load:
# compare servers within one run, which this script interleaves.
#
# usage: bench/scripts/cpu_per_conn.sh [servers="rr-w1 reuseport nginx"] [N=20000] [rounds=3]
# servers: rr-w<K> (round-robin, handoff window K), rr, none, reuseport,
#   leastconn (cluster_hello, WORKERS=2), nginx, before-<policy> (the
#   cluster_hello at $BEFORE). EXE=<cluster_hello> measures another build.
# Prints: <server> <µs CPU per connection> <context switches per connection>
#         <generator µs CPU per connection>, one line per run, then medians.
set -eu
cd "$(dirname "$0")/../.."
servers=${1:-"rr-w1 reuseport nginx"}; n=${2:-20000}; rounds=${3:-3}
workers=${WORKERS:-2}; conns=${CONNS:-50}
cargo build --release -p uvcluster --example cluster_hello >/dev/null 2>&1
cargo build --release -p uvcluster-bench --bin loadgen >/dev/null 2>&1
exe=${EXE:-target/release/examples/cluster_hello}; loadgen=target/release/loadgen
nginx=$(command -v nginx || ls /usr/sbin/nginx 2>/dev/null || true)
port=$((29000 + $$ % 3000)); work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
ps=(perf stat -x, -e task-clock,context-switches)
run() {
  local name=$1 pid out=$work/$1.$2 log=$work/log
  port=$((port + 1))
  case $name in
    nginx)
      [ -n "$nginx" ] || return 1
      local dir=$work/ngx; mkdir -p "$dir"
      cat >"$dir/nginx.conf" <<NGX
worker_processes $workers; daemon off; master_process on; pid $dir/nginx.pid;
error_log $dir/error.log warn; events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  server { listen 127.0.0.1:$port reuseport; location / { return 200 'hello world\n'; } } }
NGX
      "${ps[@]}" -o "$out" "$nginx" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$log" 2>&1 &
      pid=$!
      for _ in $(seq 500); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.02; done ;;
    *)
      local policy=$name window=1 bin=$exe
      case $name in
        rr-w*) policy=rr; window=${name#rr-w} ;;
        before-*) bin=$BEFORE; policy=${name#before-} ;;
      esac
      PORT=$port WORKERS=$workers NODE_CLUSTER_SCHED_POLICY=$policy UVCLUSTER_HANDOFF_WINDOW=$window \
        "${ps[@]}" -o "$out" "$bin" >"$log" 2>&1 &
      pid=$!
      for _ in $(seq 500); do grep -q ready "$log" && break; sleep 0.02; done ;;
  esac
  REQUESTS=$n "${ps[@]}" -o "$out.gen" "$loadgen" "127.0.0.1:$port" "$conns" 3600 close >"$out.load"
  # perf forwards the signal to the server it runs.
  local sig=INT; [ "$name" = nginx ] && sig=QUIT
  pkill -$sig -P $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  local ms cs gms
  ms=$(awk -F, '$3 == "task-clock" { print $1 }' "$out"); cs=$(awk -F, '$3 == "context-switches" { print $1 }' "$out")
  gms=$(awk -F, '$3 == "task-clock" { print $1 }' "$out.gen")
  echo "$name $(echo "$ms * 1000 / $n" | bc -l | xargs printf %.1f) $(echo "$cs / $n" | bc -l | xargs printf %.2f) $(echo "$gms * 1000 / $n" | bc -l | xargs printf %.1f) $(sed -n 's/.* rps=\([0-9]*\).*/\1/p' "$out.load")" | tee -a "$work/all"
}
for _ in $(seq "$rounds"); do for s in $servers; do run "$s" "$n" || echo "($s skipped)"; done; done
echo "median: server, µs CPU/conn (server), switches/conn, µs CPU/conn (generator), req/s"
for s in $servers; do
  printf '%s' "$s"
  for c in 2 3 4 5; do
    printf ' %s' "$(awk -v s="$s" -v c=$c '$1 == s { print $c }' "$work/all" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')"
  done
  echo
done
