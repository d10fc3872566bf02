#!/bin/bash
# The handoff window against the machine's limit, in one run: connection
# churn (one request per connection, `Connection: close`) for round-robin
# with handoff windows 1, 2 and 4, ReusePort and nginx, then the
# slow-handler mix (one request in 200 blocks its worker's loop for 10 ms)
# for round-robin with the same windows and least-connections. 2 workers
# each, the crate's load generator, the generator and the servers sharing
# every CPU (as `wrk` does in the issue's figures). The servers take turns,
# round after round, so that a machine whose load changes (other work on a
# shared VM) weighs on all of them alike; it prints every run, then the
# median and the range of each.
#
# usage: bench/scripts/window_sweep.sh [rounds=5] [secs=2] [connections=50]
# BEFORE=<path to another cluster_hello> adds its rr and leastconn rows.
# PIN=1 runs the load generator on CPU 0 and the servers on CPU 1 instead
# (taskset), as the lab's `compare` does by default.
# nginx (Debian's nginx-light) is installed with apt-get if missing; its
# rows are skipped, loudly, if it cannot be.
set -eu
cd "$(dirname "$0")/../.."
rounds=${1:-5}; secs=${2:-2}; conns=${3:-50}
cargo build --release -p uvcluster --example cluster_hello >/dev/null 2>&1
cargo build --release -p uvcluster-bench --bin loadgen >/dev/null 2>&1
bin=target/release/examples
loadgen=target/release/loadgen
nginx=$(command -v nginx || ls /usr/sbin/nginx 2>/dev/null || true)
if [ -z "$nginx" ]; then
  echo "nginx not found: installing Debian's nginx-light" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light) >/dev/null 2>&1 || true
  nginx=$(command -v nginx || ls /usr/sbin/nginx 2>/dev/null || true)
fi
[ -n "$nginx" ] || echo "!!! nginx is not available and could not be installed: its rows are SKIPPED !!!" >&2
port=$((23000 + $$ % 5000))
srv=(); gen=()
if [ "${PIN:-0}" = 1 ]; then srv=(taskset -c 1); gen=(taskset -c 0); fi
results=$(mktemp)

# One run: server name, workload (close|slow), connections.
run() {
  local name=$1 workload=$2 c=$3 pid log dir=""
  port=$((port + 1)); log=$(mktemp)
  case $name in
    nginx)
      dir=$(mktemp -d)
      cat >"$dir/nginx.conf" <<EOF
worker_processes 2; daemon off; master_process on; pid $dir/nginx.pid;
error_log $dir/error.log warn; events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  server { listen 127.0.0.1:$port reuseport; location / { return 200 'hello world\n'; } } }
EOF
      "${srv[@]}" "$nginx" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$log" 2>&1 &
      pid=$!
      for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.02; done ;;
    *)
      local exe=$bin/cluster_hello policy window=1
      case $name in
        rr-w*) policy=rr; window=${name#rr-w} ;;
        before-*) exe=$BEFORE; policy=${name#before-} ;;
        *) policy=$name ;;
      esac
      PORT=$port WORKERS=2 NODE_CLUSTER_SCHED_POLICY=$policy UVCLUSTER_HANDOFF_WINDOW=$window \
        "${srv[@]}" "$exe" >"$log" 2>&1 &
      pid=$!
      for _ in $(seq 300); do grep -q ready "$log" && break; sleep 0.02; done ;;
  esac
  local line
  line=$("${gen[@]}" "$loadgen" "127.0.0.1:$port" "$c" "$secs" "$workload")
  local sig=INT; [ "$name" = nginx ] && sig=QUIT
  kill -$sig $pid 2>/dev/null || echo "($name stopped before the end of its run)" >&2
  wait $pid 2>/dev/null || true
  rm -f "$log"; [ -n "$dir" ] && rm -rf "$dir"
  get() { echo "$line" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  echo "$workload $name $(get rps) $(get p99_us) $(get fast_p99_us)" | tee -a "$results"
}

churn="rr-w1 rr-w2 rr-w4 reuseport"
slow="rr-w1 rr-w2 rr-w4 leastconn"
[ -n "$nginx" ] && churn="$churn nginx"
if [ -n "${BEFORE:-}" ]; then churn="$churn before-rr"; slow="$slow before-rr before-leastconn"; fi
for r in $(seq "$rounds"); do
  for s in $churn; do run "$s" close "$conns"; done
  for s in $slow; do run "$s" slow 16; done
done

# Median and range per workload and server: req/s for churn, p99 for slow.
stat() { # column -> "median min max" of that column for $w $s
  awk -v w="$w" -v s="$s" -v c="$1" '$1 == w && $2 == s { print $c }' "$results" | sort -n |
    awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)], v[1], v[NR] }'
}
echo
echo "| workload | server | req/s median (range) | p99 median (range) |"
echo "| --- | --- | --- | --- |"
for w in close slow; do
  for s in $([ $w = close ] && echo "$churn" || echo "$slow"); do
    read -r rm rl rh <<<"$(stat 3)"
    read -r pm pl ph <<<"$(stat 4)"
    printf '| %s | %s | %s (%s–%s) | %.2f ms (%.2f–%.2f) |\n' "$w" "$s" "$rm" "$rl" "$rh" \
      "$(echo "$pm / 1000" | bc -l)" "$(echo "$pl / 1000" | bc -l)" "$(echo "$ph / 1000" | bc -l)"
  done
done
rm -f "$results"
