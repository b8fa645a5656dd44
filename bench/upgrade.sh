#!/usr/bin/env bash
# An upgrade of the proxy from an earlier build of ours to this one, as
# `baton restart-proxy` does it (the new binary's `baton proxy --takeover`), under wrk:
# what the counters and the fine latency histogram look like on the other side.
# Usage: BATON_PREV=path/to/earlier/baton bench/upgrade.sh
#   BATON_NEW=path/to/baton   the build upgraded to (default: target/release/baton, built)
# Checks (exit 1 if one fails): no request fails across the takeover; the earlier
# build's counters arrive (requests before >= what wrk counted); the fine buckets arrive
# whole when the earlier build had them in this layout and are left empty otherwise;
# a window that begins after the upgrade reads complete fine buckets (so judges use
# them at once); and how many requests the old process finished after handing its
# counters over and were counted by neither process (0 from a build that sends them).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BATON_PREV:?BATON_PREV=path to the earlier build of baton}"
for tool in wrk nginx python3; do
  command -v $tool >/dev/null || { echo "needs $tool: apt-get install wrk nginx-light python3" >&2; exit 1; }
done
if [ -z "${BATON_NEW:-}" ]; then
  cargo build --release -p baton >/dev/null 2>&1
  BATON_NEW=./target/release/baton
fi
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill $p 2>/dev/null || true; done; rm -rf "$work"' EXIT
# shellcheck source=bench/lib.sh
. bench/lib.sh
backend=$(port); listen=$(port)
start_backend "$backend"
cp "$BATON_PREV" "$work/baton-prev"
"$work/baton-prev" proxy --control-socket "$work/proxy.sock" >"$work/prev.log" 2>&1 & pids+=($!)
old=$!
for _ in $(seq 100); do [ -S "$work/proxy.sock" ] && break; sleep 0.05; done

python3 - "$work" "$listen" "$backend" "$BATON_NEW" "$old" <<'PY'
import json, os, re, socket, subprocess, sys, time
work, listen, backend, new_bin, old_pid = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
sock = f"{work}/proxy.sock"
FINE = 800  # this build's fine buckets (baton_proxy_api::metrics::FINE_BUCKETS)

def ask(req):
    s = socket.socket(socket.AF_UNIX); s.connect(sock)
    s.sendall((json.dumps(req) + "\n").encode())
    line = s.makefile().readline(); s.close()
    return json.loads(line)

def stats():
    return ask({"op": "stats"})["stats"]["bench"]["r1"]

def wrk(secs):
    out = subprocess.run(["wrk", "-t2", "-c16", f"-d{secs}s", f"http://127.0.0.1:{listen}/"],
                         capture_output=True, text=True, check=True).stdout
    n = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(bad.group(1)) if bad else 0) + (sum(map(int, errs.groups())) if errs else 0)
    return n, failed

def requests(s): return sum(s["classes"])
def fine(s): return sum(s.get("fine", []))
def classic(s): return sum(s["buckets"])

table = {"version": 1, "services": [{"name": "bench", "listen": f"127.0.0.1:{listen}",
         "revisions": [{"name": "r1", "weight": 100, "backends": [f"127.0.0.1:{backend}"]}]}]}
assert ask({"op": "setTable", "table": table})["reply"] == "ack"
problems = []

n1, f1 = wrk(2)
before = stats()
prev_fine = len(before.get("fine", []))
print(f"earlier build: {requests(before)} requests counted, wrk {n1} ({f1} failed); "
      f"fine buckets: {prev_fine or 'none'}")

# The takeover under load, as `baton restart-proxy` starts it.
load = subprocess.Popen(["wrk", "-t2", "-c16", "-d4s", f"http://127.0.0.1:{listen}/"],
                        stdout=subprocess.PIPE, text=True)
time.sleep(1)
log = open(f"{work}/new.log", "w")
new = subprocess.Popen([new_bin, "proxy", "--control-socket", sock, "--takeover"],
                       stdout=log, stderr=log, start_new_session=True)
deadline = time.time() + 15
while time.time() < deadline:
    try:
        if ask({"op": "ping"})["pid"] != old_pid: break
    except OSError: pass
    time.sleep(0.05)
else:
    sys.exit("the new proxy did not take over within 15 s")
while time.time() < deadline:
    try: os.kill(old_pid, 0)
    except ProcessLookupError: break
    try:
        if open(f"/proc/{old_pid}/stat").read().split()[2] == "Z": break
    except OSError: break
    time.sleep(0.05)
else:
    problems.append("the old proxy did not exit within 15 s")
out = load.communicate()[0]
n2 = int(re.search(r"(\d+) requests in", out).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
f2 = (int(bad.group(1)) if bad else 0) + (sum(map(int, errs.groups())) if errs else 0)
# The old process sends what it finished while draining once drained (this build and
# later): wait a moment for it to land.
deadline = time.time() + 3
after = stats()
while requests(after) < n1 + n2 and time.time() < deadline:
    time.sleep(0.1)
    after = stats()
lost = n1 + n2 - requests(after)
# wrk leaves out the requests still open when it stops (up to one per connection, 16),
# so a few more counted than wrk says is exact; fewer means uncounted answers.
print(f"across the takeover: wrk {n2} requests ({f2} failed); the new build counts "
      f"{requests(after)} against wrk's {n1 + n2} "
      f"({max(lost, 0)} uncounted; {max(-lost, 0)} more than wrk, its open requests at its stops)")
if f1 or f2: problems.append(f"{f1 + f2} requests failed")
if requests(after) < requests(before): problems.append("counters went back")
if prev_fine == FINE:
    ok = abs(fine(after) - classic(after)) <= max(classic(after) // 100, 2)
    print(f"fine buckets carried whole: {fine(after)} of {classic(after)} latencies")
    if not ok: problems.append("fine buckets not carried whole")
else:
    print(f"fine buckets of the earlier build ({prev_fine or 'none'}) not carried; "
          f"this build counted {fine(after)} latencies in its own since the takeover")
    if fine(after) > n2: problems.append("fine buckets hold more than came after the takeover")

n3, f3 = wrk(2)
last = stats()
w_fine = fine(last) - fine(after)
w_classic = classic(last) - classic(after)
print(f"a window after the upgrade: wrk {n3} ({f3} failed), {w_classic} latencies, "
      f"{w_fine} in fine buckets")
if f3: problems.append(f"{f3} requests failed after the upgrade")
# wrk stops counting with requests still open: up to one per connection more.
if not n3 <= w_classic <= n3 + 16 or abs(w_fine - w_classic) > max(w_classic // 100, 2):
    problems.append("a window after the upgrade does not read complete fine buckets")
ask({"op": "shutdown"})
new.wait(timeout=15)
if problems:
    sys.exit("FAILED: " + "; ".join(problems))
print("ok")
PY
