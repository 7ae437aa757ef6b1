#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine (head + N worker nodes on 127.0.0.1), for trying
# `ftdist submit job.yaml --address http://127.0.0.1:<dashboard port>` (Ray Jobs API) or
# `ftdist train job.yaml --address 127.0.0.1:<port>` against a "real" cluster without one.
#
#   cluster/local-ray-cluster.sh start [WORKERS=1] [PORT=6390] [DASHBOARD_PORT=8266]   # prints the addresses
#   cluster/local-ray-cluster.sh stop
#
# Everything lives under its own temp dir; `stop` kills only the processes of that dir (never `ray stop`,
# which would kill every Ray on the machine).
set -euo pipefail
STATE="${FTDIST_LOCAL_CLUSTER_DIR:-/tmp/ftdist-local-ray}"
cmd="${1:-}"; workers="${2:-1}"; port="${3:-6390}"; dport="${4:-8266}"

case "$cmd" in
  start)
    mkdir -p "$STATE"
    # Ray 2.60 enables token auth: one token for the head, the workers and the clients of this cluster.
    (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/auth_token")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
    # The head runs job drivers and Train controllers (1 CPU); each worker node 2 CPUs for training workers. Every
    # node gets its own agent ports (two nodes on one host would collide on the defaults).
    ray start --head --port="$port" --num-cpus=1 --temp-dir="$STATE/tmp" --include-dashboard=true \
      --dashboard-host=127.0.0.1 --dashboard-port="$dport" --node-ip-address=127.0.0.1 --disable-usage-stats \
      --dashboard-agent-listen-port=$((dport + 100)) --dashboard-agent-grpc-port=$((dport + 101)) \
      --runtime-env-agent-port=$((dport + 102)) --metrics-export-port=$((dport + 103)) >"$STATE/head.log" 2>&1
    for i in $(seq 1 "$workers"); do
      o=$((dport + 100 + 10 * i))
      ray start --address="127.0.0.1:$port" --num-cpus=2 --node-ip-address=127.0.0.1 --temp-dir="$STATE/tmp" \
        --dashboard-agent-listen-port=$o --dashboard-agent-grpc-port=$((o + 1)) --runtime-env-agent-port=$((o + 2)) \
        --metrics-export-port=$((o + 3)) --disable-usage-stats >"$STATE/worker$i.log" 2>&1
    done
    echo "127.0.0.1:$port" >"$STATE/address"
    echo "Ray cluster up. Use it with:"
    echo "  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
    echo "  ftdist submit JOB.yaml --address http://127.0.0.1:$dport --set checkpoint.storage=/tmp/ftdist-runs --follow"
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
