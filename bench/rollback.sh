#!/usr/bin/env bash
# Time from a broken revision's first bad answer to 0 % weight on it, under load,
# gated by the proxy's own counters and by Prometheus at a 1 s scrape interval, in the
# same run. Usage: bench/rollback.sh [RUNS] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
rate=${2:-400}
command -v prometheus >/dev/null || { echo "needs the prometheus server (apt-get install prometheus)" >&2; exit 1; }
cargo build --release --workspace --bins >/dev/null 2>&1
work=$(mktemp -d)
trap 'kill $prom 2>/dev/null || true; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metrics=127.0.0.1:$(port)
promaddr=127.0.0.1:$(port)
cat >"$work/prometheus.yml" <<YAML
global: { scrape_interval: 1s, evaluation_interval: 1s }
scrape_configs:
  - job_name: baton
    static_configs: [{ targets: ["$metrics"] }]
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="$promaddr" >"$work/prometheus.log" 2>&1 &
prom=$!
for _ in $(seq 100); do curl -sf "http://$promaddr/-/ready" >/dev/null 2>&1 && break; sleep 0.1; done
row() {
  python3 -c '
import json, sys
s = json.load(sys.stdin)
rb = s["rollbackMs"]
print("| %s | %s | %d | %d | %d | %s |" % (sys.argv[1], sys.argv[2], s["requests"], s["v3BadAnswers"], s["failedNotV3"], "%.2f" % (rb / 1000) if rb is not None else "n/a"))
' "$1" "$2"
}
echo "| gate provider | run | requests | v3's bad answers | failed by the rollouts | v3 first bad answer → 0 % (s) |"
echo "| --- | --- | --- | --- | --- | --- |"
for i in $(seq 1 "$runs"); do
  ./target/release/baton demo --example hello --rate "$rate" --output json 2>/dev/null | row builtin "$i"
  ./target/release/baton demo --example hello --rate "$rate" --metrics-listen "$metrics" --prometheus "http://$promaddr" --output json 2>/dev/null | row "prometheus (1 s scrape)" "$i"
done
