#!/usr/bin/env bash
# Compare tern with mosquitto on the tern-bench scenarios. See bench/README.md.
#
#   bench/compare.sh                       # every scenario, 3 runs per broker, alternating
#   QUICK=1 bench/compare.sh               # smaller counts: a couple of minutes
#   SCENARIOS="fanin0 fanout1" RUNS=5 bench/compare.sh
#
# Environment:
#   SCENARIOS   subset of: fanin0 fanin1 fanout0 fanout1 latency conns retained durable sweep
#               tls_handshakes tls_fanin1 overload0 overload1 conns_device
#               bridge0_default bridge1_default bridge0 bridge1
#               (overload*, bridge*_default: brokers at their DEFAULT configuration, see
#               default_config; bridge*: two brokers of a kind, A bridging `bench/#` out to B)
#   RUNS        runs per broker per scenario (default 3; sweep always runs once per broker)
#   QUICK=1     smaller message counts and shorter latency runs
#   TIMEOUT     tern-bench hard timeout per run, seconds (default 60)
#   DURABILITY  tern storage.durability for `durable` (default sync)
#   TERN_DURABILITY  tern storage.durability for every other scenario (default none, the
#               closest to mosquitto's `persistence false`)
#   OUT         results directory (default target/bench/<timestamp>)
#   NO_BUILD=1  skip `cargo build --release`
#   CARGO_TARGET_DIR  where the binaries are (default target/)
#   TLS_KEY     key type of the generated test certificates for the tls_* scenarios: ec
#               (P-256, default) or rsa (2048 bits)
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=${RUNS:-3}
QUICK=${QUICK:-0}
TIMEOUT=${TIMEOUT:-60}
DURABILITY=${DURABILITY:-sync}
TERN_DURABILITY=${TERN_DURABILITY:-none}
SCENARIOS=${SCENARIOS:-"fanin0 fanin1 fanout0 fanout1 latency conns retained durable sweep tls_handshakes tls_fanin1 overload0 overload1 conns_device bridge0_default bridge1_default bridge0 bridge1"}
TLS_KEY=${TLS_KEY:-ec}
OUT=${OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)}
BENCH=${CARGO_TARGET_DIR:-$ROOT/target}/release/tern-bench
TERN=${CARGO_TARGET_DIR:-$ROOT/target}/release/tern
export PATH="$PATH:/usr/sbin:/usr/local/sbin"

log() { echo "[compare] $*" >&2; }

mkdir -p "$OUT" || exit 1
RESULTS=$OUT/results.tsv
: >"$RESULTS"

# --- tools -----------------------------------------------------------------------------
if ! command -v mosquitto >/dev/null 2>&1; then
    log "installing mosquitto (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi
if ! command -v mosquitto >/dev/null 2>&1; then
    log "mosquitto is not available; cannot compare"
    exit 1
fi
MOSQ_VERSION=$(mosquitto -h 2>&1 | head -1)
case " $SCENARIOS " in
    *" tls_"*)
        if ! command -v openssl >/dev/null 2>&1; then
            log "installing openssl (Debian package)"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
        fi
        if ! command -v openssl >/dev/null 2>&1; then
            log "openssl is not available; cannot make the TLS test certificates"
            exit 1
        fi
        ;;
esac
if [ "${NO_BUILD:-0}" != 1 ]; then
    log "cargo build --release"
    cargo build --release --bins >&2 || exit 1
fi
# 10,000 idle connections need as many descriptors in the bench and in the broker.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null
log "open-file limit: $(ulimit -n)"

# --- TLS test certificates --------------------------------------------------------------
# One CA and one server certificate (SAN DNS:localhost, IP:127.0.0.1) per results directory,
# used by both brokers; tern-bench trusts the CA (--tls-ca) and checks the name `localhost`.
TLS_DIR=$OUT/tls
make_certs() {
    [ -f "$TLS_DIR/server.crt" ] && return 0
    mkdir -p "$TLS_DIR" || return 1
    local newkey
    case $TLS_KEY in
        ec) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
        rsa) newkey=(-newkey rsa:2048) ;;
        *) log "TLS_KEY must be ec or rsa"; return 1 ;;
    esac
    (
        cd "$TLS_DIR" &&
            openssl req -x509 "${newkey[@]}" -nodes -days 30 -subj "/CN=tern-bench test CA" \
                -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
                -keyout ca.key -out ca.crt &&
            openssl req "${newkey[@]}" -nodes -subj "/CN=localhost" -keyout server.key -out server.csr &&
            printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
                "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >server.ext &&
            openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
                -extfile server.ext -out server.crt &&
            # A throwaway key: readable, so mosquitto can load it after dropping root.
            chmod 644 server.key
    ) >"$OUT/openssl.log" 2>&1 || {
        log "openssl failed; see $OUT/openssl.log"
        return 1
    }
    log "TLS test certificates ($TLS_KEY) in $TLS_DIR"
}
case " $SCENARIOS " in
    *" tls_"*) make_certs || exit 1 ;;
esac

# --- scenario table --------------------------------------------------------------------
args_for() {
    local q=$QUICK
    case $1 in
        fanin0) [ "$q" = 1 ] && echo "fanin --qos 0 --messages 100000 --drain-ms 1000" || echo "fanin --qos 0 --messages 400000" ;;
        fanin1) [ "$q" = 1 ] && echo "fanin --qos 1 --messages 100000" || echo "fanin --qos 1 --messages 400000" ;;
        fanout0) [ "$q" = 1 ] && echo "fanout --qos 0 --messages 10000 --drain-ms 1000" || echo "fanout --qos 0 --messages 50000" ;;
        fanout1) [ "$q" = 1 ] && echo "fanout --qos 1 --messages 10000" || echo "fanout --qos 1 --messages 50000" ;;
        latency) [ "$q" = 1 ] && echo "latency --rate 2000 --secs 3" || echo "latency --rate 2000 --secs 10" ;;
        conns) echo "conns --conns 10000" ;;
        conns_device) echo "conns --conns 10000 --keepalive 60 --subscribe" ;;
        retained) [ "$q" = 1 ] && echo "retained --messages 20000" || echo "retained --messages 100000" ;;
        durable) [ "$q" = 1 ] && echo "durable --messages 40000" || echo "durable --messages 200000" ;;
        sweep) [ "$q" = 1 ] && echo "latency --sweep 1000,2000,5000,10000,20000 --secs 2 --drain-ms 1000" ||
            echo "latency --sweep 1000,2000,5000,10000,20000,50000,100000 --secs 5" ;;
        tls_handshakes) [ "$q" = 1 ] && echo "handshakes --conns 500 --tls-ca $TLS_DIR/ca.crt" ||
            echo "handshakes --conns 2000 --tls-ca $TLS_DIR/ca.crt" ;;
        tls_fanin1) [ "$q" = 1 ] && echo "fanin --qos 1 --messages 100000 --tls-ca $TLS_DIR/ca.crt" ||
            echo "fanin --qos 1 --messages 400000 --tls-ca $TLS_DIR/ca.crt" ;;
        overload0) [ "$q" = 1 ] && echo "overload --qos 0 --messages 100000 --drain-ms 1000" ||
            echo "overload --qos 0 --messages 400000" ;;
        overload1) [ "$q" = 1 ] && echo "overload --qos 1 --messages 100000 --drain-ms 1000" ||
            echo "overload --qos 1 --messages 400000" ;;
        # Across a bridge: 4 publishers on broker A, the subscriber on broker B (run_one adds
        # --pub-addr/--sub-addr). The bridge's QoS is the scenario's (bridge_qos).
        bridge0 | bridge0_default) [ "$q" = 1 ] && echo "fanin --qos 0 --pubs 4 --messages 40000 --drain-ms 1000" ||
            echo "fanin --qos 0 --pubs 4 --messages 400000" ;;
        bridge1 | bridge1_default) [ "$q" = 1 ] && echo "fanin --qos 1 --pubs 4 --messages 40000" ||
            echo "fanin --qos 1 --pubs 4 --messages 400000" ;;
        *) return 1 ;;
    esac
}

# Scenarios run against each broker's DEFAULT configuration: nothing but a listener and
# (tern) a data directory, (mosquitto) anonymous access, which 2.0 refuses by default.
default_config() {
    case $1 in
        overload* | bridge*_default) return 0 ;;
        *) return 1 ;;
    esac
}

# Bridge scenarios: the QoS of broker A's `bench/#` out topic (else not a bridge scenario).
bridge_qos() {
    case $1 in
        bridge0*) echo 0 ;;
        bridge1*) echo 1 ;;
        *) return 1 ;;
    esac
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    local port=$1 pid=$2 i
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 1
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

BROKER_PID=
PEER_PID=
# With BRIDGE_TO=PORT set, start_broker's broker (A) bridges `bench/#` out at QoS BRIDGE_QOS
# to the broker on that port (B): tern with a [[bridge]], mosquitto with a `connection`. The
# bridge's own settings are each broker's defaults (mosquitto: MQTT 3.1.1, try_private; its
# queue and in-flight window are the global max_queued_messages / max_inflight_messages.
# tern: MQTT 5; its window is [limits] max_inflight, its queue max_queued_messages).
BRIDGE_TO=
BRIDGE_QOS=0
bridge_lines() {
    [ -n "$BRIDGE_TO" ] || return 0
    if [ "$1" = tern ]; then
        printf '\n[[bridge]]\nname = "bench"\naddresses = ["127.0.0.1:%s"]\n' "$BRIDGE_TO"
        printf 'topics = [{ pattern = "bench/#", direction = "out", qos = %s }]\n' "$BRIDGE_QOS"
    else
        printf '\nconnection bench\naddress 127.0.0.1:%s\ntopic bench/# out %s\n' "$BRIDGE_TO" "$BRIDGE_QOS"
    fi
}

# start_broker KIND SCENARIO DIR -> sets BROKER_PID, BROKER_PORT
start_broker() {
    local kind=$1 scen=$2 dir=$3
    BROKER_PORT=$(free_port)
    mkdir -p "$dir/data"
    # tls_* scenarios: the only listener is TLS, with the certificates from make_certs.
    local tern_tls="" mosq_tls=""
    case $scen in
        tls_*)
            tern_tls="kind = \"tls\"
tls = { cert = \"$TLS_DIR/server.crt\", key = \"$TLS_DIR/server.key\" }"
            mosq_tls="certfile $TLS_DIR/server.crt
keyfile $TLS_DIR/server.key"
            ;;
    esac
    if default_config "$scen"; then
        if [ "$kind" = tern ]; then
            cat >"$dir/broker.toml" <<EOF
[[listener]]
bind = "127.0.0.1:$BROKER_PORT"

[storage]
dir = "$dir/data"
EOF
            bridge_lines tern >>"$dir/broker.toml"
            RUST_LOG=${RUST_LOG:-warn} "$TERN" -c "$dir/broker.toml" >"$dir/broker.log" 2>&1 &
        else
            cat >"$dir/broker.conf" <<EOF
listener $BROKER_PORT 127.0.0.1
allow_anonymous true
EOF
            bridge_lines mosquitto >>"$dir/broker.conf"
            mosquitto -c "$dir/broker.conf" >"$dir/broker.log" 2>&1 &
        fi
    elif [ "$kind" = tern ]; then
        local mode=$TERN_DURABILITY
        [ "$scen" = durable ] && mode=$DURABILITY
        # Limits matched to the mosquitto config below (queue and in-flight window).
        cat >"$dir/broker.toml" <<EOF
[[listener]]
bind = "127.0.0.1:$BROKER_PORT"
$tern_tls

[storage]
dir = "$dir/data"
durability = "$mode"

[limits]
max_queued_messages = 1000000
max_inflight = 1000
EOF
        bridge_lines tern >>"$dir/broker.toml"
        RUST_LOG=${RUST_LOG:-warn} "$TERN" -c "$dir/broker.toml" >"$dir/broker.log" 2>&1 &
    else
        cat >"$dir/broker.conf" <<EOF
listener $BROKER_PORT 127.0.0.1
$mosq_tls
allow_anonymous true
max_queued_messages 1000000
max_inflight_messages 1000
set_tcp_nodelay true
persistence false
persistence_location $dir/data/
log_dest stderr
log_type error
log_type warning
EOF
        bridge_lines mosquitto >>"$dir/broker.conf"
        mosquitto -c "$dir/broker.conf" >"$dir/broker.log" 2>&1 &
    fi
    BROKER_PID=$!
    if ! wait_port "$BROKER_PORT" "$BROKER_PID"; then
        log "$kind did not start; log:"
        tail -20 "$dir/broker.log" >&2
        stop_broker
        return 1
    fi
}

# stop_pid PID: SIGTERM, then SIGKILL after 5 s.
stop_pid() {
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "broker $pid ignored SIGTERM for 5 s; killing"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
}

# Stops the broker and, in the bridge scenarios, its peer B (after A, whose bridge goes first).
stop_broker() {
    stop_pid "$BROKER_PID"
    BROKER_PID=
    stop_pid "$PEER_PID"
    PEER_PID=
}
trap 'stop_broker' EXIT INT TERM

# run_one KIND SCENARIO RUN
run_one() {
    local kind=$1 scen=$2 run=$3 dir args rc line
    dir=$OUT/$scen/$kind-$run
    mkdir -p "$dir"
    args=$(args_for "$scen")
    local extra=()
    if BRIDGE_QOS=$(bridge_qos "$scen"); then
        # Broker B first (the subscriber's), then A bridging to it (the publishers'); the
        # bench starts once a probe got from A to B.
        if ! start_broker "$kind" "$scen" "$dir/b"; then
            printf '%s\t%s\t%s\t%s\t%s\n' "$scen" "$kind" "$run" 99 "error=broker_b_did_not_start" >>"$RESULTS"
            return
        fi
        PEER_PID=$BROKER_PID
        BROKER_PID=
        BRIDGE_TO=$BROKER_PORT
        extra=(--sub-addr "127.0.0.1:$BROKER_PORT" --pid2 "$PEER_PID")
    fi
    if ! start_broker "$kind" "$scen" "$dir"; then
        BRIDGE_TO=
        stop_broker
        printf '%s\t%s\t%s\t%s\t%s\n' "$scen" "$kind" "$run" 99 "error=broker_did_not_start" >>"$RESULTS"
        return
    fi
    BRIDGE_TO=
    [ -n "$PEER_PID" ] && extra+=(--pub-addr "127.0.0.1:$BROKER_PORT")
    # shellcheck disable=SC2086
    timeout $((TIMEOUT * 8 + 60)) "$BENCH" $args --port "$BROKER_PORT" --pid "$BROKER_PID" "${extra[@]}" \
        --timeout "$TIMEOUT" >"$dir/bench.out" 2>"$dir/bench.err"
    rc=$?
    local alive=1
    kill -0 "$BROKER_PID" 2>/dev/null || alive=0
    if [ -n "$PEER_PID" ]; then
        kill -0 "$PEER_PID" 2>/dev/null || alive=0
    fi
    stop_broker
    if [ "$scen" = sweep ]; then
        cp "$dir/bench.out" "$OUT/sweep_$kind.txt"
    fi
    while IFS= read -r line || [ -n "$line" ]; do
        [ -n "$line" ] || continue
        [ $alive = 1 ] || line="$line broker_died=1"
        printf '%s\t%s\t%s\t%s\t%s\n' "$scen" "$kind" "$run" "$rc" "$line" >>"$RESULTS"
        echo "$kind #$run rc=$rc $line" >&2
    done <"$dir/bench.out"
    if [ ! -s "$dir/bench.out" ]; then
        printf '%s\t%s\t%s\t%s\t%s\n' "$scen" "$kind" "$run" "$rc" "error=no_output" >>"$RESULTS"
        log "$kind #$run rc=$rc: no output; stderr: $(tail -3 "$dir/bench.err")"
    fi
    if [ "$rc" != 0 ] || [ $alive = 0 ]; then
        log "$kind #$run of $scen: exit $rc, broker alive=$alive; broker log tail ($dir/broker.log):"
        grep -vi 'client .*\(dis\)\?connected' "$dir/broker.log" | tail -5 | sed 's/^/    /' >&2
        if [ -f "$dir/b/broker.log" ]; then
            log "broker B log tail ($dir/b/broker.log):"
            grep -vi 'client .*\(dis\)\?connected' "$dir/b/broker.log" | tail -5 | sed 's/^/    /' >&2
        fi
    fi
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') x $(nproc)"
    echo "memory: $(free -h | awk '/^Mem:/ {print $2}')"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "mosquitto: $MOSQ_VERSION"
    echo "tern: $(git -C "$ROOT" describe --always --dirty 2>/dev/null)"
    echo "mode: $([ "$QUICK" = 1 ] && echo QUICK || echo full), RUNS=$RUNS, tern durability: $TERN_DURABILITY (durable: $DURABILITY; overload*, bridge*_default: brokers at their default configuration)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

for scen in $SCENARIOS; do
    if ! args_for "$scen" >/dev/null; then
        log "unknown scenario $scen (skipped)"
        continue
    fi
    log "== $scen: tern-bench $(args_for "$scen")"
    runs=$RUNS
    [ "$scen" = sweep ] && runs=1
    for run in $(seq 1 "$runs"); do
        run_one tern "$scen" "$run"
        run_one mosquitto "$scen" "$run"
    done
done

python3 "$ROOT/bench/summarize.py" "$RESULTS" "$OUT/machine.txt" | tee "$OUT/summary.md"

if [ -f "$OUT/sweep_tern.txt" ] || [ -f "$OUT/sweep_mosquitto.txt" ]; then
    if ! python3 -c 'import matplotlib' 2>/dev/null; then
        log "matplotlib missing: pip install matplotlib"
        python3 -m pip install -q matplotlib >&2 2>&1 || log "pip install matplotlib failed"
    fi
    python3 "$ROOT/bench/latency_plot.py" "$OUT/sweep_tern.txt" "$OUT/sweep_mosquitto.txt" "$ROOT/bench/latency.png"
fi
log "results in $OUT"
