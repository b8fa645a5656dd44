# shellcheck shell=bash
# Shared by the proxy benchmarks (sourced): a free loopback port, and the backend every
# proxy is measured in front of.

# A free TCP port on 127.0.0.1.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# nginx answering a fixed 2-byte body on 127.0.0.1:$1, 1 worker, files under $work;
# its pid joins the caller's `pids`. With $2 = h2c it speaks HTTP/2 by prior knowledge
# only (nginx's `http2` on a cleartext listener).
start_backend() {
  local h2=""
  [ "${2:-h1}" = h2c ] && h2=" http2"
  cat >"$work/backend.conf" <<CONF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$1$h2; location / { return 200 "ok"; } } }
CONF
  nginx -c "$work/backend.conf" -p "$work" & pids+=($!)
}
