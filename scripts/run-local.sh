#!/usr/bin/env bash
# Runs the example mesh on this machine: two ztunnels ("node-a", "node-b") on loopback, a web
# server on node-b, and a request from node-a's "sleep" workload through the mesh. Stays up
# until Ctrl-C, then cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

example=${1:-examples/two-nodes}
mesh="$example/mesh.yaml"
state=${STATE_DIR:-/tmp/ambient-mesh/run-local}
mkdir -p "$state"

echo "building ztunnel (release)..." >&2
cargo build --release --locked -q -p ztunnel
zt=target/release/ztunnel

pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped; logs are in $state" >&2
}
trap cleanup EXIT INT TERM

start_ztunnel() { # node ip
  "$zt" --node "$1" --config "$mesh" --dev-ca-dir "$state/ca" \
    --socks5 "$2:15080" --admin "$2:15000" --metrics "$2:15020" --readiness "$2:15021" \
    --outbound off --inbound-plaintext off --no-mark >"$state/ztunnel-$1.log" 2>&1 &
  pids+=($!)
}
start_ztunnel node-a 127.0.10.1
start_ztunnel node-b 127.0.10.2
python3 -m http.server --bind 127.0.10.20 8080 --directory "$example/www" >"$state/web-1.log" 2>&1 &
pids+=($!)

for ip in 127.0.10.1 127.0.10.2; do
  for _ in $(seq 1 100); do
    curl -fs "http://$ip:15021/healthz/ready" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs "http://$ip:15021/healthz/ready" >/dev/null || { echo "ztunnel at $ip did not become ready; see $state" >&2; exit 1; }
done
sleep 0.3

echo
echo "sleep (node-a) -> web.default.svc.cluster.local, through SOCKS5 on node-a's ztunnel:"
echo "  \$ curl --interface 127.0.10.10 --socks5-hostname 127.0.10.1:15080 http://web.default.svc.cluster.local/"
curl -fsS --interface 127.0.10.10 --socks5-hostname 127.0.10.1:15080 http://web.default.svc.cluster.local/
echo
echo "The mesh is up. Where to look next:"
echo "  config:      curl -s http://127.0.10.1:15000/config_dump    (node-a; node-b is 127.0.10.2)"
echo "  metrics:     curl -s http://127.0.10.2:15020/metrics | grep istio_tcp"
echo "  access logs: $state/ztunnel-node-a.log, $state/ztunnel-node-b.log"
echo "  try:         curl --interface 127.0.10.10 --socks5-hostname 127.0.10.1:15080 http://web.default.svc.cluster.local/"
echo "  edit $mesh and the ztunnels reload it; Ctrl-C stops everything."
wait -n "${pids[@]}"
