#!/usr/bin/env bash
# Interop checks: real MQTT clients (mosquitto_pub/mosquitto_sub, paho-mqtt 2.x) against a
# tern binary.
#
#   tests/interop/run.sh target/release/tern
#
# Starts the broker on a free loopback port with a throw-away config and data directory,
# runs every check under `timeout`, prints one line per check (and the broker log when a
# check fails), kills the broker with SIGKILL once and restarts it on the same data directory
# (durability), stops it with SIGTERM (clean exit), and ends with
# `interop: N passed, M failed`. Exits 0 only when every check passed. RUST_LOG sets the
# broker's log filter (default: debug, storage engine at info). Needs python3, mosquitto_pub, mosquitto_sub and paho-mqtt 2.x
# (`.ci/run` installs them).
set -uo pipefail

if [ $# -ne 1 ] || [ ! -x "$1" ]; then
    echo "usage: $0 PATH/TO/tern   (an executable tern binary)" >&2
    exit 2
fi
for tool in python3 mosquitto_pub mosquitto_sub timeout stdbuf; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "interop: required tool '$tool' not found (run .ci/run, or install mosquitto-clients)" >&2
        exit 2
    fi
done

TERN_BIN=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tern-interop.XXXXXX")
LOG="$WORK/broker.log"
BROKER_PID=""
HOST=127.0.0.1
# Per-check time limit in seconds; the paho scripts get a longer one (they have their own
# internal deadlines well inside it).
CHECK_TIMEOUT=${INTEROP_CHECK_TIMEOUT:-20}
PAHO_TIMEOUT=${INTEROP_PAHO_TIMEOUT:-60}

stop_broker() {
    if [ -n "$BROKER_PID" ] && kill -0 "$BROKER_PID" 2>/dev/null; then
        kill -TERM "$BROKER_PID" 2>/dev/null
        for _ in $(seq 1 100); do
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$BROKER_PID" 2>/dev/null
        wait "$BROKER_PID" 2>/dev/null
    fi
    BROKER_PID=""
}

cleanup() {
    stop_broker
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# Polls until something accepts TCP connections on HOST:PORT (up to $2 seconds).
wait_for_port() {
    python3 - "$HOST" "$PORT" "$1" <<'EOF'
import socket, sys, time
host, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        socket.create_connection((host, port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
EOF
}

# Launches the broker with $WORK/tern.toml (appending to the log) and waits until it accepts
# connections: up to 30 s, as a start on a loaded 2-core machine can be slow.
launch_broker() {
    NO_COLOR=1 RUST_LOG=${RUST_LOG:-debug,fjall=info,lsm_tree=info} "$TERN_BIN" -c "$WORK/tern.toml" >>"$LOG" 2>&1 &
    BROKER_PID=$!
    local waited=0
    while [ $waited -lt 150 ]; do
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            return 1
        fi
        if wait_for_port 0.1; then
            echo "broker: $TERN_BIN (pid $BROKER_PID) on $HOST:$PORT, data in $WORK/data"
            return 0
        fi
        waited=$((waited + 1))
        sleep 0.1
    done
    return 1
}

start_broker() {
    local attempt
    for attempt in 1 2 3; do
        PORT=$(free_port)
        mkdir -p "$WORK/data"
        printf '[[listener]]\nbind = "%s:%s"\n\n[storage]\ndir = "%s"\n' "$HOST" "$PORT" "$WORK/data" \
            >"$WORK/tern.toml"
        : >"$LOG"
        if launch_broker; then
            return 0
        fi
        echo "broker: attempt $attempt to start on port $PORT failed; log:" >&2
        sed 's/^/    | /' "$LOG" >&2
        stop_broker
    done
    return 1
}

export HOST HERE WORK
export -f wait_for_port

# ---------------------------------------------------------------------------------------------
# Checks. Each runs in its own bash under `timeout`; it prints what went wrong on stderr and
# exits non-zero on failure. PORT is exported once the broker is up.

# A unique suffix so that no check sees another check's (or an earlier run's) messages.
uniq_token() {
    echo "$$-$RANDOM$RANDOM"
}

# pubsub VERSION QOS: mosquitto_sub subscribes at QOS, mosquitto_pub publishes at QOS, the
# subscriber must print topic, QoS, retain flag and payload exactly.
check_pubsub() {
    local version=$1 qos=$2
    local tok
    tok=$(uniq_token)
    local topic="interop/$version/q$qos/$tok"
    local payload="hello $version qos$qos $tok"
    local out="$WORK/sub-$version-$qos-$tok.out"
    # -d puts the client's debug lines (and so "received SUBACK") on stdout next to the
    # message; the message line is the one starting with =>. stdbuf: line-buffered, so the
    # SUBACK line reaches the file as it happens rather than at exit.
    stdbuf -oL mosquitto_sub -h "$HOST" -p "$PORT" -V "$version" -q "$qos" -t "$topic" -C 1 -W 10 -d \
        -i "sub-$version-$qos-$tok" -F '=>%t|%q|%r|%p' >"$out" 2>&1 &
    local sub=$!
    local i=0
    until grep -q 'received SUBACK' "$out" 2>/dev/null; do
        if ! kill -0 "$sub" 2>/dev/null; then
            echo "subscriber exited before SUBACK; its output:" >&2
            sed 's/^/    sub| /' "$out" >&2
            return 1
        fi
        i=$((i + 1))
        if [ $i -gt 100 ]; then
            echo "no SUBACK within 10 s; subscriber output:" >&2
            sed 's/^/    sub| /' "$out" >&2
            kill "$sub" 2>/dev/null
            return 1
        fi
        sleep 0.1
    done
    local pub_status=0
    mosquitto_pub -h "$HOST" -p "$PORT" -V "$version" -q "$qos" -t "$topic" -m "$payload" \
        -i "pub-$version-$qos-$tok" 2>"$out.pub" || pub_status=$?
    if [ "$pub_status" -ne 0 ]; then
        echo "mosquitto_pub failed (exit $pub_status):" >&2
        sed 's/^/    pub| /' "$out.pub" >&2
        kill "$sub" 2>/dev/null
        return 1
    fi
    local status=0
    wait "$sub" || status=$?
    local got
    got=$(grep '^=>' "$out" || true)
    local want="=>$topic|$qos|0|$payload"
    if [ "$status" -ne 0 ] || [ "$got" != "$want" ]; then
        echo "subscriber exit $status; want exactly one line '$want', got:" >&2
        printf '%s\n' "$got" | sed 's/^/    got| /' >&2
        echo "  full subscriber output:" >&2
        sed 's/^/    sub| /' "$out" >&2
        return 1
    fi
}

# A retained message is delivered to a subscriber that arrives later (v3.1.1, QoS 1).
check_retained_receive() {
    local topic="interop/retained/$RETAIN_TOKEN"
    mosquitto_pub -h "$HOST" -p "$PORT" -V mqttv311 -q 1 -r -t "$topic" -m "kept $RETAIN_TOKEN" || {
        echo "mosquitto_pub -r failed" >&2
        return 1
    }
    local got status=0
    got=$(mosquitto_sub -h "$HOST" -p "$PORT" -V mqttv311 -q 1 -t "$topic" -C 1 -W 10 \
        -F '%t|%r|%p' 2>&1) || status=$?
    local want="$topic|1|kept $RETAIN_TOKEN"
    if [ "$status" -ne 0 ] || [ "$got" != "$want" ]; then
        echo "mosquitto_sub exit $status; want '$want' (topic|retain flag|payload), got '$got'" >&2
        return 1
    fi
}

# The same retained message, seen by an MQTT 5 subscriber with -v (topic and payload), through
# a wildcard filter.
check_retained_verbose_v5() {
    local topic="interop/retained/$RETAIN_TOKEN"
    local got status=0
    got=$(mosquitto_sub -h "$HOST" -p "$PORT" -V mqttv5 -q 1 -t "interop/retained/#" -C 1 -W 10 -v \
        2>&1) || status=$?
    local want="$topic kept $RETAIN_TOKEN"
    if [ "$status" -ne 0 ] || [ "$got" != "$want" ]; then
        echo "mosquitto_sub -v exit $status; want '$want', got '$got'" >&2
        return 1
    fi
}

# Publishing an empty retained message clears it: a new subscriber then gets nothing and
# mosquitto_sub -W 2 ends by timing out (exit status 27), with nothing printed.
check_retained_cleared() {
    local version=$1
    local topic="interop/retained/$RETAIN_TOKEN"
    if [ "$version" = mqttv311 ]; then
        mosquitto_pub -h "$HOST" -p "$PORT" -V mqttv311 -q 1 -r -n -t "$topic" || {
            echo "mosquitto_pub -r -n failed" >&2
            return 1
        }
    fi
    local got status=0 err="$WORK/cleared-$version.err"
    got=$(mosquitto_sub -h "$HOST" -p "$PORT" -V "$version" -q 1 -t "$topic" -C 1 -W 2 -v 2>"$err") || status=$?
    if [ "$status" -ne 27 ] || [ -n "$got" ]; then
        echo "want a timeout (exit 27) with nothing received after clearing; got exit $status," \
            "output '$got', stderr '$(cat "$err")'" >&2
        return 1
    fi
}

# Durability, part 1: a persistent-session subscriber (QoS 1) goes away; three QoS 1 messages
# are queued for it and a retained message is set, each acknowledged by the broker. The
# broker is then killed with SIGKILL (storage.durability defaults to "sync", so whatever was
# acknowledged must be on disk).
check_durable_before_kill() {
    local out status=0
    out=$(mosquitto_sub -h "$HOST" -p "$PORT" -V mqttv311 -i "durable-$DURABLE_TOKEN" -c -q 1 \
        -t "interop/durable/$DURABLE_TOKEN" -E 2>&1) || status=$?
    if [ "$status" -ne 0 ]; then
        echo "persistent subscribe (mosquitto_sub -c -E) failed with exit $status: $out" >&2
        return 1
    fi
    local i
    for i in 1 2 3; do
        mosquitto_pub -h "$HOST" -p "$PORT" -V mqttv311 -q 1 -t "interop/durable/$DURABLE_TOKEN" \
            -m "queued $i" || {
            echo "mosquitto_pub of 'queued $i' failed" >&2
            return 1
        }
    done
    mosquitto_pub -h "$HOST" -p "$PORT" -V mqttv5 -q 1 -r -t "interop/durable-retained/$DURABLE_TOKEN" \
        -m "kept across restart" || {
        echo "mosquitto_pub -r failed" >&2
        return 1
    }
}

# Durability, part 2, after the restart on the same data directory: the session is still
# there with its three queued messages, in order, and so is the retained message.
check_durable_after_restart() {
    local got status=0
    got=$(mosquitto_sub -h "$HOST" -p "$PORT" -V mqttv311 -i "durable-$DURABLE_TOKEN" -c -q 1 \
        -t "interop/durable/$DURABLE_TOKEN" -C 3 -W 10 2>&1) || status=$?
    local want
    want=$(printf 'queued 1\nqueued 2\nqueued 3')
    if [ "$status" -ne 0 ] || [ "$got" != "$want" ]; then
        echo "persistent session after restart: exit $status; want the 3 queued messages in order, got:" >&2
        printf '%s\n' "$got" | sed 's/^/    got| /' >&2
        return 1
    fi
    status=0
    got=$(mosquitto_sub -h "$HOST" -p "$PORT" -V mqttv5 -q 1 -t "interop/durable-retained/$DURABLE_TOKEN" \
        -C 1 -W 10 -F '%r|%p' 2>&1) || status=$?
    if [ "$status" -ne 0 ] || [ "$got" != "1|kept across restart" ]; then
        echo "retained message after restart: exit $status; want '1|kept across restart', got '$got'" >&2
        return 1
    fi
    # Clean up: end the persistent session and clear the retained message.
    mosquitto_sub -h "$HOST" -p "$PORT" -V mqttv311 -i "durable-$DURABLE_TOKEN" -t x -E >/dev/null 2>&1 || true
    mosquitto_pub -h "$HOST" -p "$PORT" -r -n -t "interop/durable-retained/$DURABLE_TOKEN" || true
}

check_paho_persistent() {
    python3 "$HERE/paho_persistent.py" "$HOST" "$PORT"
}

check_paho_v5_basic() {
    python3 "$HERE/paho_v5_basic.py" "$HOST" "$PORT"
}

# One MQTT 5 feature check of paho_v5_features.py (shared_balance, shared_redeliver,
# message_expiry, will_delay, topic_alias, request_response; see the script's docstring).
check_paho_v5_feature() {
    python3 "$HERE/paho_v5_features.py" "$HOST" "$PORT" "$1"
}

export -f uniq_token check_pubsub check_retained_receive check_retained_verbose_v5 check_retained_cleared \
    check_durable_before_kill check_durable_after_restart check_paho_persistent check_paho_v5_basic \
    check_paho_v5_feature

# ---------------------------------------------------------------------------------------------

PASSED=0
FAILED=0
FAILED_NAMES=()

# run_check NAME TIMEOUT FUNCTION [ARGS...]
run_check() {
    local name=$1 limit=$2
    shift 2
    local log_mark
    log_mark=$(wc -l <"$LOG" 2>/dev/null || echo 0)
    local start=$SECONDS status=0
    timeout --kill-after=5 "$limit" bash -c '"$@"' _ "$@" >"$WORK/check.out" 2>&1 || status=$?
    local took=$((SECONDS - start))
    if [ "$status" -eq 0 ]; then
        PASSED=$((PASSED + 1))
        printf 'ok    %-30s (%ss)\n' "$name" "$took"
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
            printf 'FAIL  %-30s (timed out after %ss)\n' "$name" "$limit"
        else
            printf 'FAIL  %-30s (exit %s, %ss)\n' "$name" "$status" "$took"
        fi
        sed 's/^/    | /' "$WORK/check.out"
        echo "    broker log during this check:"
        tail -n +"$((log_mark + 1))" "$LOG" | tail -n 200 | sed 's/^/    log| /'
    fi
}

if ! start_broker; then
    echo "interop: the broker did not start"
    echo "interop: 0 passed, 1 failed"
    exit 1
fi
export PORT

for version in mqttv311 mqttv5; do
    for qos in 0 1 2; do
        run_check "pubsub_${version}_qos${qos}" "$CHECK_TIMEOUT" check_pubsub "$version" "$qos"
    done
done

RETAIN_TOKEN=$(uniq_token)
export RETAIN_TOKEN
run_check retained_receive_v311 "$CHECK_TIMEOUT" check_retained_receive
run_check retained_verbose_v5 "$CHECK_TIMEOUT" check_retained_verbose_v5
run_check retained_cleared_v311 "$CHECK_TIMEOUT" check_retained_cleared mqttv311
run_check retained_cleared_v5 "$CHECK_TIMEOUT" check_retained_cleared mqttv5

run_check paho_persistent_v311 "$PAHO_TIMEOUT" check_paho_persistent
run_check paho_v5_basic "$PAHO_TIMEOUT" check_paho_v5_basic
for feature in shared_balance shared_redeliver message_expiry will_delay topic_alias request_response; do
    run_check "paho_v5_$feature" "$PAHO_TIMEOUT" check_paho_v5_feature "$feature"
done

# Durability across a crash: what the broker acknowledged must survive SIGKILL and a restart
# on the same data directory and port.
DURABLE_TOKEN=$(uniq_token)
export DURABLE_TOKEN
before_failed=$FAILED
run_check durable_before_sigkill "$CHECK_TIMEOUT" check_durable_before_kill
if [ "$FAILED" -eq "$before_failed" ]; then
    kill -KILL "$BROKER_PID" 2>/dev/null
    wait "$BROKER_PID" 2>/dev/null
    BROKER_PID=""
    echo "----- interop: broker killed with SIGKILL; restarting on the same data directory -----" >>"$LOG"
    if launch_broker; then
        run_check durable_after_sigkill_restart "$CHECK_TIMEOUT" check_durable_after_restart
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=(durable_after_sigkill_restart sigterm_clean_exit)
        printf 'FAIL  %-30s (the broker did not start again on the same data directory)\n' \
            durable_after_sigkill_restart
        tail -n 60 "$LOG" | sed 's/^/    log| /'
        stop_broker
        echo "failed checks: ${FAILED_NAMES[*]}"
        echo "interop: $PASSED passed, $((FAILED + 1)) failed"
        exit 1
    fi
else
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=(durable_after_sigkill_restart)
    printf 'FAIL  %-30s (skipped: the part before the kill failed)\n' durable_after_sigkill_restart
fi

# The broker must still be running after all of that, and stop cleanly (exit 0) on SIGTERM.
if kill -0 "$BROKER_PID" 2>/dev/null; then
    kill -TERM "$BROKER_PID"
    status=0
    stopped=0
    for _ in $(seq 1 150); do
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            stopped=1
            break
        fi
        sleep 0.1
    done
    if [ $stopped -eq 1 ]; then
        wait "$BROKER_PID" || status=$?
        BROKER_PID=""
        if [ "$status" -eq 0 ]; then
            PASSED=$((PASSED + 1))
            printf 'ok    %-30s\n' "sigterm_clean_exit"
        else
            FAILED=$((FAILED + 1))
            FAILED_NAMES+=(sigterm_clean_exit)
            printf 'FAIL  %-30s (exit %s after SIGTERM)\n' "sigterm_clean_exit" "$status"
            tail -n 50 "$LOG" | sed 's/^/    log| /'
        fi
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=(sigterm_clean_exit)
        printf 'FAIL  %-30s (still running 15 s after SIGTERM)\n' "sigterm_clean_exit"
        tail -n 50 "$LOG" | sed 's/^/    log| /'
    fi
else
    status=0
    wait "$BROKER_PID" || status=$?
    BROKER_PID=""
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=(sigterm_clean_exit)
    printf 'FAIL  %-30s (broker had already exited with status %s)\n' "sigterm_clean_exit" "$status"
    tail -n 100 "$LOG" | sed 's/^/    log| /'
fi

if [ "$FAILED" -gt 0 ]; then
    echo "failed checks: ${FAILED_NAMES[*]}"
fi
echo "interop: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
