#!/usr/bin/env bash
# The chaos soak: consecutive rollouts of `examples/hello` under wrk — canary, blue-green
# and rolling, good versions promoted and broken ones (half their answers 500s) rolled
# back — of the gRPC example under grpcio's calls and open streams, and of the example
# exchange (trade by canary, notification by canary, user by blue-green) under its
# trader: orders with idempotency keys and WebSocket feeds. An instance is SIGKILLed in
# every rollout of hello, trade and user (of the blue-green ones, an active one: a
# preview instance killed during its smoke test rightly fails it); the controller is
# SIGKILLed (and started again) and the proxy hot-restarted every 10 rollouts; the
# state directory's disk (a 64 MB tmpfs, when root) fills up once. Loopback only;
# bounded in time; stops everything it started.
#
# Usage: bench/soak.sh [--rollouts N] [--minutes M]   (default: 100 rollouts, no time cap)
#   BATON=path     the baton binary (default target/debug/baton, as scripts/test builds it)
#   HELLO=path     the hello binary (default: beside it, with grpc-hello and exchange-*)
#   SEED=n         the random choices (which instance, when) repeat with the same seed
#   SOAK_RSS=f     appends, per rollout: number, seconds, controller and proxy anonymous
#                  RSS, then their VmRSS (kB)
#   SOAK_DISK=0    no full-disk episode; SOAK_DISK_AT=n: at rollout n (default 25)
#   SOAK_RESTARTS=0  no controller kill nor proxy restart: one life of each, whose RSS
#                  curve tells a leak (a slope) from warm-up (a plateau)
#
# Pass: wrk saw 0 failed requests (non-2xx or socket errors: the canaries shield their
# users, so a broken version's 500s are retried on stable and reach no one), every good
# version promoted and every broken one rolled back, each controller restart resumed
# exactly (same step, same instances, no extra revision), no gRPC call failed and no
# stream broke (streams end with UNAVAILABLE when their instance drains or the proxy
# restarts, and reconnect), the trader lost, doubled and missed nothing, had no failed
# request but the broken versions' own and no feed ended without a close frame, the
# controller lived through the full disk, `baton audit verify` is clean at the end, and
# over 100 rollouts or more the controller's and the proxy's anonymous RSS grew less than 10 %
# from the 10th to the last, and by the medians of rollouts 10-19 against the last ten.
# Prints a summary and exits 1 on any failure (keeping its logs and state for a look).
set -euo pipefail
cd "$(dirname "$0")/.."
rollouts=100
minutes=0
while [ $# -gt 0 ]; do
  case $1 in
    --rollouts) rollouts=$2; shift 2;;
    --minutes) minutes=$2; shift 2;;
    -h|--help) sed -n '2,33p' "$0"; exit 0;;
    *) echo "unknown argument '$1' (see --help)" >&2; exit 2;;
  esac
done
baton=$(realpath "${BATON:-target/debug/baton}")
hello=$(realpath "${HELLO:-$(dirname "$baton")/hello}")
bin=$(dirname "$hello")
grpc_hello=$bin/grpc-hello
for b in "$baton" "$hello" "$grpc_hello" "$bin"/exchange-{user,trade,notification,trader}; do [ -x "$b" ] || { echo "missing $b: cargo build --workspace --bins" >&2; exit 2; }; done
command -v wrk >/dev/null || { echo "needs wrk: apt-get install wrk" >&2; exit 2; }
# grpcio for the gRPC client: the test venv scripts/deps makes.
python=${XDG_CACHE_HOME:-$HOME/.cache}/baton-test-venv/bin/python
[ -x "$python" ] || python=python3
"$python" -c 'import grpc' 2>/dev/null || { echo "needs grpcio: . scripts/deps" >&2; exit 2; }
RANDOM=${SEED:-1}

work=$(mktemp -d)
keep=1   # its logs stay for a look unless the soak passes
pids=()
up_pid=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$up_pid" ]; then kill -9 "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true; fi
  "$baton" --dir "$work/state" down >/dev/null 2>&1 || true
  if [ "${tmpfs:-0}" = 1 ]; then
    [ "${keep:-0}" = 1 ] && cp -a "$work/state" "$work/state-kept" 2>/dev/null
    umount "$work/state" 2>/dev/null || umount -l "$work/state" 2>/dev/null || true
  fi
  if [ "${keep:-0}" = 1 ]; then echo "soak: its logs and state are kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
export XDG_STATE_HOME="$work/state-home"
unset BATON_AUDIT_KEY BATON_AUDIT_KEY_FILE BATON_AUDIT_HEAD
b() { "$baton" --dir "$work/state" "$@"; }
# shellcheck source=bench/lib.sh
. bench/lib.sh
declare -A LISTEN=([hello]=127.0.0.1:$(port) [hello-bg]=127.0.0.1:$(port) [hello-roll]=127.0.0.1:$(port) [greeter]=127.0.0.1:$(port)
  [user]=127.0.0.1:$(port) [user-preview]=127.0.0.1:$(port) [trade]=127.0.0.1:$(port) [notification]=127.0.0.1:$(port))

exchange_spec() { # name version fail_rate -> the spec of one of the exchange's services
  local strategy gates env="APP_VERSION: $2, BIND: 127.0.0.1, EXCHANGE_DATABASE_URL: \"sqlite:$work/exchange.db\", EXCHANGE_JWT_SECRET: soak-exchange-secret-0123456789abcdef, FAULT_ERROR_RATE: \"$3\""
  local traffic="listen: \"${LISTEN[$1]}\", shieldCanary: true"
  case $1 in
    # Orders carry an Idempotency-Key: a broken canary's 500s are retried on stable.
    trade) strategy="    canary:
      steps:
        - setWeight: 20
        - pause: { duration: 3s }
        - setWeight: 50
        - pause: { duration: 2s }"
      gates="      - name: errors
        metric: { builtin: error_rate }
        successCondition: \"result <= 0.01\"
        interval: 1s
        minRequests: 20";;
    # Feeds are few and long-lived: the gate checks the canary's API directly.
    notification) env="$env, DRAIN_TIMEOUT_SECONDS: \"3\""
      strategy="    canary:
      steps:
        - setWeight: 50
        - pause: { duration: 2s }
        - analysis: { gates: [api] }"
      gates="      - name: api
        metric:
          smoke:
            - path: /readyz
            - { path: /events, expectStatus: 401 }
            - { path: /events, expectStatus: 401 }";;
    user) env="$env, SMOKE_USER: smoke-test, SMOKE_PASSWORD: smoke-test-password"
      traffic="listen: \"${LISTEN[user]}\""
      strategy="    blueGreen:
      previewListen: \"${LISTEN[user-preview]}\"
      autoPromote: true
      smoke:
        - path: /readyz
        - method: POST
          path: /login
          headers: { Content-Type: application/json }
          body: '{\"username\": \"smoke-test\", \"password\": \"smoke-test-password\"}'
          expectBodyContains: '\"token\"'"
      gates="";;
  esac
  cat <<SPEC
apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: { name: $1 }
spec:
  replicas: 2
  run:
    command: ["$bin/exchange-$1", "--port", "{port}"]
    env: { $env }
  probes:
    readiness: { httpGet: { path: /readyz }, periodSeconds: 0.25, failureThreshold: 2 }
    liveness: { httpGet: { path: /healthz }, periodSeconds: 1, failureThreshold: 3 }
  minReadySeconds: 1
  shutdown: { preStopSeconds: 0.5, drainTimeoutSeconds: 5 }
  traffic: { $traffic }
  strategy:
$strategy
$([ -n "$gates" ] && printf '  analysis:\n    gates:\n%s\n' "$gates")
  rollback: { onFailure: true }
SPEC
}

spec() { # name version fail_rate -> the spec's text
  case $1 in trade|notification|user) exchange_spec "$@"; return;; esac
  local strategy
  case $1 in
    hello) strategy="    canary:
      steps:
        - setWeight: 20
        - pause: { duration: 1s }
        - setWeight: 50
        - pause: { duration: 1s }";;
    hello-bg) strategy="    blueGreen:
      autoPromote: true
      smoke:
        - path: /
          expectBodyContains: hello";;
    hello-roll) strategy="    rolling: { maxSurge: 1, maxUnavailable: 0 }";;
    greeter) strategy="    canary:
      steps:
        - setWeight: 30
        - pause: { duration: 1s }";;
  esac
  local program=$hello protocol=""
  [ "$1" = greeter ] && { program=$grpc_hello; protocol=", backendProtocol: h2c"; }
  cat <<SPEC
apiVersion: baton.dev/v1alpha1
kind: Rollout
metadata: { name: $1 }
spec:
  replicas: 3
  run:
    command: ["$program", "--port", "{port}"]
    env: { APP_VERSION: $2, FAIL_RATE: "$3" }
  probes:
    readiness: { httpGet: { path: /readyz }, periodSeconds: 0.2, failureThreshold: 2 }
    liveness: { httpGet: { path: /healthz }, periodSeconds: 1, failureThreshold: 3 }
  minReadySeconds: 1
  shutdown: { preStopSeconds: 0.3, drainTimeoutSeconds: 5 }
  traffic: { listen: "${LISTEN[$1]}", shieldCanary: true$protocol }
  strategy:
$strategy
  analysis:
    gates:
      - name: errors
        metric: { builtin: error_rate }
        successCondition: "result <= 0.01"
        interval: 1s
        minRequests: 20
  rollback: { onFailure: true }
SPEC
}

start_up() { # the controller, in the background (with a spec to apply: its file)
  # Not through `b`: a function in the background is a subshell, and $! must be baton.
  # 3>&-: the gRPC client's stdin stays open as long as anyone holds its write end.
  if [ $# -gt 0 ]; then "$baton" --dir "$work/state" up -f "$1" >>"$work/up.log" 2>&1 3>&- &
  else "$baton" --dir "$work/state" up >>"$work/up.log" 2>&1 3>&- & fi
  up_pid=$!
  for _ in $(seq 300); do
    grep -qs "^$up_pid:" "$work/state/controller.pid" && b status >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "the controller did not start; its log:" >&2; tail -20 "$work/up.log" >&2; exit 1
}
status() { b status "$1" --output json; }
event() { printf '%s %s\n' "$(date +%s.%3N)" "$*" >>"$work/events.log"; }
# Anonymous memory (the heap: what a leak grows) is what the criterion reads. VmRSS also
# counts the pages of the executable as code paths are first run (a debug baton is some
# 100 MB): reported beside it, not judged.
rss_kb() { awk '/RssAnon/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
vm_rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
proxy_pid() { pgrep -nf -- "proxy --control-socket $work/state/proxy.sock" || true; }
instance_pids() { # name [role] -> the pids of its instances (of that role's revisions only)
  status "$1" | python3 -c 'import json,sys; d=json.load(sys.stdin); role=sys.argv[1]; print(" ".join(str(i["pid"]) for r in d.get("revisions",[]) if not role or r.get("role")==role for i in r.get("instances",[]) if i.get("pid")))' "${2:-}"
}
resume_key() { # name -> what a resume must keep, as JSON: phase, step, revisions, pids
  status "$1" | python3 -c '
import json,sys; d=json.load(sys.stdin)
print(json.dumps({"phase": d.get("phase"), "step": (d.get("step") or {}).get("index"),
  "canary": d.get("canaryRevision"), "revisions": sorted(r.get("revision") or r.get("appVersion") or "" for r in d.get("revisions",[])),
  "pids": sorted(i["pid"] for r in d.get("revisions",[]) for i in r.get("instances",[]) if i.get("pid"))}))'
}
# Exact resume: no other revision or canary, the step not gone back, and every instance
# listed before the kill that still runs adopted, not replaced.
resumed_exactly() { # before after -> exit 0 if so, else prints why
  python3 - "$1" "$2" <<'PY'
import json, os, sys
b, a = json.loads(sys.argv[1]), json.loads(sys.argv[2])
why = []
# The new controller may finish what was due (a scale-down) before it is read: fewer
# revisions are fine, another one is not.
extra = sorted(set(a["revisions"]) - set(b["revisions"]))
if extra: why.append(f"revisions {b['revisions']} → {a['revisions']}")
if a["canary"] and a["canary"] != b["canary"]: why.append(f"canary {b['canary']} → {a['canary']}")
if b["canary"] and a["canary"] == b["canary"] and (a["step"] or 0) < (b["step"] or 0):
    why.append(f"step {b['step']} → {a['step']}")
lost = [p for p in b["pids"] if os.path.exists(f"/proc/{p}") and p not in a["pids"]]
if lost: why.append(f"running instances not adopted: {lost}")
print("; ".join(why))
sys.exit(1 if why else 0)
PY
}


# The state directory fills up: the apply made then is refused with a reason (or taken
# and kept), the controller lives on, traffic never notices, and once space is back the
# rollout goes through.
full_disk() { # rollout-number name
  event "state disk: filling it"
  dd if=/dev/zero of="$work/state/filler" bs=1M status=none 2>/dev/null || true
  dd if=/dev/zero of="$work/state/filler2" bs=4k status=none 2>/dev/null || true
  local out rc=0
  out=$(b apply -f "$work/$2.yaml" 2>&1) || rc=$?
  event "state disk full: apply exited $rc: $out"
  # Full while the rollout runs (instances start and log, the status is saved), for as
  # long as it takes or 15 s.
  local waited=0
  b wait "$2" --timeout 15s >/dev/null 2>&1 || waited=$?
  local st; st=$(b status "$2" 2>&1 | head -5 | tr '\n' ' ')
  event "state disk still full: wait exited $waited; $st"
  if ! kill -0 "$up_pid" 2>/dev/null; then
    failures+=("rollout $1: the controller died while the state disk was full: $(tail -5 "$work/up.log" | tr '\n' ' ')")
    rm -f "$work/state/filler" "$work/state/filler2"
    start_up
  fi
  rm -f "$work/state/filler" "$work/state/filler2"
  event "state disk: space back"
  disk_report="apply on a full disk exited $rc ($(echo "$out" | head -c 200)); the rollout $([ "$waited" = 0 ] && echo "finished on the full disk" || echo "had not finished after 15 s on it"); status then: $(echo "$st" | head -c 300)"
  if [ "$rc" != 0 ]; then
    b apply -f "$work/$2.yaml" >/dev/null || failures+=("rollout $1: apply failed after the disk had space again")
  fi
}

mkdir -p "$work/state"
# The state directory on a small tmpfs of its own, to fill it once (needs root).
tmpfs=0
if [ "${SOAK_DISK:-1}" != 1 ]; then echo "soak: SOAK_DISK=${SOAK_DISK}: no full-disk episode" >&2
elif mount -t tmpfs -o size=64m,mode=700 tmpfs "$work/state" 2>/dev/null; then tmpfs=1
else echo "soak: the state directory is not a tmpfs (mounting one needs root): no full-disk episode" >&2; fi
disk_at=${SOAK_DISK_AT:-25}
disk_report=""
names=(hello hello-bg hello-roll greeter trade notification user)
for name in "${names[@]}"; do spec "$name" v0 0 >"$work/$name.yaml"; done
for name in "${names[@]}"; do cat "$work/$name.yaml"; echo ---; done >"$work/all.yaml"
start_up "$work/all.yaml"
for name in "${names[@]}"; do
  b wait "$name" --timeout 60s >"$work/wait.txt" 2>&1 || {
    echo "$name v0 never became healthy:" >&2; cat "$work/wait.txt" >&2; tail -20 "$work/up.log" >&2; exit 1; }
done

# wrk through each listener for the whole soak, 2 connections each, one thread, in runs
# of 5 s: a failure is then placed within 5 s, beside the events that may explain it.
wrk_loop() { # name
  while [ ! -e "$work/wrk.stop" ]; do
    local at; at=$(date +%s.%3N)
    wrk -t1 -c2 -d5s --timeout 5s "http://${LISTEN[$1]}/" >"$work/wrk-$1.run" 2>&1 || true
    { echo "=== run from $at"; cat "$work/wrk-$1.run"; } >>"$work/wrk-$1.txt"
  done
}
for name in hello hello-bg hello-roll; do
  wrk_loop "$name" 3>&- & pids+=($!)
done
wrk_pids=("${pids[@]}")
# gRPC: unary calls and open streams through the whole soak (the greeter's instances are
# never SIGKILLed: a call in flight on a killed instance may have run, so it cannot be
# retried, and its failure would be ours to explain; drains end streams cleanly).
mkfifo "$work/grpc.in"
"$python" crates/baton/tests/grpc_client.py "${LISTEN[greeter]}" 2 2 <"$work/grpc.in" >"$work/grpc.out" 2>&1 & grpc_pid=$!
exec 3>"$work/grpc.in"
# The exchange under the trader: orders with idempotency keys, each trader following its
# WebSocket feed (resuming from its last sequence number); checked at the end.
"$bin/exchange-trader" --user-url "http://${LISTEN[user]}" --trade-url "http://${LISTEN[trade]}" \
  --notify-url "http://${LISTEN[notification]}" --traders 4 --rate 50 --duration 24h --output json \
  >"$work/trader.json" 2>"$work/trader.log" 3>&- & trader_pid=$!
pids+=("$trader_pid" "$grpc_pid")

start=$(date +%s)
deadline=$(( minutes > 0 ? start + minutes * 60 : 0 ))
failures=()
broken_versions=()
promoted=0 rolled_back=0 killed=0 controller_kills=0 proxy_restarts=0 done_rollouts=0
rss10_up="" rss10_proxy="" vm10_up="" vm10_proxy=""
for i in $(seq 1 "$rollouts"); do
  if [ "$deadline" -gt 0 ] && [ "$(date +%s)" -ge "$deadline" ]; then break; fi
  name=${names[$(( (i - 1) % ${#names[@]} ))]}
  round=$(( (i - 1) / ${#names[@]} ))
  broken=0
  # Every fourth canary of hello and every third of trade is broken: half its answers
  # are 500s.
  [ "$name" = hello ] && [ $(( round % 4 )) -eq 0 ] && broken=1
  [ "$name" = trade ] && [ $(( round % 3 )) -eq 1 ] && broken=1
  [ $broken = 1 ] && broken_versions+=("v$i")
  fail=0; [ $broken = 1 ] && fail=0.5
  spec "$name" "v$i" "$fail" >"$work/$name.yaml"
  if [ "$tmpfs" = 1 ] && [ "$i" -eq "$disk_at" ]; then
    full_disk "$i" "$name"
  else
    b apply -f "$work/$name.yaml" >/dev/null
  fi
  event "rollout $i: $name v$i applied$([ $broken = 1 ] && echo " (broken)")"
  # An instance SIGKILLed at a random moment of the rollout.
  sleep "0.$(( RANDOM % 9 + 1 ))"
  # Of the blue-green rollouts (user, hello-bg), only the active revision's: a preview
  # instance killed while its smoke test runs fails that test, and the rollback that
  # follows is right, not a failure. (With five stacks kept warm a hello-bg victim was
  # seldom a preview one; with only the replaced one kept, half of them are.)
  role=""; { [ "$name" = user ] || [ "$name" = hello-bg ]; } && role=stable
  read -ra ip <<<"$(instance_pids "$name" "$role")"
  # Not the greeter's nor the notification service's: a killed instance's gRPC streams
  # and WebSocket feeds end abruptly, and the soak counts those as failures.
  if [ "$name" != greeter ] && [ "$name" != notification ] && [ ${#ip[@]} -gt 0 ]; then
    victim=${ip[$(( RANDOM % ${#ip[@]} ))]}
    kill -9 "$victim" 2>/dev/null && killed=$((killed + 1)) && event "instance $victim of $name SIGKILLed"
  fi
  if [ "${SOAK_RESTARTS:-1}" != 0 ] && [ $(( i % 10 )) -eq 5 ]; then
    # The controller SIGKILLed mid-rollout: the next one resumes where it was.
    before=$(resume_key "$name")
    kill -9 "$up_pid"; wait "$up_pid" 2>/dev/null || true
    event "controller SIGKILLed"
    start_up
    event "controller started"
    after=$(resume_key "$name")
    controller_kills=$((controller_kills + 1))
    if ! why=$(resumed_exactly "$before" "$after"); then
      failures+=("rollout $i ($name): the resume changed the rollout: $why (before $before, after $after)")
    fi
  fi
  if [ "${SOAK_RESTARTS:-1}" != 0 ] && [ $(( i % 10 )) -eq 0 ]; then
    event "proxy restart"
    b restart-proxy >/dev/null || failures+=("rollout $i: restart-proxy failed")
    event "proxy restarted"
    proxy_restarts=$((proxy_restarts + 1))
  fi
  if [ $broken = 1 ]; then
    if b wait "$name" --for degraded --timeout 60s >/dev/null 2>&1; then rolled_back=$((rolled_back + 1))
    else failures+=("rollout $i ($name v$i, broken): not rolled back: $(status "$name" | head -c 400)"); fi
  else
    if b wait "$name" --timeout 60s >/dev/null 2>&1; then promoted=$((promoted + 1))
    else failures+=("rollout $i ($name v$i): not promoted: $(status "$name" | head -c 400)"); fi
  fi
  done_rollouts=$i
  event "rollout $i: $name done"
  if [ "$i" -eq 10 ]; then
    rss10_up=$(rss_kb "$up_pid"); rss10_proxy=$(rss_kb "$(proxy_pid)")
    vm10_up=$(vm_rss_kb "$up_pid"); vm10_proxy=$(vm_rss_kb "$(proxy_pid)")
  fi
  # The curve, not only its ends: a plateau is warm-up, a slope is a leak.
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$(( $(date +%s) - start ))" "$(rss_kb "$up_pid")" "$(rss_kb "$(proxy_pid)")" \
    "$(vm_rss_kb "$up_pid")" "$(vm_rss_kb "$(proxy_pid)")" | tee -a "${SOAK_RSS:-/dev/null}" >>"$work/rss.tsv"
  echo "soak: rollout $i ($name v$i$([ $broken = 1 ] && echo ", broken")) done after $(( $(date +%s) - start )) s" >&2
done
rss_end_up=$(rss_kb "$up_pid"); rss_end_proxy=$(rss_kb "$(proxy_pid)")
vm_end_up=$(vm_rss_kb "$up_pid"); vm_end_proxy=$(vm_rss_kb "$(proxy_pid)")
touch "$work/wrk.stop"
for p in "${wrk_pids[@]}"; do wait "$p" 2>/dev/null || true; done
exec 3>&-   # the gRPC client reports once its stdin closes
# At most 30 s for its report (a client stuck in a call is a failure, not a hang).
for _ in $(seq 300); do kill -0 "$grpc_pid" 2>/dev/null || break; sleep 0.1; done
kill "$grpc_pid" 2>/dev/null || true
wait "$grpc_pid" 2>/dev/null || true
# The trader checks the books once stopped: at most a minute for that.
kill -INT "$trader_pid" 2>/dev/null || true
for _ in $(seq 600); do kill -0 "$trader_pid" 2>/dev/null || break; sleep 0.1; done
kill "$trader_pid" 2>/dev/null || true
wait "$trader_pid" 2>/dev/null || true
pids=()
verify=$(b audit verify 2>&1) || failures+=("audit verify: $verify")

VM="${vm10_up:-0} $vm_end_up ${vm10_proxy:-0} $vm_end_proxy" DISK="$disk_report" DISK_AT="$disk_at" BROKEN="${broken_versions[*]}" python3 - "$work" "$done_rollouts" "$promoted" "$rolled_back" "$killed" "$controller_kills" "$proxy_restarts" \
  "${rss10_up:-0}" "$rss_end_up" "${rss10_proxy:-0}" "$rss_end_proxy" "$(( $(date +%s) - start ))" "${failures[@]}" <<'PY'
import glob, json, os, re, sys
from statistics import median
work, n, promoted, rolled, killed, ckills, prestarts, u10, uend, p10, pend, secs = sys.argv[1:13]
failures = sys.argv[13:]
total = failed = 0
for f in sorted(glob.glob(f"{work}/wrk-*.txt")):
    name = f.rsplit("/", 1)[-1][4:-4]
    runs = open(f).read().split("=== run from ")[1:]
    if not runs:
        failures.append(f"{name}: no wrk run")
    for run in runs:
        at, t = run.split("\n", 1)
        m = re.search(r"(\d+) requests in", t)
        if not m:
            failures.append(f"{name}: a wrk run from {at} gave no report: {t[-300:]}")
            continue
        total += int(m.group(1))
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
        f_bad = int(bad.group(1)) if bad else 0
        f_sock = sum(map(int, sock.groups())) if sock else 0
        failed += f_bad + f_sock
        if f_bad or f_sock:
            failures.append(f"{name}: {f_bad} non-2xx, socket errors (connect, read, write, timeout) "
                            f"{sock.groups() if sock else ()} in the 5 s from {at} (events.log has what happened then)")
grpc = {}
try:
    lines = [l for l in open(f"{work}/grpc.out") if l.startswith("{")]
    grpc = json.loads(lines[-1])
except (OSError, IndexError, ValueError) as e:
    failures.append(f"the gRPC client gave no report ({e}): {open(f'{work}/grpc.out').read()[-300:]}")
if grpc:
    if grpc["ok"] != grpc["calls"]:
        failures.append(f"gRPC calls failed: {grpc['errors']} {grpc['error_messages']}")
    if grpc["stream_errors"]:
        failures.append(f"gRPC streams broke: {grpc['stream_errors']}")
    if grpc.get("first_failures"):
        print("soak: the first gRPC failures (Unix time; events.log has the soak's own):")
        for t, what in grpc["first_failures"][:10]:
            print(f"  {t} {what}")
    if grpc.get("stuck"):
        failures.append(f"{grpc['stuck']} gRPC client threads were still in a call 10 s after the end")
trader = {}
try:
    trader = json.loads(open(f"{work}/trader.json").read())
except (OSError, ValueError) as e:
    failures.append(f"the trader gave no report ({e}): {open(f'{work}/trader.log').read()[-300:]}")
broken_versions = set(os.environ.get("BROKEN", "").split())
if trader:
    for k in ("ordersLost", "duplicateOrders", "fillsMissed", "notificationsMissed", "notificationsDuplicated", "wsAbnormal"):
        if trader.get(k):
            failures.append(f"the trader counted {k} = {trader[k]}")
    listed = trader.get("failures", [])
    ours = [f for f in listed if f.get("version") not in broken_versions]
    trader_failed = trader.get("failedRequests", 0) - (len(listed) - len(ours))
    if len(listed) >= 1000 and trader.get("failedRequests", 0) > len(listed):
        failures.append(f"the trader had {trader['failedRequests']} failed requests, too many to tell apart")
    elif trader_failed:
        failures.append(f"the trader had {trader_failed} failed requests not answered by a broken version: {ours[:5]}")
growth = lambda a, b: (int(b) - int(a)) / int(a) * 100 if int(a) > 0 else 0.0
gu, gp = growth(u10, uend), growth(p10, pend)
# One sample is a lottery: between two hot restarts the proxy climbed by a quarter, and
# samples of one run at the same point of a life moved between 6.3 and 8.7 MB (before
# its retired counters were frozen). So the medians of rollouts 10-19 and of the last
# ten are held to the same limit.
rss_file = f"{work}/rss.tsv"
curve = [l.split("\t") for l in open(rss_file) if l.strip()] if os.path.exists(rss_file) else []
mu = mp = None
if len(curve) >= 29:
    first, last = curve[9:19], curve[-10:]
    mu = growth(median([int(r[2]) for r in first]), median([int(r[2]) for r in last]))
    mp = growth(median([int(r[3]) for r in first]), median([int(r[3]) for r in last]))
# The criterion is the issue's: from the 10th rollout to the 100th (the controller is
# 5 rollouts old at both, the proxy just restarted at both). Shorter runs (CI's five
# minutes) report the growth.
if int(n) >= 100:
    if gu >= 10: failures.append(f"controller anonymous RSS grew {gu:.1f} % from rollout 10 to {n}")
    if gp >= 10: failures.append(f"proxy anonymous RSS grew {gp:.1f} % from rollout 10 to {n}")
    if mu is not None and mu >= 10: failures.append(f"controller anonymous RSS grew {mu:.1f} % by medians (rollouts 10-19 against the last ten)")
    if mp is not None and mp >= 10: failures.append(f"proxy anonymous RSS grew {mp:.1f} % by medians (rollouts 10-19 against the last ten)")
elif int(n) >= 20 and max(gu, gp, mu or 0, mp or 0) >= 10:
    print(f"soak WARNING: anonymous RSS grew {gu:.1f} % (controller) and {gp:.1f} % (proxy) from rollout 10 to {n}")
print(f"soak: {n} rollouts in {secs} s: {promoted} promoted, {rolled} broken ones rolled back; "
      f"{killed} instances SIGKILLed, {ckills} controller kills, {prestarts} proxy restarts")
print(f"soak: {total} requests through wrk, {failed} failed")
if grpc:
    print(f"soak: {grpc['calls']} gRPC calls, {grpc['calls'] - grpc['ok']} failed; {grpc['streams']} streams, "
          f"{grpc['ticks']} messages, clean ends {grpc['stream_ends']}, broken {grpc['stream_errors']}")
if os.environ.get("DISK"):
    print(f"soak: full state disk at rollout {os.environ.get('DISK_AT')}: {os.environ['DISK']}")
if trader:
    print(f"soak: exchange: {trader.get('ordersAccepted')} orders accepted of {trader.get('ordersSent')} sent, "
          f"{trader.get('ordersLost')} lost, {trader.get('duplicateOrders')} duplicated; "
          f"{trader.get('notificationsReceived')} notifications, {trader.get('notificationsMissed')} missed; "
          f"{trader.get('failedRequests')} failed requests ({trader.get('failedRequests', 0) - trader_failed} by broken versions); "
          f"feeds: {trader.get('wsReconnects')} reconnects, close codes {trader.get('wsCloseCodes')}, {trader.get('wsAbnormal')} abnormal")
if int(n) >= 20:
    print(f"soak: anonymous RSS from rollout 10 to {n}: controller {u10} → {uend} kB ({gu:+.1f} %), proxy {p10} → {pend} kB ({gp:+.1f} %)")
    if mu is not None:
        print(f"soak: anonymous RSS by medians, rollouts 10-19 against the last ten: controller {mu:+.1f} %, proxy {mp:+.1f} %")
    vu10, vuend, vp10, vpend = os.environ.get("VM", "0 0 0 0").split()
    print(f"soak: VmRSS (with the executable's pages) from rollout 10 to {n}: controller {vu10} → {vuend} kB "
          f"({growth(vu10, vuend):+.1f} %), proxy {vp10} → {vpend} kB ({growth(vp10, vpend):+.1f} %)")
else:
    print(f"soak: RSS at the end: controller {uend} kB, proxy {pend} kB (growth needs 20 rollouts or more)")
for f in failures:
    print(f"soak FAILED: {f}")
sys.exit(1 if failures else 0)
PY
keep=0
