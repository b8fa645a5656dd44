#!/usr/bin/env bash
# Scale benchmark of the Kubernetes operator: N Rollouts (default 10000) on the
# in-memory API server with the simulated cluster, reconciled by a real
# `baton operator` process. Prints a Markdown row: time until all N are Healthy, time
# until all N promoted a canary, reconciles, the operator's peak memory (VmHWM), and
# its p50/p99 reconcile latency.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-10000}"
cargo build --release -p baton --bin baton -p baton-k8s --example scale
echo "| rollouts | all Healthy | all canaries promoted | reconciles | operator peak memory | reconcile p50 | reconcile p99 |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
./target/release/examples/scale "$n" target/release/baton
