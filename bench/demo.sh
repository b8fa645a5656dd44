#!/usr/bin/env bash
# Runs `baton demo` several times and prints its figures as a Markdown table.
# Usage: bench/demo.sh [RUNS] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
rate=${2:-400}
cargo build --release --workspace --bins >/dev/null 2>&1
echo "| run | rate (req/s) | requests | failed | v3's own bad answers | failed by the rollouts | v1→v2 canary (s) | v3 first bad answer → 0 % (s) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for i in $(seq 1 "$runs"); do
  ./target/release/baton demo --example hello --rate "$rate" --output json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
rb = s["rollbackMs"]
print("| %s | %s | %d | %d | %d | %d | %.1f | %s |" % (sys.argv[1], sys.argv[2], s["requests"], s["failed"], s["v3BadAnswers"], s["failedNotV3"], s["v2RolloutSeconds"], "%.2f" % (rb / 1000) if rb is not None else "n/a"))
' "$i" "$rate"
done
