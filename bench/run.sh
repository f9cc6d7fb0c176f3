#!/usr/bin/env bash
# Whole-system benchmark: direct TCP versus TCP through two ztunnels over HBONE, in one run.
#
#   bench/run.sh hbone            # as root: two network namespaces joined by a veth pair
#   SECONDS_PER_TEST=10 bench/run.sh hbone
#   ZTUNNEL_ARGS="--worker-threads 1" bench/run.sh hbone
#   ZTUNNEL_BIN=/path/to/other/ztunnel bench/run.sh hbone   # compare two builds
#   bench/run.sh xds              # control plane at scale: see bench/xds.sh
#   bench/run.sh policy           # L4 authorization cost (as root): see bench/policy.sh
#   bench/run.sh waypoint         # the waypoint hop (as root): see bench/waypoint.sh
#
# As root, a client "node" and a server "node" are network namespaces joined by a veth pair
# (198.18.1.1 and 198.18.1.2); the client's traffic to port 5201 is redirected by nftables into
# ztunnel A (transparent capture), port 5202 is the no-mesh baseline to the same server.
# Without root it falls back to loopback and SOCKS5. Prints a table, then one JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-hbone}
[[ $what == xds ]] && exec bench/xds.sh
[[ $what == policy ]] && exec bench/policy.sh
[[ $what == waypoint ]] && exec bench/waypoint.sh
[[ $what == hbone ]] || { echo "usage: bench/run.sh hbone|xds|policy|waypoint" >&2; exit 2; }
secs=${SECONDS_PER_TEST:-5}
rate_secs=${RATE_SECONDS:-10}

scripts/setup.sh
echo "building release binaries..." >&2
cargo build --release --locked -q -p ztunnel -p meshbench
zt=${ZTUNNEL_BIN:-$PWD/target/release/ztunnel}
mb=$PWD/target/release/meshbench

work=$(mktemp -d /tmp/meshbench.XXXXXX)
pids=()
root=0; [[ $(id -u) -eq 0 ]] && root=1
tag=mb$$
cli_ns=${tag}c; srv_ns=${tag}s

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if ((root)); then
    ip netns del "$cli_ns" 2>/dev/null || true
    ip netns del "$srv_ns" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

if ((root)); then
  mode="netns+veth, nftables capture"
  cli_ip=198.18.1.1; srv_ip=198.18.1.2
  ip netns add "$cli_ns"; ip netns add "$srv_ns"
  ip link add "${tag}a" netns "$cli_ns" type veth peer name "${tag}b" netns "$srv_ns"
  ip -n "$cli_ns" addr add "$cli_ip/24" dev "${tag}a"
  ip -n "$srv_ns" addr add "$srv_ip/24" dev "${tag}b"
  for ns in "$cli_ns" "$srv_ns"; do ip -n "$ns" link set lo up; done
  ip -n "$cli_ns" link set "${tag}a" up; ip -n "$srv_ns" link set "${tag}b" up
  # The connection-rate test closes tens of thousands of connections; let TIME_WAIT ports be
  # reused so it measures the proxies, not port exhaustion.
  for ns in "$cli_ns" "$srv_ns"; do ip netns exec "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1; done
  ip netns exec "$cli_ns" nft -f - <<NFT
table ip mesh {
  chain output {
    type nat hook output priority -100; policy accept;
    meta mark 0x539 return
    tcp dport 5201 redirect to :15001
  }
}
NFT
  in_cli=(ip netns exec "$cli_ns"); in_srv=(ip netns exec "$srv_ns")
  admin_a=127.0.0.1; admin_b=127.0.0.1
  via=()
else
  mode="loopback, SOCKS5 (not root)"
  cli_ip=127.0.11.10; srv_ip=127.0.11.20
  in_cli=(); in_srv=()
  admin_a=127.0.11.1; admin_b=127.0.11.2
  via=(--socks "$admin_a:15080" --src "$cli_ip")
fi

cat >"$work/mesh.yaml" <<YAML
workloads:
  - {name: client, serviceAccount: client, node: node-a, addresses: [$cli_ip]}
  - {name: server, serviceAccount: server, node: node-b, addresses: [$srv_ip]}
YAML

start_zt() { # node admin-ip netns-prefix...
  local node=$1 ip=$2; shift 2
  "$@" "$zt" --node "$node" --config "$work/mesh.yaml" --dev-ca-dir "$work/ca" \
    --admin "$ip:15000" --metrics "$ip:15020" --readiness "$ip:15021" --socks5 "$ip:15080" \
    ${ZTUNNEL_ARGS:-} >"$work/$node.log" 2>&1 &
  pids+=($!)
}
start_zt node-a "$admin_a" "${in_cli[@]}"; zt_a=$!
start_zt node-b "$admin_b" "${in_srv[@]}"; zt_b=$!
"${in_srv[@]}" "$mb" server --listen "$srv_ip:5201" --listen "$srv_ip:5202" >"$work/server.log" 2>&1 &
pids+=($!)

wait_ready() { # admin-ip netns-prefix...
  local ip=$1; shift
  for _ in $(seq 1 100); do
    "$@" curl -fs "http://$ip:15021/healthz/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "ztunnel at $ip never became ready" >&2; cat "$work"/*.log >&2; exit 1
}
wait_ready "$admin_a" "${in_cli[@]}"
wait_ready "$admin_b" "${in_srv[@]}"
sleep 0.5

# ztunnel's real pid (ip netns exec execs, so $! is already the process itself).
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
idle_a=$(rss_kib "$zt_a"); idle_b=$(rss_kib "$zt_b")

client() { "${in_cli[@]}" "$mb" "$@" | tail -n 1; }
jq_num() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

# Each test runs against the baseline port then the meshed port, back to back.
declare -A R
peak_a=$idle_a; peak_b=$idle_b
sample_peak() {
  local a b; a=$(rss_kib "$zt_a"); b=$(rss_kib "$zt_b")
  ((a > peak_a)) && peak_a=$a; ((b > peak_b)) && peak_b=$b; return 0
}
for path in direct mesh; do
  if [[ $path == direct ]]; then target="$srv_ip:5202"; v=(); else target="$srv_ip:5201"; v=("${via[@]}"); fi
  # Warm-up: certificates and the pooled connection.
  client latency --target "$target" --seconds 1 "${v[@]}" >/dev/null
  echo "[$path] throughput, 1 stream" >&2
  R[$path.tp1]=$(jq_num "$(client throughput --target "$target" --streams 1 --seconds "$secs" "${v[@]}")" gbps)
  echo "[$path] throughput, 8 streams" >&2
  out=$(client throughput --target "$target" --streams 8 --seconds "$secs" "${v[@]}")
  R[$path.tp8]=$(jq_num "$out" gbps)
  sample_peak
  echo "[$path] latency, 1 KiB request/response" >&2
  out=$(client latency --target "$target" --size 1024 --seconds "$secs" "${v[@]}")
  R[$path.p50]=$(jq_num "$out" p50_us); R[$path.p99]=$(jq_num "$out" p99_us)
  echo "[$path] new connections" >&2
  R[$path.cps]=$(jq_num "$(client connrate --target "$target" --concurrency 8 --seconds "$secs" "${v[@]}")" cps)
  echo "[$path] 1000 requests/s of 1 KiB for ${rate_secs}s" >&2
  a0=$(cpu_ticks "$zt_a"); b0=$(cpu_ticks "$zt_b"); t0=$(date +%s.%N)
  out=$(client rate --target "$target" --rps 1000 --size 1024 --connections 10 --seconds "$rate_secs" "${v[@]}")
  a1=$(cpu_ticks "$zt_a"); b1=$(cpu_ticks "$zt_b"); t1=$(date +%s.%N)
  sample_peak
  R[$path.rps]=$(jq_num "$out" rps)
  R[$path.cpu_a]=$(python3 -c "print(round(($a1-$a0)/$hz/($t1-$t0), 4))")
  R[$path.cpu_b]=$(python3 -c "print(round(($b1-$b0)/$hz/($t1-$t0), 4))")
done
sample_peak

python3 - "$mode" "$secs" "$rate_secs" "$idle_a" "$idle_b" "$peak_a" "$peak_b" "${ZTUNNEL_ARGS:-}" <<PY
import json, sys
mode, secs, rate_secs, idle_a, idle_b, peak_a, peak_b, ztargs = sys.argv[1:]
r = {k: float(v) for k, v in {
$(for k in "${!R[@]}"; do printf '    "%s": "%s",\n' "$k" "${R[$k]}"; done)
}.items()}
d, m = (lambda k: r["direct." + k]), (lambda k: r["mesh." + k])
rows = [
  ("throughput, 1 stream (Gbit/s)", d("tp1"), m("tp1"), f"{100*m('tp1')/d('tp1'):.0f}% of direct"),
  ("throughput, 8 streams (Gbit/s)", d("tp8"), m("tp8"), f"{100*m('tp8')/d('tp8'):.0f}% of direct"),
  ("1 KiB round trip p50 (us)", d("p50"), m("p50"), f"+{m('p50')-d('p50'):.0f} us"),
  ("1 KiB round trip p99 (us)", d("p99"), m("p99"), f"+{m('p99')-d('p99'):.0f} us"),
  ("new connections / s", d("cps"), m("cps"), f"{100*m('cps')/d('cps'):.0f}% of direct"),
  ("requests/s achieved at 1000/s", d("rps"), m("rps"), ""),
]
print(f"\nmode: {mode}; {secs}s per test, {rate_secs}s at 1000 req/s; ztunnel args: {ztargs or '(none)'}")
print(f"{'':34} {'direct':>10} {'mesh':>10}   ")
for name, a, b, note in rows:
    print(f"{name:34} {a:>10.1f} {b:>10.1f}   {note}")
print(f"{'ztunnel CPU at 1000 req/s (vCPU)':34} {'A':>10} {'B':>10}")
print(f"{'':34} {m('cpu_a'):>10.3f} {m('cpu_b'):>10.3f}")
print(f"{'ztunnel RSS idle / peak (MB)':34} {int(idle_a)/1024:>5.1f}/{int(peak_a)/1024:<4.1f} {int(idle_b)/1024:>5.1f}/{int(peak_b)/1024:<4.1f}")
out = {
  "mode": mode,
  "ztunnel_args": ztargs,
  "direct": {"gbps_1": d("tp1"), "gbps_8": d("tp8"), "rr_p50_us": d("p50"), "rr_p99_us": d("p99"), "conns_per_sec": d("cps")},
  "mesh": {"gbps_1": m("tp1"), "gbps_8": m("tp8"), "rr_p50_us": m("p50"), "rr_p99_us": m("p99"), "conns_per_sec": m("cps")},
  "added_p50_us": round(m("p50") - d("p50"), 1),
  "added_p99_us": round(m("p99") - d("p99"), 1),
  "ztunnel_vcpu_at_1000rps": {"a": m("cpu_a"), "b": m("cpu_b")},
  "ztunnel_rss_mb": {"idle": [round(int(idle_a)/1024, 1), round(int(idle_b)/1024, 1)],
                     "peak": [round(int(peak_a)/1024, 1), round(int(peak_b)/1024, 1)]},
}
print(json.dumps(out))
PY
