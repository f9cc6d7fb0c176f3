#!/usr/bin/env bash
# Runs the example mesh on this machine: istiod-lite reading the Kubernetes YAML in
# examples/loopback-mesh/, two ztunnels ("node-a", "node-b") on loopback following it over delta
# xDS and getting their certificates from its CA, a web server on node-b, and a request from
# node-a's "sleep" pod through the mesh. Stays up until Ctrl-C, then cleans up.
#
#   scripts/run-loopback.sh                      # the example above
#   scripts/run-loopback.sh path/to/yaml-dir     # your own mesh (pods on node-a / node-b)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

config=${1:-examples/loopback-mesh}
state=${STATE_DIR:-/tmp/ambient-mesh/run-local}
mkdir -p "$state"

echo "building istiod-lite and ztunnel (release)..." >&2
cargo build --release --locked -q -p istiod-lite -p ztunnel
ist=target/release/istiod-lite
zt=target/release/ztunnel

pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped; logs are in $state" >&2
}
trap cleanup EXIT INT TERM

wait_ready() { # url what
  for _ in $(seq 1 100); do
    curl -fs "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$2 did not become ready; see $state" >&2
  exit 1
}

"$ist" --config-dir "$config" --state-dir "$state/istiod" \
  --xds-plaintext 127.0.10.254:15010 --xds-tls 127.0.10.254:15012 --debug 127.0.10.254:15014 \
  >"$state/istiod-lite.log" 2>&1 &
pids+=($!)
wait_ready http://127.0.10.254:15014/ready istiod-lite

start_ztunnel() { # node ip
  "$ist" node-token --node "$1" --state-dir "$state/istiod" --out "$state/$1.token"
  "$zt" --node "$1" --xds-address http://127.0.10.254:15010 --token-file "$state/$1.token" \
    --socks5 "$2:15080" --admin "$2:15000" --metrics "$2:15020" --readiness "$2:15021" \
    --outbound off --inbound-plaintext off --no-mark >"$state/ztunnel-$1.log" 2>&1 &
  pids+=($!)
}
start_ztunnel node-a 127.0.10.1
start_ztunnel node-b 127.0.10.2
www="$config/www"; [[ -d $www ]] || www=examples/loopback-mesh/www
python3 -m http.server --bind 127.0.10.20 8080 --directory "$www" >"$state/web-1.log" 2>&1 &
pids+=($!)
wait_ready http://127.0.10.1:15021/healthz/ready "ztunnel node-a"
wait_ready http://127.0.10.2:15021/healthz/ready "ztunnel node-b"
sleep 0.3

echo
echo "sleep (node-a) -> web.default.svc.cluster.local, through SOCKS5 on node-a's ztunnel:"
echo "  \$ curl --interface 127.0.10.10 --socks5-hostname 127.0.10.1:15080 http://web.default.svc.cluster.local/"
curl -fsS --interface 127.0.10.10 --socks5-hostname 127.0.10.1:15080 http://web.default.svc.cluster.local/
echo
echo "The mesh is up. Where to look next:"
echo "  control plane: curl -s http://127.0.10.254:15014/debug/connections   (also /debug/config, /debug/errors)"
echo "  ztunnel:       curl -s http://127.0.10.1:15000/config_dump    (node-a; node-b is 127.0.10.2)"
echo "  metrics:       curl -s http://127.0.10.2:15020/metrics | grep istio_tcp"
echo "  logs:          $state/*.log (one access-log line per connection in the ztunnel logs)"
echo "  try:           curl --interface 127.0.10.10 --socks5-hostname 127.0.10.1:15080 http://web.default.svc.cluster.local/"
echo "  edit the YAML in $config: both ztunnels follow within a second. Ctrl-C stops everything."
wait -n "${pids[@]}"
