#!/usr/bin/env bash
# A living cluster, with kv commands only, while `kv bench` writes to it (issue 9, "Done when"):
#   grow 3 -> 5 nodes, remove the leader, shrink back to 3, then replace a node whose data
#   directory is wiped. At the end: the benchmark's errors by type, and every replica's digest.
#
# Run from the repository root (`make venv` sets up .venv the first time); a benchmark, so on a
# shared machine run it alone:
#   make venv && bash examples/living_cluster.sh [BENCH_SECONDS] [CLIENTS]
#
# Everything runs on 127.0.0.1 in a temporary directory, stopped (and kept, for its logs) at the
# end. (python3 only reads kv's JSON output.)
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"
SECONDS_OF_LOAD=${1:-60}
CLIENTS=${2:-8}
KV=${KV:-kv}
WORK=$(mktemp -d /tmp/kv-living-XXXXXX)
export KV_CLUSTER_DIR=$WORK/cluster
BENCH_PID=
cleanup() {
    [ -n "$BENCH_PID" ] && kill "$BENCH_PID" 2>/dev/null && wait "$BENCH_PID" 2>/dev/null
    $KV cluster down >/dev/null 2>&1 || true
}
trap cleanup EXIT
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
step() { printf '\n[%4ds] %s\n' "$SECONDS" "$*"; }
leader() { $KV member list 2>/dev/null | awk -F', ' '/\(leader\)/ {print $1}'; }

step "kv cluster up: 3 nodes"
ENDPOINTS=$($KV -w json cluster up --detach --snapshot-count 2000 | json '",".join(d["endpoints"])')

step "kv bench: $CLIENTS clients writing for ${SECONDS_OF_LOAD}s to $ENDPOINTS"
$KV bench --endpoints "$ENDPOINTS" --clients "$CLIENTS" --duration "${SECONDS_OF_LOAD}s" \
    --warmup 1s --rounds 1 -w json >"$WORK/bench.json" 2>"$WORK/bench.log" &
BENCH_PID=$!
sleep 5

step "grow: kv cluster add-node (learner, caught up, promoted), twice"
$KV cluster add-node
$KV cluster add-node

OLD_LEADER=$(leader)
step "remove the leader ($OLD_LEADER): kv cluster remove-node $OLD_LEADER"
$KV cluster remove-node "$OLD_LEADER"
OTHER=$($KV member list 2>/dev/null | awk -F', ' '$2 == "voter" {print $1}' | sort | head -1)
step "shrink back to 3: kv cluster remove-node $OTHER"
$KV cluster remove-node "$OTHER"

VICTIM=$($KV member list 2>/dev/null | awk -F', ' '$2 == "voter" {print $1}' | sort | head -1)
step "$VICTIM loses its disk: SIGKILL, data directory wiped"
kill -9 "$(cat "$KV_CLUSTER_DIR/$VICTIM/pid")"
rm -rf "${KV_CLUSTER_DIR:?}/$VICTIM/data"
step "kv cluster up refuses to bring $VICTIM back under its old identity"
$KV cluster up --detach 2>&1 | grep "not starting" || true
step "replace it: kv cluster remove-node $VICTIM && kv cluster add-node"
$KV cluster remove-node "$VICTIM"
$KV cluster add-node

step "members now"
$KV member list -w table
step "waiting for kv bench to finish"
wait "$BENCH_PID" || true
BENCH_PID=
python3 - "$WORK/bench.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
for run in doc["runs"]:
    print(f"kv bench: {run['ops']} writes, {run['ops_s']:.0f} ops/s, p50 {run['p50_ms']:.1f} ms, "
          f"p99 {run['p99_ms']:.1f} ms, max {run['max_ms']:.0f} ms; "
          f"errors: {run['errors_by_type'] or 'none'}")
    for sample in run["error_samples"]:
        print(f"  {sample}")
EOF
step "every replica's state digest (once they have applied the same index)"
for _ in $(seq 20); do
    $KV -w json cluster status >"$WORK/status.json"
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(len({(x.get("applied"), x.get("digest")) for x in r}) != 1)' "$WORK/status.json" && break
    sleep 0.5
done
python3 - "$WORK/status.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
for r in rows:
    print(f"{r['id']}: {r.get('role')}, applied {r.get('applied')}, digest {r.get('digest')}")
same = len({r.get("digest") for r in rows}) == 1
print("all replicas identical" if same else "REPLICAS DIFFER")
sys.exit(0 if same else 1)
EOF
echo "total ${SECONDS}s; cluster directory $KV_CLUSTER_DIR (stopped)"
