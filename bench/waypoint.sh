#!/usr/bin/env bash
# The waypoint hop: latency, and the waypoint's CPU and memory per 1,000 requests/s, against
# no mesh and ztunnel only, in one run. As root:
#
#   bench/run.sh waypoint
#   RPS=1000 SECONDS_PER_TEST=20 ROUNDS=2 bench/run.sh waypoint
#
# `ambient up` runs bench/waypoint-mesh (release binaries): the same client → server pair in
# `plain` (not in the mesh), `l4` (two ztunnels) and `l7` (two ztunnels and a waypoint). From
# each client pod, `meshbench http-rate` sends HTTP/1.1 GETs at a fixed rate over keep-alive
# connections. The waypoint's CPU time (from /proc) over the l7 run gives vCPU per 1,000 rps;
# its RSS is read at the end of that run. Both ztunnels' CPU (together) is shown for every
# variant, for comparison. Prints a table, then one JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."

rps=${RPS:-1000}
secs=${SECONDS_PER_TEST:-10}
rounds=${ROUNDS:-1}
conns=${CONNECTIONS:-8}
[[ $(id -u) -eq 0 ]] || { echo "bench/run.sh waypoint needs root (network namespaces)" >&2; exit 1; }

scripts/setup.sh
echo "building release binaries..." >&2
cargo build --release --locked -q -p ambient -p ztunnel -p istiod-lite -p waypoint -p meshbench
bin=$PWD/target/release
work=$(mktemp -d /tmp/waypointbench.XXXXXX)
export AMBIENT_STATE_DIR=$work/state AMBIENT_BIN_DIR=$bin
cleanup() {
  "$bin/ambient" down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

"$bin/ambient" down >/dev/null 2>&1 || true
mkdir -p "$work/mesh"
cp bench/waypoint-mesh/*.yaml "$work/mesh/"
RUST_LOG=warn "$bin/ambient" up "$work/mesh" --detach >&2

pid_of() { # role prefix (waypoint, ztunnel/node-a …): exactly one process
  python3 - "$AMBIENT_STATE_DIR/state.json" "$1" <<'PY'
import json, sys
procs = json.load(open(sys.argv[1])).get("processes", {})
pids = [pid for role, pid in procs.items() if role.startswith(sys.argv[2])]
if len(pids) != 1:
    sys.exit("expected one %s process in state.json, found %s" % (sys.argv[2], procs))
print(pids[0])
PY
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
tck=$(getconf CLK_TCK)

# Warm up each path (connections, certificates, pools), and prove each works.
run() { # variant target host seconds rps
  ip netns exec "amb-p-$1.client" "$bin/meshbench" http-rate --target "$2" --host "$3" \
    --rps "$5" --seconds "$4" --connections "$conns" 2>/dev/null | tail -1
}
# variant, target, Host
variants=("plain 198.18.2.10:8080 server" "l4 198.18.100.11:80 server.l4.svc.cluster.local"
          "l7 198.18.100.12:80 server.l7.svc.cluster.local")
for v in "${variants[@]}"; do
  set -- $v
  run "$1" "$2" "$3" 2 200 >/dev/null || { echo "warm-up of $1 failed" >&2; exit 1; }
done

wp=$(pid_of waypoint)
za=$(pid_of ztunnel/node-a)
zb=$(pid_of ztunnel/node-b)
results=()
for ((r = 1; r <= rounds; r++)); do
  for v in "${variants[@]}"; do
    set -- $v
    t0=$(cpu_ticks "$wp")
    z0=$(( $(cpu_ticks "$za") + $(cpu_ticks "$zb") ))
    out=$(run "$1" "$2" "$3" "$secs" "$rps")
    t1=$(cpu_ticks "$wp")
    z1=$(( $(cpu_ticks "$za") + $(cpu_ticks "$zb") ))
    rss=$(rss_kb "$wp")
    results+=("$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
r.update(variant=sys.argv[2], round=int(sys.argv[3]),
         waypoint_cpu_s=(int(sys.argv[5]) - int(sys.argv[4])) / int(sys.argv[6]),
         waypoint_rss_kb=int(sys.argv[7]),
         ztunnels_cpu_s=(int(sys.argv[9]) - int(sys.argv[8])) / int(sys.argv[6]))
print(json.dumps(r))' "$out" "$1" "$r" "$t0" "$t1" "$tck" "$rss" "$z0" "$z1")")
  done
done

printf '%s\n' "${results[@]}" > "$work/results.jsonl"
python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("%-8s %5s %8s %8s %8s %8s %22s %25s %16s" % ("variant", "round", "rps", "p50 us",
      "p90 us", "p99 us", "ztunnels vCPU per 1k", "waypoint vCPU per 1k rps", "waypoint RSS MB"))
summary = {}
for r in rows:
    l7 = r["variant"] == "l7"
    per_1k = r["elapsed"] * (r["rps"] / 1000)
    vcpu = r["waypoint_cpu_s"] / per_1k if l7 else None
    zvcpu = r["ztunnels_cpu_s"] / per_1k
    extra = ("%25.3f %16.1f" % (vcpu, r["waypoint_rss_kb"] / 1024)) if l7 else "%25s %16s" % ("-", "-")
    print("%-8s %5d %8s %8s %8s %8s %22.3f %s" % (r["variant"], r["round"], r["rps"],
          r["p50_us"], r["p90_us"], r["p99_us"], zvcpu, extra))
    row = {k: r[k] for k in ("rps", "p50_us", "p90_us", "p99_us")}
    row["ztunnels_vcpu_per_1k_rps"] = round(zvcpu, 4)
    if l7:
        row.update(waypoint_vcpu_per_1k_rps=round(vcpu, 4),
                   waypoint_rss_mb=round(r["waypoint_rss_kb"] / 1024, 1))
    summary.setdefault(r["variant"], []).append(row)
print(json.dumps({"bench": "waypoint", "rps_target": rows[0]["rps_target"],
                  "seconds": rows[0]["seconds"], "results": summary}))
PY
