#!/usr/bin/env bash
# Control-plane scale benchmark: istiod-lite serving a large mesh to many subscribers.
#
#   bench/run.sh xds                          # 10000 pods, 2000 services, 500 policies, 50 subscribers
#   PODS=1000 SUBSCRIBERS=10 bench/run.sh xds
#
# Generates the mesh as Kubernetes YAML, starts istiod-lite (release build) on it, connects
# the subscribers (real delta ADS streams, one TCP connection each), and reports: the time for
# every subscriber to hold the whole config, the time from rewriting one pod's file to every
# subscriber having ACKed the change (p50/p99 over CHANGES changes), and istiod-lite's memory.
# Everything runs on loopback. Prints a table, then one JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."

pods=${PODS:-10000}; services=${SERVICES:-2000}; policies=${POLICIES:-500}
subs=${SUBSCRIBERS:-50}; changes=${CHANGES:-50}

echo "building release binaries..." >&2
cargo build --release --locked -q -p istiod-lite -p meshbench
ist=$PWD/target/release/istiod-lite
mb=$PWD/target/release/meshbench

work=$(mktemp -d /tmp/xdsbench.XXXXXX)
pid=
cleanup() {
  [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

counts=$("$mb" gen-mesh --dir "$work/mesh" --pods "$pods" --services "$services" --policies "$policies" --nodes 50 --namespaces 50)
want_addr=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['addresses'])" "$counts")
want_authz=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['authorizations'])" "$counts")

port=$((20000 + RANDOM % 20000))
RUST_LOG=${RUST_LOG:-warn} "$ist" --config-dir "$work/mesh" --state-dir "$work/state" \
  --xds-plaintext "127.0.0.1:$port" --xds-tls off --debug "127.0.0.1:$((port + 1))" 2>"$work/istiod.log" &
pid=$!
started=$(date +%s.%N)
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$((port + 1))/ready" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/istiod.log" >&2; exit 1; }
  sleep 0.05
done
ready=$(python3 -c "print(round($(date +%s.%N) - $started, 2))")
rss_idle=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")

out=$("$mb" xds-scale --xds "http://127.0.0.1:$port" --dir "$work/mesh" --subscribers "$subs" \
  --changes "$changes" --expect-addresses "$want_addr" --expect-authorizations "$want_authz")
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
metrics=$(curl -sf "http://127.0.0.1:$((port + 1))/metrics")
tsum=$(awk '/^istiod_translate_seconds_sum/ {print $2}' <<<"$metrics")
tcount=$(awk '/^istiod_translate_seconds_count/ {print $2}' <<<"$metrics")

python3 - "$out" "$pods" "$services" "$policies" "$ready" "$rss_idle" "$rss" "$hwm" "$tsum" "$tcount" <<'PY'
import json, sys
out = json.loads(sys.argv[1])
pods, services, policies = sys.argv[2:5]
ready = float(sys.argv[5]); idle, rss, hwm = (int(x) / 1024 for x in sys.argv[6:9])
translate_ms = 1000 * float(sys.argv[9]) / max(1, int(float(sys.argv[10])))
print(f"\nmesh: {pods} pods, {services} services, {policies} policies; {out['subscribers']} subscribers")
print(f"{'istiod-lite start to ready (s)':44} {ready:>8.2f}")
print(f"{'full initial push to all subscribers (ms)':44} {out['full_push_ms']:>8.1f}")
a = out['change_to_all_acked_ms']; e = out['change_to_each_ack_ms']
print(f"{'one pod change -> all subscribers ACKed (ms)':44} p50 {a['p50']:.1f}  p99 {a['p99']:.1f}")
print(f"{'one pod change -> each subscriber ACK (ms)':44} p50 {e['p50']:.1f}  p99 {e['p99']:.1f}")
print(f"{'mean snapshot rebuild per change (ms)':44} {translate_ms:>8.1f}")
print(f"{'istiod-lite RSS idle / after / peak (MB)':44} {idle:.1f} / {rss:.1f} / {hwm:.1f}")
out.update({"ready_s": ready, "rebuild_ms": round(translate_ms, 1),
            "rss_mb": {"idle": round(idle, 1), "after": round(rss, 1), "peak": round(hwm, 1)}})
print(json.dumps(out))
PY
