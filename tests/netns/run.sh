#!/usr/bin/env bash
# Bridge test across a real (virtual) network: two tern brokers in two network namespaces,
# joined by a veth pair, with the link cut mid-stream and, separately, the bridging broker
# killed with SIGKILL mid-stream; no acknowledged QoS 1 message may be lost.
#
#   tests/netns/run.sh target/release/tern
#
# The network: namespaces A and B (`ip netns add`), a veth pair between them, 10.77.0.1/24 in
# A and 10.77.0.2/24 in B. tern "site" runs in A (listener 127.0.0.1:1883) with a bridge
# named `cloud` (keepalive = 5 s) sending `out/#` at QoS 1 to tern "cloud" in B (listener
# 10.77.0.2:1883, so `auth.allow_anonymous = true`). Each scenario starts both brokers afresh
# (own config file and data directories); the MQTT clients are tests/netns/netns.py (paho-mqtt
# 2.x), run in the namespace of the broker they talk to:
#   - a persistent subscriber (MQTT 5, QoS 1) on cloud, in B, recording every number it gets;
#   - a watcher of `$SYS/broker/connection/cloud/state` on site, in A, recording the values;
#   - a publisher on site, in A: QoS 1 messages numbered 1..N at a steady rate (default 3,000
#     over 15 s), recording each number whose PUBACK it has read.
#
# Scenarios (each passes or fails on its own):
#   linkcut-v5, linkcut-v311: once the subscriber has a fifth of the messages, the link is cut
#     (every packet lost both ways: `tc qdisc ... netem loss 100%`, or where the kernel has no
#     netem, neighbour entries that send every frame to a MAC address nobody has; see below)
#     until the state topic on site reads 0 (the bridge's keep-alive noticed: within 7.5 to
#     10 s), plus a second; then restored. Every
#     number 1..N must reach the subscriber (duplicates are allowed at QoS 1, and counted), and
#     the state must read 1 before the cut, 0 during the outage, 1 at the end.
#   kill9-v5: once the publisher has K acknowledgements (random, N/4..N/2), site gets SIGKILL
#     and is started again on the same data directory; the publisher (a persistent session)
#     reconnects and sends again what was not acknowledged. Every acknowledged number must
#     reach the subscriber, and in the end all N must have been acknowledged.
#   cluster-partition: tern nodes n1 (in A) and n2 (in B, with three nats-servers forming one
#     JetStream cluster) of one tern cluster; a QoS 1 publisher on n1, a persistent subscriber
#     on n2. The link is cut for 6.5 s: once n1's ack timeout (2 s) has passed, no success
#     PUBACK may reach the publisher until the link is back (n1 answers 0x80: it cannot
#     replicate); afterwards n1 acknowledges again, and every acknowledged number reaches n2's
#     subscriber. Needs nats-server (Debian package).
# Every wait polls with a deadline. Namespaces, qdiscs and processes are removed on exit; the
# brokers' logs are printed when a scenario fails. The last line is `netns: N passed, M
# failed`. Needs root, iproute2 (ip, tc) and python3 with paho-mqtt 2.x. Without `ip netns`
# (not root, no iproute2) the test is skipped with exit status 0, unless CI=1 is set: then
# that is a failure. NETNS_COUNT and NETNS_RATE change N and the rate; NETNS_SCENARIOS
# picks scenarios (space-separated); NETNS_CUT=netem|neigh picks how the link is cut;
# NETNS_KEEP=1 keeps the work directory.
set -uo pipefail

if [ $# -ne 1 ] || [ ! -x "$1" ]; then
    echo "usage: $0 PATH/TO/tern   (an executable tern binary)" >&2
    exit 2
fi
TERN_BIN=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
HERE=$(cd "$(dirname "$0")" && pwd)
COUNT=${NETNS_COUNT:-3000}
RATE=${NETNS_RATE:-200}
SCENARIOS=${NETNS_SCENARIOS:-linkcut-v5 linkcut-v311 kill9-v5 kill9-v311 cluster-partition}
export PATH="$PATH:/usr/sbin:/sbin"
START=$SECONDS

# Unavailable: a skip outside CI, a failure in it.
unavailable() {
    if [ "${CI:-}" = 1 ]; then
        echo "netns: $1 (CI=1: this test must run here)" >&2
        echo "netns: 0 passed, 1 failed"
        exit 1
    fi
    echo "netns: SKIPPED: $1"
    echo "netns: 0 passed, 0 failed (skipped)"
    exit 0
}

for tool in ip tc python3 timeout; do
    command -v "$tool" >/dev/null 2>&1 || unavailable "required tool '$tool' not found (package iproute2)"
done
python3 -c 'import sys, paho.mqtt as m; sys.exit(0 if m.__version__.startswith("2.") else 1)' 2>/dev/null \
    || unavailable "python3 with paho-mqtt 2.x not found (pip install 'paho-mqtt==2.*')"

NS_A=tern-site-$$
NS_B=tern-cloud-$$
VETH_A=tnsa$$
VETH_B=tnsb$$
ADDR_A=10.77.0.1
ADDR_B=10.77.0.2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tern-netns.XXXXXX")
PIDS=()
PASSED=0
FAILED=0
FIGURES=()

stop_pid() {
    local pid=$1 sig=${2:-TERM}
    if kill -0 "$pid" 2>/dev/null; then
        kill -"$sig" "$pid" 2>/dev/null
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
}
stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    PIDS=()
}
cleanup() {
    stop_all
    ip netns del "$NS_A" 2>/dev/null
    ip netns del "$NS_B" 2>/dev/null
    if [ "${NETNS_KEEP:-0}" = 1 ] || [ $FAILED -ne 0 ]; then
        echo "netns: work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the network -----------------------------------------------------------------------------
if ! ip netns add "$NS_A" 2>"$WORK/netns.err"; then
    unavailable "ip netns add failed: $(cat "$WORK/netns.err") (needs root)"
fi
if ! { ip netns add "$NS_B" \
    && ip link add "$VETH_A" netns "$NS_A" type veth peer name "$VETH_B" netns "$NS_B" \
    && ip -n "$NS_A" addr add "$ADDR_A/24" dev "$VETH_A" \
    && ip -n "$NS_B" addr add "$ADDR_B/24" dev "$VETH_B" \
    && ip -n "$NS_A" link set lo up && ip -n "$NS_B" link set lo up \
    && ip -n "$NS_A" link set "$VETH_A" up && ip -n "$NS_B" link set "$VETH_B" up; } 2>"$WORK/netns.err"; then
    unavailable "could not set up the namespaces and veth pair: $(cat "$WORK/netns.err")"
fi
# The cut: every packet between A and B silently lost, both ways, with no error for either
# end's TCP (a cable pulled somewhere between them). netem (100 % loss on both egress queues)
# where the kernel has it; else (kernels without sch_netem) each end's neighbour entry for the
# other points at a MAC address nobody has, so that the veth peer drops every frame as not
# its own; restored by deleting those entries (ARP then finds the real ones). A queue that
# refuses packets (pfifo limit 0, tbf) would not do: TCP sees such local drops and gives up
# after 16 probes 0.5 s apart (ETIMEDOUT after 8 s), before the bridge's keep-alive would.
CUT=${NETNS_CUT:-}
if [ -z "$CUT" ]; then
    if ip netns exec "$NS_A" tc qdisc add dev "$VETH_A" root netem loss 100% 2>/dev/null; then
        ip netns exec "$NS_A" tc qdisc del dev "$VETH_A" root
        CUT=netem
    else
        CUT=neigh
    fi
fi
case "$CUT" in
netem) CUT_DESC="tc qdisc netem loss 100% on both ends" ;;
neigh) CUT_DESC="neighbour entries to a MAC address nobody has, on both ends (no netem in this kernel)" ;;
*) unavailable "NETNS_CUT must be netem or neigh, not '$CUT'" ;;
esac
echo "netns: namespaces $NS_A ($ADDR_A) and $NS_B ($ADDR_B), veth $VETH_A/$VETH_B; the cut: $CUT_DESC"

cut_link() {
    if [ "$CUT" = netem ]; then
        ip netns exec "$NS_A" tc qdisc add dev "$VETH_A" root netem loss 100% \
            && ip netns exec "$NS_B" tc qdisc add dev "$VETH_B" root netem loss 100%
    else
        ip -n "$NS_A" neigh replace "$ADDR_B" lladdr 02:00:00:00:77:77 dev "$VETH_A" nud permanent \
            && ip -n "$NS_B" neigh replace "$ADDR_A" lladdr 02:00:00:00:77:77 dev "$VETH_B" nud permanent
    fi
}
restore_link() {
    if [ "$CUT" = netem ]; then
        ip netns exec "$NS_A" tc qdisc del dev "$VETH_A" root 2>/dev/null
        ip netns exec "$NS_B" tc qdisc del dev "$VETH_B" root 2>/dev/null
    else
        ip -n "$NS_A" neigh del "$ADDR_B" dev "$VETH_A" 2>/dev/null
        ip -n "$NS_B" neigh del "$ADDR_A" dev "$VETH_B" 2>/dev/null
    fi
    true
}

now() { date +%s.%N; }
since() { python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$(now)"; }
lines() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }
last_state() { if [ -s "$1" ]; then tail -n 1 "$1" | cut -d' ' -f2; fi; }

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.1 s until it succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@"; do
        if [ $SECONDS -ge $end ]; then
            echo "  timed out after ${secs}s waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}
at_least() { [ "$(lines "$1")" -ge "$2" ]; }
state_is() { [ "$(last_state "$1")" = "$2" ]; }
gone() { ! kill -0 "$1" 2>/dev/null; }

# in_ns NS LOG COMMAND...: starts COMMAND in NS in the background; sets LAST_PID (the
# command's own pid: `ip netns exec` execs it).
in_ns() {
    local ns=$1 log=$2
    shift 2
    ip netns exec "$ns" "$@" >>"$log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# --- per scenario ----------------------------------------------------------------------------
write_configs() {
    local dir=$1 protocol=$2
    cat >"$dir/cloud.toml" <<EOF
[[listener]]
bind = "$ADDR_B:1883"

[storage]
dir = "$dir/cloud-data"

[auth]
allow_anonymous = true
EOF
    cat >"$dir/site.toml" <<EOF
[[listener]]
bind = "127.0.0.1:1883"

[storage]
dir = "$dir/site-data"

[auth]
allow_anonymous = true

[[bridge]]
name = "cloud"
addresses = ["$ADDR_B:1883"]
protocol = "$protocol"
keepalive = 5

[[bridge.topics]]
pattern = "out/#"
direction = "out"
qos = 1
EOF
}

start_site() {
    in_ns "$NS_A" "$DIR/site.log" env NO_COLOR=1 RUST_LOG=info "$TERN_BIN" -c "$DIR/site.toml"
    SITE_PID=$LAST_PID
    ip netns exec "$NS_A" python3 "$HERE/netns.py" wait-ready --host 127.0.0.1 --pid "$SITE_PID" --timeout 20
}

# Starts cloud, the subscriber, site and the state watcher; returns once the bridge is up.
setup_scenario() {
    DIR=$WORK/$1
    mkdir -p "$DIR"
    write_configs "$DIR" "$2"
    in_ns "$NS_B" "$DIR/cloud.log" env NO_COLOR=1 RUST_LOG=info "$TERN_BIN" -c "$DIR/cloud.toml"
    CLOUD_PID=$LAST_PID
    ip netns exec "$NS_B" python3 "$HERE/netns.py" wait-ready --host "$ADDR_B" --pid "$CLOUD_PID" --timeout 20 || return 1
    in_ns "$NS_B" "$DIR/clients.log" python3 "$HERE/netns.py" sub --host "$ADDR_B" --id "netns-sub-$1" \
        --topic 'out/#' --out "$DIR/received" --ready "$DIR/sub.ready"
    wait_for 20 "the subscriber" test -e "$DIR/sub.ready" || return 1
    start_site || return 1
    in_ns "$NS_A" "$DIR/clients.log" python3 "$HERE/netns.py" watch --host 127.0.0.1 \
        --topic '$SYS/broker/connection/cloud/state' --out "$DIR/state"
    wait_for 20 "the bridge to connect (state 1)" state_is "$DIR/state" 1 || return 1
}

start_publisher() {
    local v311=()
    [ "${1:-}" = v311 ] && v311=(--v311)
    in_ns "$NS_A" "$DIR/clients.log" python3 "$HERE/netns.py" pub --host 127.0.0.1 --id "netns-pub-$SCENARIO" \
        --topic "out/$SCENARIO" --count "$COUNT" --rate "$RATE" --acked "$DIR/acked" --timeout 90 "${v311[@]}"
    PUB_PID=$LAST_PID
}

# Waits for the publisher to end; its status.
publisher_done() {
    wait_for 100 "the publisher to finish" gone "$PUB_PID" || return 1
    wait "$PUB_PID"
}

linkcut() {
    local protocol=$1
    setup_scenario "$SCENARIO" "$protocol" || return 1
    start_publisher "$protocol"
    wait_for 30 "a fifth of the messages at the subscriber" at_least "$DIR/received" $((COUNT / 5)) || return 1
    local before cut restore zero_after up_after
    before=$(lines "$DIR/received")
    cut=$(now)
    cut_link || return 1
    echo "  link cut after $before messages at the subscriber"
    wait_for 25 "the state topic to read 0" state_is "$DIR/state" 0 || return 1
    zero_after=$(since "$cut")
    # A second more, so that both ends have given up the old connection.
    sleep 1
    restore=$(now)
    restore_link
    OUTAGE=$(python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$cut" "$restore")
    echo "  state 0 ${zero_after}s after the cut; link restored after ${OUTAGE}s"
    wait_for 30 "the state topic to read 1 again" state_is "$DIR/state" 1 || return 1
    up_after=$(since "$restore")
    echo "  state 1 ${up_after}s after the restore"
    local ok=0
    publisher_done || ok=1
    sed 's/^/  /' "$DIR/clients.log" | grep -E '^  pub:' || true
    ip netns exec "$NS_B" python3 "$HERE/netns.py" check --received "$DIR/received" --acked "$DIR/acked" \
        --count "$COUNT" --all-acked --timeout 60 --summary "$DIR/summary.txt" | sed 's/^/  /'
    [ "${PIPESTATUS[0]}" -eq 0 ] || ok=1
    python3 "$HERE/netns.py" state --file "$DIR/state" --cut "$cut" --restore "$restore" | sed 's/^/  /'
    [ "${PIPESTATUS[0]}" -eq 0 ] || ok=1
    # keepalive = 5: the peer's last packet came just before the cut, so 7.5 s, and some margin.
    if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 10.0 else 1)" "$zero_after"; then :; else
        echo "  the bridge noticed the cut only after ${zero_after}s (keepalive 5 s: expected 7.5 s, at most 10 s)"
        ok=1
    fi
    FIGURE="$(summary_of "$DIR/summary.txt"); outage ${OUTAGE}s (state 0 after ${zero_after}s, 1 again ${up_after}s after the restore); states $(cut -d' ' -f2 "$DIR/state" | tr '\n' ' ')"
    return $ok
}

kill9() {
    local protocol=$1
    setup_scenario "$SCENARIO" "$protocol" || return 1
    start_publisher "$protocol"
    local k
    k=$(python3 -c "import random, sys; n = int(sys.argv[1]); print(random.randint(n // 4, n // 2))" "$COUNT")
    wait_for 30 "$k acknowledgements" at_least "$DIR/acked" "$k" || return 1
    kill -KILL "$SITE_PID"
    wait "$SITE_PID" 2>/dev/null
    local at_kill received_at_kill down
    at_kill=$(lines "$DIR/acked")
    received_at_kill=$(lines "$DIR/received")
    down=$(now)
    echo "  site killed (SIGKILL) with $at_kill acknowledged to the publisher, $received_at_kill at the subscriber"
    echo "--- restart" >>"$DIR/site.log"
    start_site || return 1
    echo "  site ready again after $(since "$down")s"
    local ok=0
    publisher_done || ok=1
    sed 's/^/  /' "$DIR/clients.log" | grep -E '^  pub:' || true
    ip netns exec "$NS_B" python3 "$HERE/netns.py" check --received "$DIR/received" --acked "$DIR/acked" \
        --count "$COUNT" --all-acked --timeout 60 --summary "$DIR/summary.txt" | sed 's/^/  /'
    [ "${PIPESTATUS[0]}" -eq 0 ] || ok=1
    echo "  state sequence: $(cut -d' ' -f2 "$DIR/state" | tr '\n' ' ')"
    FIGURE="$(summary_of "$DIR/summary.txt"); killed at $at_kill acknowledged"
    return $ok
}

# --- cluster: a tern node cut off from NATS stops acknowledging ------------------------------
# Three nats-servers (one JetStream cluster) and tern node n2 in B, tern node n1 in A: n1
# reaches NATS only across the link. A persistent subscriber on n2, a QoS 1 publisher on n1.
# Cut the link: within n1's `cluster.ack_timeout_ms` (2 s here) n1 stops giving success
# PUBACKs (it answers 0x80, as when its store fails) instead of acknowledging what it could not
# replicate; restored, it acknowledges again; every number acknowledged reaches n2's subscriber.
ACK_TIMEOUT_MS=2000
start_nats() {
    local i routes="nats-route://$ADDR_B:16221, nats-route://$ADDR_B:16222, nats-route://$ADDR_B:16223"
    NATS_URLS="\"nats://$ADDR_B:14221\", \"nats://$ADDR_B:14222\", \"nats://$ADDR_B:14223\""
    for i in 1 2 3; do
        cat >"$DIR/nats$i.conf" <<EOF
server_name: nats$i
listen: $ADDR_B:1422$i
http: 127.0.0.1:1822$i
jetstream { store_dir: "$DIR/nats$i", max_memory_store: 64MB, max_file_store: 1GB }
cluster { name: netns, listen: $ADDR_B:1622$i, routes: [$routes] }
EOF
        in_ns "$NS_B" "$DIR/nats$i.log" nats-server -c "$DIR/nats$i.conf"
    done
    for i in 1 2 3; do
        wait_for 30 "nats$i healthy" ip netns exec "$NS_B" python3 -c \
            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:1822$i/healthz', timeout=1)" 2>/dev/null || return 1
    done
}
cluster_node() { # NAME BIND
    cat >"$DIR/$1.toml" <<EOF
[[listener]]
bind = "$2:1883"

[storage]
dir = "$DIR/$1-data"

[auth]
allow_anonymous = true

[cluster]
nats = [$NATS_URLS]
node = "$1"
ack_timeout_ms = $ACK_TIMEOUT_MS
EOF
}
partition() {
    DIR=$WORK/$SCENARIO
    mkdir -p "$DIR"
    command -v nats-server >/dev/null 2>&1 || { echo "  nats-server not installed (apt-get install nats-server)"; return 1; }
    start_nats || return 1
    cluster_node n2 "$ADDR_B"
    cluster_node n1 127.0.0.1
    in_ns "$NS_B" "$DIR/n2.log" env NO_COLOR=1 RUST_LOG=info "$TERN_BIN" -c "$DIR/n2.toml"
    ip netns exec "$NS_B" python3 "$HERE/netns.py" wait-ready --host "$ADDR_B" --pid "$LAST_PID" --timeout 30 || return 1
    in_ns "$NS_B" "$DIR/clients.log" python3 "$HERE/netns.py" sub --host "$ADDR_B" --id "netns-sub-$SCENARIO" \
        --topic 'out/#' --out "$DIR/received" --ready "$DIR/sub.ready"
    wait_for 20 "the subscriber" test -e "$DIR/sub.ready" || return 1
    in_ns "$NS_A" "$DIR/n1.log" env NO_COLOR=1 RUST_LOG=info "$TERN_BIN" -c "$DIR/n1.toml"
    ip netns exec "$NS_A" python3 "$HERE/netns.py" wait-ready --host 127.0.0.1 --pid "$LAST_PID" --timeout 30 || return 1
    local count=$((RATE * 10))
    in_ns "$NS_A" "$DIR/clients.log" python3 "$HERE/netns.py" pub --host 127.0.0.1 --id "netns-pub-$SCENARIO" \
        --topic "out/$SCENARIO" --count "$count" --rate "$RATE" --acked "$DIR/acked" --timeout 90 --allow-refused
    PUB_PID=$LAST_PID
    wait_for 30 "a fifth of the messages at n2's subscriber" at_least "$DIR/received" $((count / 5)) || return 1
    local acked_cut acked_settled acked_restore acked_end ok=0
    cut_link || return 1
    acked_cut=$(lines "$DIR/acked")
    # What n1 had replicated before the cut may still be acknowledged within the timeout.
    sleep "$(python3 -c "print($ACK_TIMEOUT_MS / 1000 + 0.5)")"
    acked_settled=$(lines "$DIR/acked")
    sleep 4
    acked_restore=$(lines "$DIR/acked")
    restore_link
    echo "  link cut with $acked_cut acknowledged; $acked_settled once n1's ack timeout had passed; $acked_restore when restored 4 s later"
    if [ "$acked_restore" -ne "$acked_settled" ]; then
        echo "  n1 acknowledged $((acked_restore - acked_settled)) messages while cut off from NATS"
        ok=1
    fi
    publisher_done || ok=1
    sed 's/^/  /' "$DIR/clients.log" | grep -E '^  pub:' || true
    acked_end=$(lines "$DIR/acked")
    if [ "$acked_end" -le "$acked_restore" ]; then
        echo "  n1 did not acknowledge again after the link came back ($acked_end acknowledged in all)"
        ok=1
    fi
    ip netns exec "$NS_B" python3 "$HERE/netns.py" check --received "$DIR/received" --acked "$DIR/acked" \
        --count "$count" --timeout 60 --summary "$DIR/summary.txt" | sed 's/^/  /'
    [ "${PIPESTATUS[0]}" -eq 0 ] || ok=1
    FIGURE="$(summary_of "$DIR/summary.txt"); acknowledged: $acked_cut at the cut, $acked_settled after ${ACK_TIMEOUT_MS} ms, $acked_restore at the restore, $acked_end in the end"
    return $ok
}

summary_of() {
    if [ -s "$1" ]; then cat "$1"; else echo "no figures"; fi
}

show_logs() {
    local f
    for f in "$DIR/site.log" "$DIR/cloud.log" "$DIR/n1.log" "$DIR/n2.log" "$DIR/clients.log"; do
        [ -f "$f" ] || continue
        echo "  --- $(basename "$f") (last 60 lines)"
        tail -n 60 "$f" | sed 's/^/  | /'
    done
}

for SCENARIO in $SCENARIOS; do
    t0=$SECONDS
    echo "--- $SCENARIO (N=$COUNT at $RATE/s)"
    FIGURE=""
    status=0
    case "$SCENARIO" in
    linkcut-v5) linkcut v5 || status=1 ;;
    linkcut-v311) linkcut v311 || status=1 ;;
    kill9-v5) kill9 v5 || status=1 ;;
    kill9-v311) kill9 v311 || status=1 ;;
    cluster-partition) partition || status=1 ;;
    *)
        echo "  unknown scenario"
        status=1
        ;;
    esac
    stop_all
    restore_link
    if [ $status -eq 0 ]; then
        PASSED=$((PASSED + 1))
        FIGURES+=("$SCENARIO: passed in $((SECONDS - t0))s: $FIGURE")
        echo "  $SCENARIO: passed in $((SECONDS - t0))s"
    else
        FAILED=$((FAILED + 1))
        FIGURES+=("$SCENARIO: FAILED: $FIGURE")
        echo "  $SCENARIO: FAILED; logs:"
        show_logs
    fi
done
for f in "${FIGURES[@]}"; do
    echo "netns: $f"
done
echo "netns: took $((SECONDS - START))s"
echo "netns: $PASSED passed, $FAILED failed"
[ $FAILED -eq 0 ]
