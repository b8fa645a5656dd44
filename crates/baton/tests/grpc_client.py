"""A gRPC load for the gRPC example (grpcio, the reference client): unary SayHello
calls from several channels and Watch streams held open, until stdin closes. Prints
one JSON line of what it saw. Protobuf by hand (three small messages): no generated
code, so grpcio alone is needed.

usage: grpc_client.py HOST:PORT [CALLERS] [WATCHERS]
"""

import json
import sys
import threading
import time
from collections import Counter

import grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf, i):
    """The varint at buf[i:] and the index after it."""
    val, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        val |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return val, i


def fields(buf):
    """Field number -> value (varints as int, length-delimited as bytes)."""
    out, i = {}, 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wire = key >> 3, key & 7
        val, i = read_varint(buf, i)
        if wire == 2:
            out[num] = buf[i:i + val]
            i += val
        else:
            out[num] = val
    return out


stop = threading.Event()
lock = threading.Lock()
seen = {
    "calls": 0, "ok": 0, "errors": Counter(), "error_messages": Counter(),
    "versions": Counter(), "streams": 0, "ticks": 0, "tick_versions": Counter(),
    "stream_ends": Counter(), "stream_errors": Counter(),
    # When the first failures happened (Unix seconds), to line them up with events.
    "first_failures": [],
}


def failed_at(what):
    """Called with the lock held."""
    if len(seen["first_failures"]) < 50:
        seen["first_failures"].append([round(time.time(), 3), what])


def caller(target):
    channel = grpc.insecure_channel(target)
    call = channel.unary_unary("/baton.example.Greeter/SayHello")
    req = b"\x0a" + varint(4) + b"test"
    while not stop.is_set():
        try:
            reply = fields(call(req, timeout=5))
            with lock:
                seen["calls"] += 1
                seen["ok"] += 1
                seen["versions"][reply.get(2, b"").decode()] += 1
        except grpc.RpcError as e:
            with lock:
                seen["calls"] += 1
                seen["errors"][e.code().name] += 1
                seen["error_messages"][e.details() or ""] += 1
                failed_at(f"call {e.code().name}: {e.details()}")
    channel.close()


def watcher(target):
    channel = grpc.insecure_channel(target)
    watch = channel.unary_stream("/baton.example.Greeter/Watch")
    req = b"\x08" + varint(50)
    while not stop.is_set():
        stream = watch(req)
        with lock:
            seen["streams"] += 1
        try:
            for tick in stream:
                t = fields(tick)
                with lock:
                    seen["ticks"] += 1
                    seen["tick_versions"][t.get(2, b"").decode()] += 1
                if stop.is_set():
                    stream.cancel()
                    break
        except grpc.RpcError as e:
            code = e.code().name
            with lock:
                if code == "CANCELLED" and stop.is_set():
                    pass
                elif code == "UNAVAILABLE" and "draining" in (e.details() or ""):
                    # The instance's clean end when it drains: reconnect.
                    seen["stream_ends"]["instance draining"] += 1
                elif code == "UNAVAILABLE" and "restarting" in (e.details() or ""):
                    # The proxy's clean end when it restarts: reconnect.
                    seen["stream_ends"]["proxy restarting"] += 1
                else:
                    seen["stream_errors"][f"{code}: {e.details()}"] += 1
                    failed_at(f"stream {code}: {e.details()}")
    channel.close()


def main():
    target = sys.argv[1]
    callers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    watchers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    threads = [threading.Thread(target=caller, args=(target,), daemon=True) for _ in range(callers)]
    threads += [threading.Thread(target=watcher, args=(target,), daemon=True) for _ in range(watchers)]
    for t in threads:
        t.start()
    print("started", flush=True)
    sys.stdin.read()
    stop.set()
    # One deadline for all: a thread still in a call after it is counted, not waited on.
    deadline = time.monotonic() + 10
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    with lock:
        seen["stuck"] = sum(t.is_alive() for t in threads)
        print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    main()
