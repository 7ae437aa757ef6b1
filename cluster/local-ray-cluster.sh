#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine (head + N worker nodes on 127.0.0.1), for trying
# `ftdist train job.yaml --address 127.0.0.1:<port>` against a "real" cluster without one.
#
#   cluster/local-ray-cluster.sh start [WORKERS=1] [PORT=6390]   # prints the address to use
#   cluster/local-ray-cluster.sh stop
#
# Everything lives under its own temp dir; `stop` kills only the processes of that dir (never `ray stop`,
# which would kill every Ray on the machine).
set -euo pipefail
STATE="${FTDIST_LOCAL_CLUSTER_DIR:-/tmp/ftdist-local-ray}"
cmd="${1:-}"; workers="${2:-1}"; port="${3:-6390}"

case "$cmd" in
  start)
    mkdir -p "$STATE"
    # Ray 2.60 enables token auth: one token for the head, the workers and the clients of this cluster.
    (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/auth_token")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
    ray start --head --port="$port" --num-cpus=1 --temp-dir="$STATE/tmp" --include-dashboard=false \
      --node-ip-address=127.0.0.1 --disable-usage-stats >"$STATE/head.log" 2>&1
    for i in $(seq 1 "$workers"); do
      ray start --address="127.0.0.1:$port" --num-cpus=2 --node-ip-address=127.0.0.1 \
        --disable-usage-stats >"$STATE/worker$i.log" 2>&1
    done
    echo "127.0.0.1:$port" >"$STATE/address"
    echo "Ray cluster up. Use it with:"
    echo "  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
    echo "  ftdist train JOB.yaml --address 127.0.0.1:$port"
    ;;
  stop)
    [ -d "$STATE" ] || { echo "no local cluster state in $STATE"; exit 0; }
    pids=$(pgrep -f -- "$STATE/tmp" || true)
    [ -z "$pids" ] || kill $pids 2>/dev/null || true
    sleep 2
    pids=$(pgrep -f -- "$STATE/tmp" || true)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    rm -rf "$STATE"
    echo "stopped"
    ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
