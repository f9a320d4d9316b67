#!/usr/bin/env bash
# tern as a cluster on NATS JetStream, measured on this machine: a single tern without
# `[cluster]` (nodes=0), then 1, 2 and 3 tern nodes on a 3-server JetStream cluster, each at
# its default configuration plus `[cluster]`. See bench/README.md ("Cluster").
#
#   bench/cluster.sh                      # every scenario, nodes 0 1 2 3, one run each
#   NODES="0 3" SCENARIOS="fanin1" RUNS=3 bench/cluster.sh
#
# Scenarios (tern-bench, with --pub-addr/--sub-addr lists over the nodes):
#   fanin0 fanin1    8 publishers spread over the nodes, 1 subscriber on the last node
#   fanout0 fanout1  1 publisher on node 1, 16 subscribers spread over the nodes
#   latency          2,000 msg/s QoS 0, publisher on node 1, subscriber on the last node
# Each line also gives the CPU seconds the tern nodes and the nats-servers used during the
# run, and per message (µs), from /proc: what the NATS hop costs.
#
# Environment: NODES, SCENARIOS, RUNS (default 1), OUT (default target/bench/cluster-<time>),
# NO_BUILD=1, CARGO_TARGET_DIR, MESSAGES_SCALE (default 1: fanin 100k, fanout 50k messages).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
NODES=${NODES:-"0 1 2 3"}
SCENARIOS=${SCENARIOS:-"fanin0 fanin1 fanout0 fanout1 latency"}
RUNS=${RUNS:-1}
SCALE=${MESSAGES_SCALE:-1}
OUT=${OUT:-$ROOT/target/bench/cluster-$(date +%Y%m%d-%H%M%S)}
BENCH=${CARGO_TARGET_DIR:-$ROOT/target}/release/tern-bench
TERN=${CARGO_TARGET_DIR:-$ROOT/target}/release/tern
export PATH="$PATH:/usr/sbin:/usr/local/sbin"
log() { echo "[cluster-bench] $*" >&2; }

command -v nats-server >/dev/null 2>&1 || { log "nats-server is not installed (apt-get install nats-server)"; exit 1; }
if [ "${NO_BUILD:-0}" != 1 ]; then
    cargo build --release --bin tern --bin tern-bench >&2 || exit 1
fi
mkdir -p "$OUT" || exit 1
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

cpu_ticks() { # sum of utime+stime of the given pids, in clock ticks
    local t=0 p f
    for p in "$@"; do
        f=$(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null) || continue
        t=$((t + ${f% *} + ${f#* }))
    done
    echo $t
}
HZ=$(getconf CLK_TCK)

wait_port() {
    local i
    # A cluster node listens once its streams and buckets exist: seconds on a fresh cluster.
    for i in $(seq 1200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
    log "port $1 never opened"; return 1
}

# --- three nats-servers, one JetStream cluster ---------------------------------------------
NATS_PIDS=()
NATS_URLS=()
for i in 1 2 3; do
    cat >"$WORK/nats$i.conf" <<EOF
server_name: nats$i
listen: 127.0.0.1:$((24220 + i))
http: 127.0.0.1:$((28220 + i))
jetstream { store_dir: "$WORK/nats$i", max_memory_store: 256MB, max_file_store: 8GB }
cluster { name: bench, listen: 127.0.0.1:$((26220 + i)), routes: [nats-route://127.0.0.1:26221, nats-route://127.0.0.1:26222, nats-route://127.0.0.1:26223] }
EOF
    nats-server -c "$WORK/nats$i.conf" >"$WORK/nats$i.log" 2>&1 &
    NATS_PIDS+=($!)
    PIDS+=($!)
    NATS_URLS+=("\"nats://127.0.0.1:$((24220 + i))\"")
done
for i in 1 2 3; do
    for _ in $(seq 200); do
        curl -sf "http://127.0.0.1:$((28220 + i))/healthz" >/dev/null 2>&1 && break
        sleep 0.1
    done
done
NATS_LIST=$(IFS=,; echo "${NATS_URLS[*]}")
log "nats-server $(nats-server --version | awk '{print $2}') x3, JetStream cluster up"

start_nodes() { # $1 = number of tern nodes (0 = one tern without [cluster])
    local n=$1 i count cluster name
    TERN_PIDS=()
    ADDRS=()
    count=$n
    [ "$n" -eq 0 ] && count=1
    # A new cluster name per start: every run begins with empty streams and buckets.
    name="bench$RANDOM$RANDOM"
    for i in $(seq "$count"); do
        cluster=""
        if [ "$n" -gt 0 ]; then
            cluster=$(printf '\n[cluster]\nnats = [%s]\nnode = "n%s"\nname = "%s"\n' "$NATS_LIST" "$i" "$name")
        fi
        mkdir -p "$WORK/tern$i"
        rm -rf "$WORK/tern$i/data"
        printf '[[listener]]\nbind = "127.0.0.1:%s"\n\n[storage]\ndir = "%s"\n%s\n' \
            $((21880 + i)) "$WORK/tern$i/data" "$cluster" >"$WORK/tern$i/tern.toml"
        RUST_LOG=warn "$TERN" -c "$WORK/tern$i/tern.toml" >>"$WORK/tern$i.log" 2>&1 &
        TERN_PIDS+=($!)
        PIDS+=($!)
        ADDRS+=("127.0.0.1:$((21880 + i))")
    done
    for i in $(seq "$count"); do wait_port $((21880 + i)) || return 1; done
}

stop_nodes() {
    local p
    for p in "${TERN_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${TERN_PIDS[@]}"; do wait "$p" 2>/dev/null; done
}

run_one() { # scenario nodes run
    local sc=$1 n=$2 run=$3 last all args t0 t1 n0 n1 line msgs
    last=${ADDRS[${#ADDRS[@]}-1]}
    all=$(IFS=,; echo "${ADDRS[*]}")
    case $sc in
        fanin0) args=(fanin --qos 0 --messages $((100000 * SCALE)) --pub-addr "$all" --sub-addr "$last") ;;
        fanin1) args=(fanin --qos 1 --messages $((100000 * SCALE)) --pub-addr "$all" --sub-addr "$last") ;;
        fanout0) args=(fanout --qos 0 --messages $((50000 * SCALE)) --pub-addr "${ADDRS[0]}" --sub-addr "$all") ;;
        fanout1) args=(fanout --qos 1 --messages $((50000 * SCALE)) --pub-addr "${ADDRS[0]}" --sub-addr "$all") ;;
        latency) args=(latency --rate 2000 --secs 10 --pub-addr "${ADDRS[0]}" --sub-addr "$last") ;;
        *) log "unknown scenario $sc"; return 1 ;;
    esac
    t0=$(cpu_ticks "${TERN_PIDS[@]}")
    n0=$(cpu_ticks "${NATS_PIDS[@]}")
    line=$("$BENCH" "${args[@]}" --timeout 120 --pid "${TERN_PIDS[0]}")
    t1=$(cpu_ticks "${TERN_PIDS[@]}")
    n1=$(cpu_ticks "${NATS_PIDS[@]}")
    msgs=$(echo "$line" | tr ' ' '\n' | sed -n 's/^received=//p')
    [ -z "$msgs" ] && msgs=0
    awk -v l="$line" -v n="$n" -v run="$run" -v tc=$((t1 - t0)) -v nc=$((n1 - n0)) -v hz="$HZ" -v m="$msgs" 'BEGIN {
        tern = tc / hz; nats = nc / hz
        per_t = m > 0 ? tern / m * 1e6 : 0; per_n = m > 0 ? nats / m * 1e6 : 0
        printf "nodes=%s run=%s %s tern_cpu_s=%.2f nats_cpu_s=%.2f tern_us_per_msg=%.2f nats_us_per_msg=%.2f\n", n, run, l, tern, nats, per_t, per_n
    }'
}

for n in $NODES; do
    for sc in $SCENARIOS; do
        for run in $(seq "$RUNS"); do
            start_nodes "$n" || exit 1
            run_one "$sc" "$n" "$run" | tee -a "$OUT/results.txt"
            stop_nodes
        done
    done
done
log "results: $OUT/results.txt"
