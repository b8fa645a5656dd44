#!/usr/bin/env bash
# What a proxy crash costs: SIGKILL the proxy of a Healthy rollout while a client
# opens a new connection every millisecond, and count the refused connections until
# the controller's replacement serves. Usage: bench/proxy-crash.sh [RUNS] [PROFILE]
# (PROFILE: release, the default, or debug to reuse a test build).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
profile=${2:-release}
if [ "$profile" = release ]; then
  cargo build --release --workspace --bins >/dev/null 2>&1
fi
bin=$PWD/target/$profile
work=$(mktemp -d)
trap '"$bin/baton" --dir "$work/.baton" down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
listen=127.0.0.1:$(port)
sed -e "s#./target/release/hello#$bin/hello#" -e "s#127.0.0.1:8080#$listen#" \
  examples/hello/canary.yaml >"$work/hello.yaml"
"$bin/baton" --dir "$work/.baton" up -f "$work/hello.yaml" >"$work/up.log" 2>&1 &
for _ in $(seq 300); do [ -s "$work/.baton/api.addr" ] && break; sleep 0.1; done
"$bin/baton" --dir "$work/.baton" wait hello --for healthy --timeout 60s >/dev/null
echo "| run | refused connections | first refused → first served (ms) |"
echo "| --- | --- | --- |"
for i in $(seq 1 "$runs"); do
  pid=$(python3 - "$work/.baton/proxy.sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"op":"ping"}\n'); print(json.loads(s.makefile().readline())["pid"])
PY
)
  python3 - "$listen" "$pid" "$i" <<'PY'
import os, signal, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1); pid = int(sys.argv[2])
os.kill(pid, signal.SIGKILL)
refused, first, deadline = 0, None, time.time() + 30
while time.time() < deadline:
    s = socket.socket()
    try:
        s.connect((host, int(port))); s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        if s.recv(12).startswith(b"HTTP/1.1 200"):
            break
    except OSError:
        refused += 1; first = first or time.time()
    finally:
        s.close()
    time.sleep(0.001)
gap = (time.time() - first) * 1000 if first else 0
print("| %s | %d | %.0f |" % (sys.argv[3], refused, gap))
PY
done
