#!/usr/bin/env bash
# L4 authorization cost: new connections per second through two ztunnels with no policies and
# with many AuthorizationPolicies in the mesh, next to the no-mesh baseline, in one run.
#
#   bench/run.sh policy                          # as root; 10 s per variant, 2 rounds
#   RATE_SECONDS=5 ROUNDS=3 CONCURRENCY=16 bench/run.sh policy
#   POLICIES=1000 APPLYING=10 ZTUNNEL_ARGS="--worker-threads 1" bench/run.sh policy
#   ISTIOD_NICE=0 ISTIOD_LOG=info bench/run.sh policy    # istiod-lite's priority and log level
#
# A client "node" and a server "node" are network namespaces joined by a veth pair (198.19.0.1
# and 198.19.0.2). istiod-lite runs in the server's namespace on generated Kubernetes YAML
# (`meshbench gen-policy-mesh`: the client and server pods in namespace "bench", 20 other pods
# there, a 500-pod background mesh in 50 other namespaces); both ztunnels follow it over xDS and
# take their certificates from it. The client's traffic to port 5201 is redirected by nftables
# into ztunnel A; port 5202 is the direct baseline to the same server.
#
# Variants (policies swapped into the watched directory; each measured only once both
# ztunnels' /config_dump hold exactly its policies, and the server workload lists the ones that
# select it):
#   direct            plain TCP, no mesh
#   none              mesh, 0 policies
#   other-ns          mesh, POLICIES policies in the other namespaces (1 in 10 namespace-wide)
#   same-ns           mesh, POLICIES policies in the server's namespace selecting other pods
#   applying          mesh, APPLYING ALLOW policies selecting the server, each allowing the client
#                     (principal, namespace, port) after a first rule that does not match
#   same-ns+applying  mesh, both
# Each round runs every variant, for RATE_SECONDS after a 1 s warm-up; rounds alternate the
# order. A test is "connect, 1-byte request, 1-byte response, close", CONCURRENCY at a time;
# any failed connection fails the run. First, a "deny" check swaps in APPLYING policies that do
# not allow the client and requires every connection to be refused, so a run whose policies
# are not enforced cannot pass. Prints a table, then one JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${RATE_SECONDS:-10}; rounds=${ROUNDS:-2}; conc=${CONCURRENCY:-8}
policies=${POLICIES:-1000}; applying=${APPLYING:-10}
istiod_nice=${ISTIOD_NICE:-19}
for v in secs rounds conc policies applying; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "policy bench: ${v} must be a whole number, got ${!v}" >&2; exit 2; }
done
[[ $istiod_nice =~ ^-?[0-9]+$ ]] || { echo "policy bench: ISTIOD_NICE must be a nice value, got $istiod_nice" >&2; exit 2; }
((secs >= 1 && secs <= 600 && rounds >= 1 && rounds <= 20 && conc >= 1 && conc <= 256)) || {
  echo "policy bench: need 1 <= RATE_SECONDS <= 600, 1 <= ROUNDS <= 20, 1 <= CONCURRENCY <= 256" >&2
  exit 2
}
if [[ $(id -u) -ne 0 ]]; then
  echo "policy bench: needs root (network namespaces, veth, nftables); run it as root" >&2
  exit 1
fi

scripts/setup.sh
echo "building release binaries..." >&2
cargo build --release --locked -q -p ztunnel -p istiod-lite -p meshbench
zt=$PWD/target/release/ztunnel
ist=$PWD/target/release/istiod-lite
mb=$PWD/target/release/meshbench

work=$(mktemp -d /tmp/policybench.XXXXXX)
pids=()
tag=mbp$$
cli_ns=${tag}c; srv_ns=${tag}s
failed=
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$cli_ns" 2>/dev/null || true
  ip netns del "$srv_ns" 2>/dev/null || true
  if [[ -n $failed ]]; then
    # The logs' ends outlive a failed run (whole logs run to hundreds of MB).
    local keep=/tmp/policybench-failed.$$ f
    mkdir -p "$keep"
    for f in "$work"/*.log "$work"/*.json; do [[ -e $f ]] && tail -n 5000 "$f" >"$keep/${f##*/}"; done
    echo "policy bench: logs kept in $keep" >&2
  fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

cli_ip=198.19.0.1; srv_ip=198.19.0.2
ip netns add "$cli_ns"; ip netns add "$srv_ns"
ip link add "${tag}a" netns "$cli_ns" type veth peer name "${tag}b" netns "$srv_ns"
ip -n "$cli_ns" addr add "$cli_ip/24" dev "${tag}a"
ip -n "$srv_ns" addr add "$srv_ip/24" dev "${tag}b"
for ns in "$cli_ns" "$srv_ns"; do
  ip -n "$ns" link set lo up
  # Tens of thousands of short connections per variant: reuse TIME_WAIT ports and widen the
  # ephemeral range, so the test measures the proxies, not port exhaustion.
  ip netns exec "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="10000 65000"
done
ip -n "$cli_ns" link set "${tag}a" up; ip -n "$srv_ns" link set "${tag}b" up
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

gen=$("$mb" gen-policy-mesh --dir "$work/gen" --client-ip "$cli_ip" --server-ip "$srv_ip" \
  --port 5201 --policies "$policies" --applying "$applying")
echo "$gen" >"$work/variants.json"
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$work/variants.json" "$1"; }
mesh_dir=$(field mesh_dir); policy_file=$(field policy_file); server_uid=$(field server_uid)

fail() { # message: show the logs' tails and stop
  failed=1
  echo "policy bench: $1" >&2
  for f in "$work"/*.log; do echo "--- $f (last 5 lines)" >&2; tail -n 5 "$f" >&2; done
  exit 1
}

# istiod-lite runs at the lowest priority: it is not on the data path, and its directory
# watcher rescans without pause (each scan opens the watched directory, which is itself an
# inotify event), taking ~0.8 of a core from the proxies at normal priority.
RUST_LOG=${ISTIOD_LOG:-warn} "${in_srv[@]}" nice -n "$istiod_nice" "$ist" --config-dir "$mesh_dir" \
  --state-dir "$work/istiod" --xds-plaintext "$srv_ip:15010" --xds-tls off \
  --debug 127.0.0.1:15014 >"$work/istiod.log" 2>&1 &
pids+=($!); ist_pid=$!
wait_url() { # url what netns-prefix...
  local url=$1 what=$2; shift 2
  for _ in $(seq 1 300); do
    "$@" curl -fs "$url" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "$what did not become ready within 30 s"
}
wait_url http://127.0.0.1:15014/ready istiod-lite "${in_srv[@]}"

start_zt() { # node netns-prefix...
  local node=$1; shift
  "$ist" node-token --node "$node" --state-dir "$work/istiod" --out "$work/$node.token"
  "$@" "$zt" --node "$node" --xds-address "http://$srv_ip:15010" --token-file "$work/$node.token" \
    --admin 127.0.0.1:15000 --metrics 127.0.0.1:15020 --readiness 127.0.0.1:15021 --socks5 off \
    ${ZTUNNEL_ARGS:-} >"$work/$node.log" 2>&1 &
  pids+=($!)
}
start_zt node-a "${in_cli[@]}"; zt_a=$!
start_zt node-b "${in_srv[@]}"; zt_b=$!
"${in_srv[@]}" "$mb" server --listen "$srv_ip:5201" --listen "$srv_ip:5202" >"$work/server.log" 2>&1 &
pids+=($!)
wait_url http://127.0.0.1:15021/healthz/ready "ztunnel node-a" "${in_cli[@]}"
wait_url http://127.0.0.1:15021/healthz/ready "ztunnel node-b" "${in_srv[@]}"

variant_file() { # name
  python3 -c "import json,sys; print(next(v['file'] for v in json.load(open(sys.argv[1]))['variants'] if v['name'] == sys.argv[2]))" "$work/variants.json" "$1"
}

# Whether both ztunnels hold exactly the policies of a variant file, and the server workload
# lists those that select it.
holds_variant() { # file
  local ns
  for ns in "$cli_ns" "$srv_ns"; do
    ip netns exec "$ns" curl -fs http://127.0.0.1:15000/config_dump >"$work/dump.json" 2>/dev/null || return 1
    python3 - "$work/dump.json" "$1" "$server_uid" "$ns" "$srv_ns" <<'PY' || return 1
import json, re, sys
dump, file, server_uid, ns, srv_ns = sys.argv[1:]
d = json.load(open(dump))
want = {f"{m[1]}/{m[0]}" for m in re.findall(r"^metadata: \{name: ([^,]+), namespace: ([^}]+)\}$", open(file).read(), re.M)}
held = {f"{p['namespace']}/{p['name']}" for p in d["policies"]}
if held != want:
    sys.exit(1)
if ns == srv_ns:
    server = next((w for w in d["workloads"] if w["uid"] == server_uid), None)
    selected = {k for k in want if k.split("/", 1)[1].startswith("allow-client-")}
    if server is None or set(server["authorizationPolicies"]) != selected:
        sys.exit(1)
PY
  done
}

# Swaps a variant's policies in and waits until the ztunnels hold them; prints the seconds
# that took.
apply_variant() { # name
  local file t0
  file=$(variant_file "$1"); t0=$(date +%s.%N)
  cp "$file" "$mesh_dir/.policies.tmp"
  mv -f "$mesh_dir/.policies.tmp" "$policy_file"
  for _ in $(seq 1 600); do
    if holds_variant "$file"; then
      python3 -c "print(round($(date +%s.%N) - $t0, 2))"
      return 0
    fi
    sleep 0.1
  done
  fail "the ztunnels did not get variant $1's policies within 60 s"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
jq_num() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

# Policy enforcement must be real: with ALLOW policies on the server that do not name the
# client, every connection has to be refused.
echo "[deny check] waiting for the policies..." >&2
apply_variant deny >/dev/null
"${in_cli[@]}" "$mb" connrate --target "$srv_ip:5201" --concurrency 2 --seconds 1 --expect denied \
  >"$work/deny.json" || fail "connections went through that the deny variant must refuse"
deny_refused=$(jq_num "$(tail -n 1 "$work/deny.json")" errors)
echo "[deny check] all $deny_refused connections refused" >&2

variants=(direct none other-ns same-ns applying same-ns+applying)
declare -A R
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for ((r = 1; r <= rounds; r++)); do
  order=("${variants[@]}")
  if ((r % 2 == 0)); then
    order=(); for ((i = ${#variants[@]} - 1; i >= 0; i--)); do order+=("${variants[$i]}"); done
  fi
  for v in "${order[@]}"; do
    if [[ $v == direct ]]; then
      target="$srv_ip:5202"; sync=0
    else
      target="$srv_ip:5201"
      sync=$(apply_variant "$v") || fail "$v (round $r): the policies did not arrive"
    fi
    echo "[round $r/$rounds] $v: policies in place after ${sync}s; ${secs}s of new connections" >&2
    "${in_cli[@]}" "$mb" connrate --target "$target" --concurrency "$conc" --seconds 1 --max-errors 0 \
      >/dev/null || fail "$v (warm-up): a connection failed"
    a0=$(cpu_ticks "$zt_a"); b0=$(cpu_ticks "$zt_b"); i0=$(cpu_ticks "$ist_pid"); t0=$(date +%s.%N)
    out=$("${in_cli[@]}" "$mb" connrate --target "$target" --concurrency "$conc" --seconds "$secs" \
      --max-errors 0 | tail -n 1) || fail "$v (round $r): a connection failed"
    a1=$(cpu_ticks "$zt_a"); b1=$(cpu_ticks "$zt_b"); i1=$(cpu_ticks "$ist_pid"); t1=$(date +%s.%N)
    if [[ $v != direct ]]; then
      holds_variant "$(variant_file "$v")" || fail "$v (round $r): the ztunnels' policies changed while measuring"
    fi
    R[$v.$r]=$(python3 - "$out" "$a0" "$a1" "$b0" "$b1" "$i0" "$i1" "$t0" "$t1" "$hz" "$sync" <<'PY'
import json, sys
out = json.loads(sys.argv[1])
a0, a1, b0, b1, i0, i1 = map(int, sys.argv[2:8])
t0, t1, hz = float(sys.argv[8]), float(sys.argv[9]), int(sys.argv[10])
n = max(1, out["connections"])
print(json.dumps({
    "cps": out["cps"], "connections": out["connections"], "errors": out["errors"],
    "p50_us": out["p50_us"], "p99_us": out["p99_us"],
    "zt_a_us_per_conn": round((a1 - a0) / hz / n * 1e6, 1),
    "zt_b_us_per_conn": round((b1 - b0) / hz / n * 1e6, 1),
    "istiod_vcpu": round((i1 - i0) / hz / (t1 - t0), 3),
    "sync_s": float(sys.argv[11]),
}))
PY
)
  done
done

python3 - "$secs" "$rounds" "$conc" "$policies" "$applying" "$(nproc)" "$load_start" \
  "$(cut -d' ' -f1-3 /proc/loadavg)" "$deny_refused" "${ZTUNNEL_ARGS:-}" "$istiod_nice" <<PY
import json, statistics, sys
secs, rounds, conc, n, k, cores = map(int, sys.argv[1:7])
load_start, load_end, refused, ztargs = sys.argv[7], sys.argv[8], int(sys.argv[9]), sys.argv[10]
istiod_nice = int(sys.argv[11])
raw = {
$(for key in "${!R[@]}"; do printf '    "%s": %s,\n' "$key" "${R[$key]}"; done)
}
names = {
    "direct": "direct TCP (no mesh)",
    "none": "mesh, 0 policies",
    "other-ns": f"mesh, {n} in other namespaces",
    "same-ns": f"mesh, {n} in server ns, other pods",
    "applying": f"mesh, {k} applying (allow client)",
    "same-ns+applying": f"mesh, {n} + {k} applying",
}
held = {"direct": ("-", "-"), "none": (0, 0), "other-ns": (n, 0), "same-ns": (n, 0),
        "applying": (k, k), "same-ns+applying": (n + k, k)}
mean = lambda xs: sum(xs) / len(xs)
res = {}
for v in names:
    runs = [raw[f"{v}.{r}"] for r in range(1, rounds + 1)]
    res[v] = {
        "cps": round(mean([x["cps"] for x in runs]), 1),
        "cps_rounds": [x["cps"] for x in runs],
        "p50_us": round(mean([x["p50_us"] for x in runs]), 1),
        "p99_us": round(mean([x["p99_us"] for x in runs]), 1),
        "connections": sum(x["connections"] for x in runs),
        "errors": sum(x["errors"] for x in runs),
        "zt_a_us_per_conn": round(mean([x["zt_a_us_per_conn"] for x in runs]), 1),
        "zt_b_us_per_conn": round(mean([x["zt_b_us_per_conn"] for x in runs]), 1),
        "b_over_a": round(mean([x["zt_b_us_per_conn"] / max(0.1, x["zt_a_us_per_conn"]) for x in runs]), 3),
        "b_over_a_rounds": [round(x["zt_b_us_per_conn"] / max(0.1, x["zt_a_us_per_conn"]), 3) for x in runs],
        "spread_pct": round(100 * (max(x["cps"] for x in runs) / min(x["cps"] for x in runs) - 1), 1),
        "istiod_vcpu": round(max(x["istiod_vcpu"] for x in runs), 3),
        "policy_sync_s": max(x["sync_s"] for x in runs),
        "policies_held": held[v][0],
        "selecting_server": held[v][1],
    }
base = res["none"]["cps"]
for v in names:
    res[v]["vs_0_policies_pct"] = None if v == "direct" else round(100 * (res[v]["cps"] / base - 1), 1)
for f in ("zt_a_us_per_conn", "zt_b_us_per_conn", "b_over_a", "b_over_a_rounds", "vs_0_policies_pct"):
    res["direct"][f] = None

print(f"\nmode: netns+veth, nftables capture, istiod-lite xDS; {cores} cores; concurrency {conc}; "
      f"{secs}s per variant x {rounds} round(s), alternating order; ztunnel args: {ztargs or '(none)'}")
print(f"load average at start / end: {load_start} / {load_end}; deny check: {refused} of {refused} refused")
hdr = (f"{'':36} {'policies':>8} {'on srv':>6} {'conn/s':>8} {'vs 0 pol':>8} {'spread':>6} "
       f"{'p50 us':>7} {'p99 us':>7} {'A us/c':>6} {'B us/c':>6} {'B/A':>5}")
print(hdr)
for v, name in names.items():
    x = res[v]
    vs = "" if x["vs_0_policies_pct"] is None else f"{x['vs_0_policies_pct']:+.1f}%"
    mesh = v != "direct"
    a = f"{x['zt_a_us_per_conn']:.0f}" if mesh else ""
    b = f"{x['zt_b_us_per_conn']:.0f}" if mesh else ""
    ba = f"{x['b_over_a']:.3f}" if mesh else ""
    print(f"{name:36} {x['policies_held']!s:>8} {x['selecting_server']!s:>6} {x['cps']:>8.0f} {vs:>8} "
          f"{x['spread_pct']:>5.1f}% {x['p50_us']:>7.0f} {x['p99_us']:>7.0f} {a:>6} {b:>6} {ba:>5}")
print("conn/s: mean of the rounds (per round: "
      + "; ".join(f"{v} " + "/".join(f"{c:.0f}" for c in res[v]["cps_rounds"]) for v in names) + ")")
print(f"mesh with 0 policies: {100 * base / res['direct']['cps']:.0f}% of direct conn/s, "
      f"+{res['none']['p50_us'] - res['direct']['p50_us']:.0f} us p50")
checked = ["other-ns", "same-ns", "same-ns+applying"]
holds = all(res[v]["cps"] >= 0.9 * base for v in checked)
print(f"target: conn/s with {n} policies within 10% of 0 policies: "
      + ", ".join(f"{v} {res[v]['vs_0_policies_pct']:+.1f}%" for v in checked)
      + (" -> holds" if holds else " -> MISSED"))
# The same question asked of CPU: server ztunnel CPU per connection, divided by the client
# ztunnel's (which evaluates no policy) to cancel what the rest of the machine does to both.
ba0 = res["none"]["b_over_a"]
for v in res:
    res[v]["b_over_a_vs_0_policies_pct"] = None if v == "direct" else round(100 * (res[v]["b_over_a"] / ba0 - 1), 1)
cpu_holds = all(res[v]["b_over_a"] <= 1.1 * ba0 for v in checked)
print(f"server ztunnel CPU per connection (B/A) vs 0 policies: "
      + ", ".join(f"{v} {res[v]['b_over_a_vs_0_policies_pct']:+.1f}%" for v in names if v not in ("direct", "none"))
      + (" -> within 10%" if cpu_holds else " -> MORE than 10%"))
print(f"istiod-lite (nice {istiod_nice}) used up to {max(x['istiod_vcpu'] for x in res.values()):.2f} vCPU "
      "while measuring")
print("spread: fastest round over slowest; p50/p99: connect to first response byte; A/B us/c: "
      "ztunnel CPU per connection on the client / server node (only B evaluates policies, so "
      "B/A moving is policy cost, A moving is the machine)")
print(json.dumps({
    "bench": "policy", "mode": "netns+veth, nftables capture, istiod-lite xDS",
    "cores": cores, "concurrency": conc, "seconds": secs, "rounds": rounds,
    "policies": n, "applying": k, "ztunnel_args": ztargs,
    "loadavg": {"start": load_start, "end": load_end}, "deny_check_refused": refused,
    "istiod_nice": istiod_nice, "variants": res,
    "target_within_10pct": {"conn_per_s": holds, "server_cpu_per_conn": cpu_holds},
}))
PY
