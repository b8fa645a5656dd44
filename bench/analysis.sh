#!/usr/bin/env bash
# Power and false rollbacks of Baton's error-rate and latency judges beside a Flagger-style fixed
# threshold and a Kayenta-style Mann-Whitney judgment, on the same generated requests
# (crates/analysis/examples/judges.rs). Usage: bench/analysis.sh [NULL_RUNS] [RUNS] [MINUTES] [LATENCY_NULL_RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --release -p baton-analysis --example judges -- \
  --null-runs "${1:-500}" --runs "${2:-50}" --minutes "${3:-10}" --latency-null-runs "${4:-200}"
