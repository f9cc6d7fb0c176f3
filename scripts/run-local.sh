#!/usr/bin/env bash
# Runs the example mesh on this machine: `ambient up examples/local-mesh` builds a network
# namespace per node and per pod, starts istiod-lite, a ztunnel per node capturing its pods'
# traffic in-pod, and the pods' echo apps; it stays in the foreground until Ctrl-C, then takes
# everything apart.
#
#   scripts/run-local.sh                      # the example
#   scripts/run-local.sh examples/waypoint-mesh   # services behind a waypoint (L7 routes, policies)
#   scripts/run-local.sh path/to/yaml-dir     # your own mesh
#   scripts/run-local.sh --detach             # in the background; `target/release/ambient down`
#
# Needs root (network namespaces, nftables). Without root it says so and runs the loopback
# variant instead (scripts/run-loopback.sh: loopback addresses, SOCKS5 capture).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "run-local: not root, so no network namespaces; running the loopback variant (SOCKS5 capture) instead" >&2
  exec scripts/run-loopback.sh
fi
scripts/setup.sh

dir=examples/local-mesh
args=()
for a in "$@"; do
  case $a in
    -d|--detach) args+=(--detach) ;;
    *) dir=$a ;;
  esac
done

echo "building ambient, istiod-lite, ztunnel and waypoint (release)..." >&2
cargo build --release --locked -q -p ambient -p istiod-lite -p ztunnel -p waypoint
exec target/release/ambient up "$dir" "${args[@]}"
