#!/usr/bin/env bash
# A walk through the kv CLI on a local cluster, in a temporary directory that is removed at the
# end. Run from the repository root (`make venv` sets up .venv the first time):
#   make venv && bash examples/cli_walkthrough.sh
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"
workdir="$(mktemp -d)"
export KV_CLUSTER_DIR="$workdir/cluster"
trap 'kv cluster down >/dev/null 2>&1 || true; rm -rf "$workdir"' EXIT
run() { echo; echo "\$ $*"; "$@" || echo "(exit code $?)"; }

run kv cluster up --detach                  # three nodes on 127.0.0.1, a leader elected
run kv put greeting hello
run kv get greeting
run kv get greeting -w json
run kv incr visits 5
run kv append log "first;"
run kv cas greeting hi --expect hello
run kv get "" --prefix                        # every key
run kv get missing                           # exit code 1: not found

session="$workdir/me.session"
run kv session open --session "$session"
cp "$session" "$session.old"                 # what a client that loses an answer still holds
run kv incr orders --session "$session"
run kv incr orders --session "$session.old"  # a retry: the cached answer, applied once
run kv get orders
cp "$session" "$session.copy"                # a second client handed the same file (a bug)
run kv incr orders --session "$session"
run kv put orders 0 --session "$session.copy"  # request 2 again, another command: exit code 3
run kv get orders                            # 2: the put was not applied
run kv session close --session "$session"

run kv cluster status
leader_pid=$(kv cluster status -w json | python3 -c 'import json,sys; print([r["pid"] for r in json.load(sys.stdin) if r.get("role")=="leader"][0])')
run kill -9 "$leader_pid"                    # crash the leader
run kv get orders                            # a new leader answers
run kv cluster up --detach                   # brings the killed node back from disk
run kv cluster status
