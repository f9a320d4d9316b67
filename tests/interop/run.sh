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
# broker's log filter (default: debug, storage engine at info).
#
# Then a second broker, with its own config, runs the security checks: a TLS listener
# (certificates made here with openssl), mTLS listeners (client certificate required; CN as the
# user name), a password file written by mosquitto_passwd ($7$, $6$) and `tern passwd`
# (argon2id), an ACL file, and a SIGHUP reload of that ACL file.
#
# Last, the bridge checks (tests/interop/bridge.sh): tern bridging to a real mosquitto and
# mosquitto bridging to tern, each check with its own pair of brokers on free ports.
#
# Needs python3, mosquitto_pub, mosquitto_sub, mosquitto_passwd and the mosquitto broker (Debian
# package mosquitto), openssl and paho-mqtt 2.x (`.ci/run` installs them).
set -uo pipefail

if [ $# -ne 1 ] || [ ! -x "$1" ]; then
    echo "usage: $0 PATH/TO/tern   (an executable tern binary)" >&2
    exit 2
fi
for tool in python3 mosquitto_pub mosquitto_sub mosquitto_passwd openssl timeout stdbuf; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "interop: required tool '$tool' not found (run .ci/run, or install mosquitto-clients, mosquitto and openssl)" >&2
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

# Launches the broker with CONFIG (default $WORK/tern.toml), appending to $LOG, and waits until
# it accepts connections on $PORT: up to 30 s, as a start on a loaded 2-core machine can be slow.
launch_broker() {
    local config=${1:-$WORK/tern.toml}
    NO_COLOR=1 RUST_LOG=${RUST_LOG:-debug,fjall=info,lsm_tree=info} "$TERN_BIN" -c "$config" >>"$LOG" 2>&1 &
    BROKER_PID=$!
    local waited=0
    while [ $waited -lt 150 ]; do
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            return 1
        fi
        if wait_for_port 0.1; then
            echo "broker: $TERN_BIN (pid $BROKER_PID) on $HOST:$PORT, config $config"
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
# Security checks, against the second broker (see secure_setup below). Its listeners, all on
# HOST: S_TCP plain TCP; S_TLS TLS (server certificate only); S_MTLS TLS with a client
# certificate required; S_IDENT the same with the certificate's CN as the user name; S_WRONG
# TLS with a certificate for another host name. Users (password file $SEC/passwd): alice
# ($7$, mosquitto_passwd), bob ($6$, mosquitto_passwd -H sha512), carol (argon2id, tern passwd).
# Clients connect by address (-h 127.0.0.1) and check the server certificate against
# $SEC/ca.crt, so the address must be in its subjectAltName: a real host name check, never
# --insecure.

# write_acl NEWS_RIGHT: the ACL file; alice's right on news/# is NEWS_RIGHT (read, or deny
# once sighup_acl_reload revokes it). Written beside the file and renamed into place.
write_acl() {
    cat >"$SEC/acl.new" <<ACL
# tern interop ACL
user alice
topic readwrite alice/#
topic $1 news/#
user bob
topic readwrite bob/#
topic read alice/#
user carol
topic readwrite carol/#
topic readwrite news/#
ACL
    mv "$SEC/acl.new" "$SEC/acl"
}

# sec_sub_start OUT MOSQUITTO_SUB_ARGS...: a QoS 1 mosquitto_sub for one message (-C 1 -W 10,
# lines '=>topic|payload') in the background (pid in SUB_PID, output in OUT); returns once its
# SUBACK granted the subscription, fails if it was refused or never came.
sec_sub_start() {
    local out=$1
    shift
    stdbuf -oL mosquitto_sub -d -q 1 -C 1 -W 10 -F '=>%t|%p' "$@" >"$out" 2>&1 &
    SUB_PID=$!
    local deadline=$((SECONDS + 10))
    until grep -q '^Subscribed' "$out" 2>/dev/null; do
        if ! kill -0 "$SUB_PID" 2>/dev/null; then
            echo "subscriber (mosquitto_sub $*) exited before its SUBACK; its output:" >&2
            sed 's/^/    sub| /' "$out" >&2
            return 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            echo "no SUBACK within 10 s; subscriber output:" >&2
            sed 's/^/    sub| /' "$out" >&2
            kill "$SUB_PID" 2>/dev/null
            return 1
        fi
        sleep 0.05
    done
    if ! grep -qE '^Subscribed \(mid: [0-9]+\): [0-2]$' "$out"; then
        echo "subscription refused (mosquitto_sub $*):" >&2
        sed 's/^/    sub| /' "$out" >&2
        kill "$SUB_PID" 2>/dev/null
        return 1
    fi
}

# sec_sub_expect OUT TOPIC PAYLOAD: the subscriber started by sec_sub_start exits 0 having
# received exactly that one message (so nothing published before it reached the subscriber).
sec_sub_expect() {
    local out=$1 want="=>$2|$3" status=0 got
    wait "$SUB_PID" || status=$?
    got=$(grep '^=>' "$out" || true)
    if [ "$status" -ne 0 ] || [ "$got" != "$want" ]; then
        echo "subscriber exit $status; want exactly '$want', got:" >&2
        printf '%s\n' "$got" | sed 's/^/    got| /' >&2
        echo "  full subscriber output:" >&2
        sed 's/^/    sub| /' "$out" >&2
        return 1
    fi
}

# sec_pub_ok MOSQUITTO_PUB_ARGS...: a publish that must succeed (exit 0, nothing on stderr).
sec_pub_ok() {
    local err status=0
    err=$(mosquitto_pub "$@" 2>&1 >/dev/null) || status=$?
    if [ "$status" -ne 0 ] || [ -n "$err" ]; then
        echo "mosquitto_pub $* : exit $status, stderr '$err' (want exit 0, no stderr)" >&2
        return 1
    fi
}

# sec_pub_refused_tls OUT STATUSES WANT UNWANTED MOSQUITTO_PUB_ARGS...: a publish whose TLS
# handshake fails: mosquitto_pub exits with one of STATUSES (space-separated), its output
# matches the extended regex WANT and not UNWANTED ("-": no such test), and it never sees a
# CONNACK.
sec_pub_refused_tls() {
    local out=$1 statuses=$2 want=$3 unwanted=$4 status=0
    shift 4
    timeout 10 mosquitto_pub -d "$@" >"$out" 2>&1 || status=$?
    if [[ " $statuses " != *" $status "* ]] || ! grep -qE "$want" "$out" \
        || { [ "$unwanted" != - ] && grep -qE "$unwanted" "$out"; } || grep -q 'received CONNACK' "$out"; then
        echo "want mosquitto_pub to exit with one of ($statuses), output matching '$want' and not" \
            "'$unwanted', no CONNACK; got exit $status:" >&2
        sed 's/^/    pub| /' "$out" >&2
        return 1
    fi
}

# TLS with the server certificate checked (--cafile, address in the SAN): QoS 1 both ways.
check_tls_pubsub() {
    local version=$1 tok
    tok=$(uniq_token)
    local topic="alice/tls/$version/$tok" out="$WORK/tls-$version-$tok.out"
    local tls=(-h "$HOST" -p "$S_TLS" --cafile "$SEC/ca.crt" -u alice -P secret -V "$version")
    sec_sub_start "$out" "${tls[@]}" -t "$topic" || return 1
    sec_pub_ok "${tls[@]}" -q 1 -t "$topic" -m "over tls $tok" || return 1
    sec_sub_expect "$out" "$topic" "over tls $tok"
}

# A client that trusts another CA refuses tern's certificate. mosquitto_pub 2.0.11 prints
# "OpenSSL Error[0]: ...certificate verify failed" and exits 8 ("Error: A TLS error occurred.")
# or, when the handshake fails inside the connect call, 1 ("Unable to connect (A TLS error
# occurred.)"): both happen, about 8 times in 10 the first.
check_tls_untrusted_server() {
    sec_pub_refused_tls "$WORK/tls-untrusted.out" '1 8' 'certificate verify failed' - \
        -h "$HOST" -p "$S_TLS" --cafile "$SEC/foreign-ca.crt" -u alice -P secret -q 1 -t alice/tls/untrusted -m x
}

# The client does check the host name: a certificate from the right CA for another name is
# refused (so tls_pubsub_* passing means 127.0.0.1 matched the SAN); mosquitto 2.0.11: "Error:
# host name verification failed.", exit 8 or 1 as above.
check_tls_wrong_server_name() {
    sec_pub_refused_tls "$WORK/tls-wrongname.out" '1 8' 'host name verification failed' - \
        -h "$HOST" -p "$S_WRONG" --cafile "$SEC/ca.crt" -u alice -P secret -q 1 -t alice/tls/wrongname -m x
}

# mTLS: the CA-signed client certificate is accepted.
check_mtls_client_cert() {
    local tok
    tok=$(uniq_token)
    local topic="alice/mtls/$tok" out="$WORK/mtls-$tok.out"
    sec_sub_start "$out" -h "$HOST" -p "$S_TCP" -u alice -P secret -t "$topic" || return 1
    sec_pub_ok -h "$HOST" -p "$S_MTLS" --cafile "$SEC/ca.crt" --cert "$SEC/alice.crt" --key "$SEC/alice.key" \
        -u alice -P secret -V mqttv5 -q 1 -t "$topic" -m "with cert $tok" || return 1
    sec_sub_expect "$out" "$topic" "with cert $tok"
}

# mTLS refusals: no client certificate, or one from an unrelated CA (with CN alice). The
# broker ends the handshake after the client's Finished (TLS 1.3): mosquitto_pub and
# mosquitto_sub 2.0.11 print "Error: The connection was lost." and exit 7 (60 times in 60
# here; 8, a TLS error, is accepted too, but not the client refusing the server's
# certificate), no CONNACK; a subscriber on the topic gets only the marker published after.
check_mtls_refused() {
    local kind=$1 tok
    tok=$(uniq_token)
    local topic="alice/mtls/$kind/$tok" out="$WORK/mtls-$kind-$tok.out"
    local cert=()
    if [ "$kind" = foreign_ca ]; then
        cert=(--cert "$SEC/mallory.crt" --key "$SEC/mallory.key")
    fi
    sec_sub_start "$out" -h "$HOST" -p "$S_TCP" -u alice -P secret -t "$topic" || return 1
    local version
    for version in mqttv311 mqttv5; do
        sec_pub_refused_tls "$out.pub-$version" '7 8' 'connection was lost|TLS error' 'verify failed' \
            -h "$HOST" -p "$S_MTLS" --cafile "$SEC/ca.crt" "${cert[@]}" -u alice -P secret -V "$version" -q 1 -t "$topic" -m "refused $version" || {
            kill "$SUB_PID" 2>/dev/null
            return 1
        }
    done
    # mosquitto_sub is refused the same way.
    local status=0
    timeout 10 mosquitto_sub -h "$HOST" -p "$S_MTLS" --cafile "$SEC/ca.crt" "${cert[@]}" -u alice -P secret \
        -t "$topic" -C 1 -W 5 >"$out.sub2" 2>&1 || status=$?
    if { [ "$status" -ne 7 ] && [ "$status" -ne 8 ]; } || ! grep -qE 'connection was lost|TLS error' "$out.sub2" \
        || grep -q 'verify failed' "$out.sub2"; then
        echo "mosquitto_sub over mTLS ($kind): want exit 7 or 8, 'The connection was lost'; got exit $status:" >&2
        sed 's/^/    sub| /' "$out.sub2" >&2
        kill "$SUB_PID" 2>/dev/null
        return 1
    fi
    sec_pub_ok -h "$HOST" -p "$S_TCP" -u alice -P secret -q 1 -t "$topic" -m "marker $tok" || return 1
    sec_sub_expect "$out" "$topic" "marker $tok"
}

# use_identity_as_username: the certificate's CN (alice) is the user, with no -u/-P; the ACL
# lets alice write alice/#. bob (read on alice/#) receives it.
check_identity_allowed() {
    local tok
    tok=$(uniq_token)
    local topic="alice/ident/$tok" out="$WORK/ident-$tok.out"
    sec_sub_start "$out" -h "$HOST" -p "$S_TCP" -u bob -P bobpass -t "$topic" || return 1
    sec_pub_ok -h "$HOST" -p "$S_IDENT" --cafile "$SEC/ca.crt" --cert "$SEC/alice.crt" --key "$SEC/alice.key" \
        -V mqttv5 -q 1 -t "$topic" -m "as alice $tok" || return 1
    sec_sub_expect "$out" "$topic" "as alice $tok"
}

# use_identity_as_username: alice may not write bob/#. v5 QoS 1: PUBACK 0x87; mosquitto_pub
# 2.0.11 prints "Warning: Publish 1 failed: Not authorized." on stderr and still exits 0.
# The same with -u bob -P (right password): the CONNECT user name is not used on this
# listener. bob, subscribed, gets only the marker he publishes afterwards.
check_identity_denied_v5() {
    local tok
    tok=$(uniq_token)
    local topic="bob/ident/$tok" out="$WORK/ident-denied-$tok.out"
    sec_sub_start "$out" -h "$HOST" -p "$S_TCP" -u bob -P bobpass -t "$topic" || return 1
    local as_bob
    for as_bob in "" "-u bob -P bobpass"; do
        local status=0
        # shellcheck disable=SC2086
        mosquitto_pub -d -h "$HOST" -p "$S_IDENT" --cafile "$SEC/ca.crt" --cert "$SEC/alice.crt" \
            --key "$SEC/alice.key" $as_bob -V mqttv5 -q 1 -t "$topic" -m "denied $tok" >"$out.pub" 2>&1 || status=$?
        if [ "$status" -ne 0 ] || ! grep -q 'received PUBACK (Mid: 1, RC:135)' "$out.pub" \
            || ! grep -q 'Warning: Publish 1 failed: Not authorized' "$out.pub"; then
            echo "want PUBACK RC:135 and 'Publish 1 failed: Not authorized', exit 0 (extra args '$as_bob'); exit $status:" >&2
            sed 's/^/    pub| /' "$out.pub" >&2
            kill "$SUB_PID" 2>/dev/null
            return 1
        fi
    done
    sec_pub_ok -h "$HOST" -p "$S_TCP" -u bob -P bobpass -q 1 -t "$topic" -m "marker $tok" || return 1
    sec_sub_expect "$out" "$topic" "marker $tok"
}

# -u/-P against the password file over TCP: USER's entry (of the expected hash kind) works
# for a QoS 1 round trip on USER/#.
check_password_ok() {
    local user=$1 pass=$2 prefix=$3 version=$4 tok
    local line
    line=$(grep "^$user:" "$SEC/passwd")
    if [ "${line#"$user:$prefix"}" = "$line" ]; then
        echo "$SEC/passwd has no '$user:$prefix...' line:" >&2
        sed 's/^/    passwd| /' "$SEC/passwd" >&2
        return 1
    fi
    tok=$(uniq_token)
    local topic="$user/pw/$tok" out="$WORK/pw-$user-$tok.out"
    sec_sub_start "$out" -h "$HOST" -p "$S_TCP" -u "$user" -P "$pass" -V "$version" -t "$topic" || return 1
    sec_pub_ok -h "$HOST" -p "$S_TCP" -u "$user" -P "$pass" -V "$version" -q 1 -t "$topic" -m "pw $tok" || return 1
    sec_sub_expect "$out" "$topic" "pw $tok"
}

# Refused logins; mosquitto_pub exits with the CONNACK code and prints it. 3.1.1: CONNACK 5,
# exit 5, "Connection error: Connection Refused: not authorised."; v5 wrong password or
# unknown user: 0x86, exit 134, "Connection error: Bad User Name or Password"; v5 anonymous:
# 0x87, exit 135, "Connection error: Not authorized". mosquitto_sub does the same.
check_login_refused() {
    local kind=$1 version=$2
    local login=()
    case $kind in
        wrong_password) login=(-u alice -P not-the-password) ;;
        unknown_user) login=(-u nobody -P secret) ;;
        anonymous) login=() ;;
    esac
    local want_status want_msg
    if [ "$version" = mqttv311 ]; then
        want_status=5 want_msg='Connection error: Connection Refused: not authorised.'
    elif [ "$kind" = anonymous ]; then
        want_status=135 want_msg='Connection error: Not authorized'
    else
        want_status=134 want_msg='Connection error: Bad User Name or Password'
    fi
    local tool out="$WORK/login-$kind-$version.out"
    for tool in mosquitto_pub mosquitto_sub; do
        local args=(-t alice/login -C 1 -W 5)
        [ $tool = mosquitto_pub ] && args=(-q 1 -t alice/login -m x)
        local status=0
        timeout 10 $tool -h "$HOST" -p "$S_TCP" "${login[@]}" -V "$version" "${args[@]}" >"$out" 2>&1 || status=$?
        if [ "$status" -ne "$want_status" ] || ! grep -qF "$want_msg" "$out"; then
            echo "$tool ($kind, $version): want exit $want_status and '$want_msg'; got exit $status:" >&2
            sed 's/^/    out| /' "$out" >&2
            return 1
        fi
    done
}

# ACL: bob has only read on alice/#: he receives alice's message.
check_acl_read_only() {
    local tok
    tok=$(uniq_token)
    local topic="alice/acl/$tok" out="$WORK/acl-ro-$tok.out"
    sec_sub_start "$out" -h "$HOST" -p "$S_TCP" -u bob -P bobpass -V mqttv5 -t 'alice/acl/#' || return 1
    sec_pub_ok -h "$HOST" -p "$S_TCP" -u alice -P secret -q 1 -t "$topic" -m "for readers $tok" || return 1
    sec_sub_expect "$out" "$topic" "for readers $tok"
}

# ACL: alice may not subscribe to bob/#. SUBACK 0x80 (3.1.1) / 0x87 (v5); mosquitto_sub
# 2.0.11 prints "Subscribed (mid: 1): 128" / "...: 135" (with -d), then "All subscription
# requests were denied." on stderr, disconnects and exits 0.
check_acl_subscribe_denied() {
    local version=$1 want_code=128 status=0
    [ "$version" = mqttv5 ] && want_code=135
    local out="$WORK/acl-subdenied-$version.out"
    timeout 10 mosquitto_sub -d -h "$HOST" -p "$S_TCP" -u alice -P secret -V "$version" -q 1 -t 'bob/#' \
        -C 1 -W 5 >"$out" 2>&1 || status=$?
    if [ "$status" -ne 0 ] || ! grep -qx "Subscribed (mid: 1): $want_code" "$out" \
        || ! grep -q 'All subscription requests were denied' "$out"; then
        echo "want SUBACK $want_code, 'All subscription requests were denied.', exit 0; got exit $status:" >&2
        sed 's/^/    sub| /' "$out" >&2
        return 1
    fi
}

# ACL, 3.1.1: a denied QoS 1 publish is acknowledged (mosquitto_pub exits 0, no warning) and
# dropped: bob, subscribed, gets only the marker he publishes afterwards.
check_acl_publish_denied_v311() {
    local tok
    tok=$(uniq_token)
    local topic="bob/acl/$tok" out="$WORK/acl-pubdenied-$tok.out"
    sec_sub_start "$out" -h "$HOST" -p "$S_TCP" -u bob -P bobpass -t "$topic" || return 1
    sec_pub_ok -h "$HOST" -p "$S_TCP" -u alice -P secret -V mqttv311 -q 1 -t "$topic" -m "dropped $tok" || return 1
    sec_pub_ok -h "$HOST" -p "$S_TCP" -u bob -P bobpass -q 1 -t "$topic" -m "marker $tok" || return 1
    sec_sub_expect "$out" "$topic" "marker $tok"
}

# SIGHUP: alice reads carol's news/... message; the ACL is rewritten to deny alice news/#
# and the broker gets SIGHUP; polled (10 s deadline) until a fresh subscriber of alice's is
# refused (SUBACK 0x80) and receives nothing. A try that is still granted must still receive;
# -W 3 bounds a try that races the reload (granted, then its delivery refused).
check_sighup_acl_reload() {
    local broker_pid=$1 tok
    tok=$(uniq_token)
    local topic="news/$tok" out="$WORK/sighup-$tok.out"
    sec_sub_start "$out" -h "$HOST" -p "$S_TCP" -u alice -P secret -t "$topic" || return 1
    sec_pub_ok -h "$HOST" -p "$S_TCP" -u carol -P carolpass -q 1 -t "$topic" -m "before $tok" || return 1
    sec_sub_expect "$out" "$topic" "before $tok" || {
        echo "(alice should read news/# before the reload)" >&2
        return 1
    }
    write_acl deny
    kill -HUP "$broker_pid" || return 1
    local deadline=$((SECONDS + 12)) n=0
    while :; do
        n=$((n + 1))
        local try="$out.$n" status=0
        stdbuf -oL mosquitto_sub -d -q 1 -C 1 -W 3 -F '=>%t|%p' -h "$HOST" -p "$S_TCP" -u alice -P secret \
            -t "$topic" >"$try" 2>&1 &
        local sub=$!
        until grep -q '^Subscribed' "$try" 2>/dev/null || ! kill -0 "$sub" 2>/dev/null; do
            sleep 0.05
        done
        if grep -qx 'Subscribed (mid: 1): 128' "$try"; then
            wait "$sub" || status=$?
            if [ "$status" -eq 0 ] && ! grep -q '^=>' "$try"; then
                return 0
            fi
            echo "after SUBACK 128: exit $status, output:" >&2
            sed 's/^/    sub| /' "$try" >&2
            return 1
        fi
        # Still granted (reload not applied yet): it must still receive, then try again.
        sec_pub_ok -h "$HOST" -p "$S_TCP" -u carol -P carolpass -q 1 -t "$topic" -m "during $tok $n" || return 1
        wait "$sub" || status=$?
        if [ $SECONDS -ge $deadline ]; then
            echo "alice's subscription to $topic still granted 12 s after SIGHUP ($n tries); last:" >&2
            sed 's/^/    sub| /' "$try" >&2
            return 1
        fi
        sleep 0.1
    done
}

export -f write_acl sec_sub_start sec_sub_expect sec_pub_ok sec_pub_refused_tls check_tls_pubsub \
    check_tls_untrusted_server check_tls_wrong_server_name check_mtls_client_cert check_mtls_refused \
    check_identity_allowed check_identity_denied_v5 check_password_ok check_login_refused \
    check_acl_read_only check_acl_subscribe_denied check_acl_publish_denied_v311 check_sighup_acl_reload

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

# ---------------------------------------------------------------------------------------------
# The second broker, for the security checks: its own config, data, log and files in $SEC.
SEC="$WORK/secure"
export SEC

# Certificates (as certs/README.md documents, with short lifetimes and mostly P-256 keys to
# stay fast), the password file and the ACL file.
secure_setup() (
    set -e
    mkdir -p "$SEC"
    cd "$SEC"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1)
    # A CA; the server's certificate (RSA, as in the README) for localhost and 127.0.0.1; one
    # for another name; alice's client certificate.
    openssl req -x509 "${ec[@]}" -sha256 -days 2 -nodes -keyout ca.key -out ca.crt -subj "/CN=tern interop CA"
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost"
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -sha256 \
        -extfile server.ext -out server.crt
    openssl req "${ec[@]}" -nodes -keyout wrongname.key -out wrongname.csr -subj "/CN=elsewhere.invalid"
    printf 'subjectAltName=DNS:elsewhere.invalid\nextendedKeyUsage=serverAuth\n' >wrongname.ext
    openssl x509 -req -in wrongname.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -sha256 \
        -extfile wrongname.ext -out wrongname.crt
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl req "${ec[@]}" -nodes -keyout alice.key -out alice.csr -subj "/CN=alice"
    openssl x509 -req -in alice.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -sha256 \
        -extfile client.ext -out alice.crt
    # An unrelated CA, and a client certificate from it that also says CN=alice.
    openssl req -x509 "${ec[@]}" -sha256 -days 2 -nodes -keyout foreign-ca.key -out foreign-ca.crt \
        -subj "/CN=foreign CA"
    openssl req "${ec[@]}" -nodes -keyout mallory.key -out mallory.csr -subj "/CN=alice"
    openssl x509 -req -in mallory.csr -CA foreign-ca.crt -CAkey foreign-ca.key -CAcreateserial -days 2 \
        -sha256 -extfile client.ext -out mallory.crt
    openssl verify -CAfile ca.crt server.crt wrongname.crt alice.crt
    # Password file: mosquitto_passwd ($7$ PBKDF2-SHA512 by default, $6$ with -H sha512), then
    # tern passwd (argon2id) adding to the same file.
    mosquitto_passwd -b -c passwd alice secret
    mosquitto_passwd -H sha512 -b passwd bob bobpass
    "$TERN_BIN" passwd -b passwd carol carolpass
    cat passwd
    write_acl read
)

# Starts the second broker on free ports (three attempts, like start_broker); PORT = S_TCP.
start_secure_broker() {
    local attempt p ok
    for attempt in 1 2 3; do
        S_TLS=$(free_port)
        S_MTLS=$(free_port)
        S_IDENT=$(free_port)
        S_WRONG=$(free_port)
        S_TCP=$(free_port)
        PORT=$S_TCP
        local tls="cert = \"$SEC/server.crt\", key = \"$SEC/server.key\""
        local mtls="$tls, client_ca = \"$SEC/ca.crt\", require_client_cert = true"
        cat >"$SEC/tern.toml" <<TOML
[[listener]]
bind = "$HOST:$S_TLS"
kind = "tls"
tls = { $tls }

[[listener]]
bind = "$HOST:$S_MTLS"
kind = "tls"
tls = { $mtls }

[[listener]]
bind = "$HOST:$S_IDENT"
kind = "tls"
tls = { $mtls, use_identity_as_username = true }

[[listener]]
bind = "$HOST:$S_WRONG"
kind = "tls"
tls = { cert = "$SEC/wrongname.crt", key = "$SEC/wrongname.key" }

[[listener]]
bind = "$HOST:$S_TCP"

[storage]
dir = "$SEC/data"

[auth]
password_file = "$SEC/passwd"
acl_file = "$SEC/acl"
TOML
        : >"$LOG"
        if launch_broker "$SEC/tern.toml"; then
            ok=1
            for p in $S_TLS $S_MTLS $S_IDENT $S_WRONG; do
                PORT=$p wait_for_port 10 || ok=0
            done
            [ $ok -eq 1 ] && return 0
        fi
        echo "secure broker: attempt $attempt (ports $S_TLS $S_MTLS $S_IDENT $S_WRONG $S_TCP) failed; log:" >&2
        sed 's/^/    | /' "$LOG" >&2
        stop_broker
    done
    return 1
}

stop_broker
LOG="$WORK/secure-broker.log"
if ! secure_setup >"$WORK/secure-setup.log" 2>&1; then
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=(secure_setup)
    printf 'FAIL  %-30s (certificates, password or ACL file)\n' secure_setup
    sed 's/^/    | /' "$WORK/secure-setup.log"
elif ! start_secure_broker; then
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=(secure_broker_start)
    printf 'FAIL  %-30s (the second broker did not start)\n' secure_broker_start
else
    export S_TCP S_TLS S_MTLS S_IDENT S_WRONG PORT
    run_check tls_pubsub_v311 "$CHECK_TIMEOUT" check_tls_pubsub mqttv311
    run_check tls_pubsub_v5 "$CHECK_TIMEOUT" check_tls_pubsub mqttv5
    run_check tls_untrusted_server_refused "$CHECK_TIMEOUT" check_tls_untrusted_server
    run_check tls_wrong_server_name_refused "$CHECK_TIMEOUT" check_tls_wrong_server_name
    run_check mtls_client_cert_ok "$CHECK_TIMEOUT" check_mtls_client_cert
    run_check mtls_no_client_cert_refused "$CHECK_TIMEOUT" check_mtls_refused none
    run_check mtls_foreign_ca_cert_refused "$CHECK_TIMEOUT" check_mtls_refused foreign_ca
    run_check tls_identity_acl_allowed "$CHECK_TIMEOUT" check_identity_allowed
    run_check tls_identity_acl_denied_v5 "$CHECK_TIMEOUT" check_identity_denied_v5
    run_check passwd_mosquitto_7_alice "$CHECK_TIMEOUT" check_password_ok alice secret '$7$' mqttv311
    run_check passwd_mosquitto_6_bob "$CHECK_TIMEOUT" check_password_ok bob bobpass '$6$' mqttv5
    run_check passwd_tern_argon2id_carol "$CHECK_TIMEOUT" check_password_ok carol carolpass '$argon2id$' mqttv311
    for kind in wrong_password unknown_user anonymous; do
        for version in mqttv311 mqttv5; do
            run_check "login_${kind}_${version#mqtt}" "$CHECK_TIMEOUT" check_login_refused "$kind" "$version"
        done
    done
    run_check acl_read_only_subscriber "$CHECK_TIMEOUT" check_acl_read_only
    run_check acl_subscribe_denied_v311 "$CHECK_TIMEOUT" check_acl_subscribe_denied mqttv311
    run_check acl_subscribe_denied_v5 "$CHECK_TIMEOUT" check_acl_subscribe_denied mqttv5
    run_check acl_pub_denied_v311_dropped "$CHECK_TIMEOUT" check_acl_publish_denied_v311
    run_check sighup_acl_reload "$CHECK_TIMEOUT" check_sighup_acl_reload "$BROKER_PID"
    stop_broker
fi

# ---------------------------------------------------------------------------------------------
# Bridges, with a real mosquitto in both roles (each check starts its own pair of brokers).
# shellcheck source=tests/interop/bridge.sh
source "$HERE/bridge.sh"

if [ "$FAILED" -gt 0 ]; then
    echo "failed checks: ${FAILED_NAMES[*]}"
fi
echo "interop: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
