# Bridge interop checks: tern's `[[bridge]]` against a real mosquitto (Debian's, 2.0.x), and
# mosquitto's `connection` bridge against tern. Sourced by run.sh (it uses run_check, free_port,
# wait_for_port, uniq_token, TERN_BIN, HOST, WORK): its checks count in the same summary.
#
# Each check starts its own mosquitto and tern on free loopback ports, in its own directory
# under $WORK/bridge, and stops them when it ends (also when it times out); on failure it prints
# both brokers' logs. Nothing waits a fixed time and then asserts: every wait polls a condition
# until a deadline. "Exactly once, no echo" is decided with fences instead of a quiet period:
# after the messages under test have arrived, a message published on one side is awaited on the
# other, then one the other way; an echo or a duplicate of an earlier message travels the same
# connections ahead of the fences, so once both fences are in, every copy that would ever
# arrive has arrived.
#
# MOSQUITTO names the broker binary (default /usr/sbin/mosquitto, Debian package mosquitto).

MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
BR="$WORK/bridge"
mkdir -p "$BR"
export MOSQUITTO BR TERN_BIN
export -f free_port

# ---------------------------------------------------------------------------------------------
# Helpers; each check sets D (its directory) and calls br_begin first.

# br_begin NAME: a fresh directory D for the check; on exit its processes are stopped and, if
# it failed, the logs in D are printed.
br_begin() {
    D="$BR/$1"
    rm -rf "$D"
    mkdir -p "$D"
    : >"$D/pids"
    TOK=$(uniq_token)
    trap 'exit 124' TERM INT
    trap br_end EXIT
}

br_end() {
    local status=$? pid
    while read -r pid; do
        kill -TERM "$pid" 2>/dev/null
    done <"$D/pids"
    for _ in $(seq 1 50); do
        local alive=0
        while read -r pid; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done <"$D/pids"
        [ $alive -eq 0 ] && break
        sleep 0.1
    done
    while read -r pid; do
        kill -KILL "$pid" 2>/dev/null
    done <"$D/pids"
    if [ "$status" -ne 0 ]; then
        local f
        for f in "$D"/*.log; do
            [ -e "$f" ] || continue
            echo "    --- $(basename "$f") (last 150 lines) ---"
            tail -n 150 "$f" | sed 's/^/    log| /'
        done
        for f in "$D"/*.out; do
            [ -e "$f" ] || continue
            echo "    --- $(basename "$f") ---"
            tail -n 80 "$f" | sed 's/^/    out| /'
        done
    fi
    exit "$status"
}

# br_spawn LOG CMD...: runs CMD in the background (its output appended to LOG), remembered for
# clean-up; the pid is in SPAWNED.
br_spawn() {
    local log=$1
    shift
    "$@" >>"$log" 2>&1 &
    SPAWNED=$!
    echo "$SPAWNED" >>"$D/pids"
}

# br_stop PID: SIGTERM, then waits (up to 10 s) for the process to exit.
br_stop() {
    kill -TERM "$1" 2>/dev/null
    for _ in $(seq 1 100); do
        kill -0 "$1" 2>/dev/null || { wait "$1" 2>/dev/null; return 0; }
        sleep 0.1
    done
    echo "process $1 still running 10 s after SIGTERM" >&2
    return 1
}

# br_until SECONDS WHAT CMD...: polls CMD every 0.1 s until it succeeds or SECONDS pass.
br_until() {
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        if [ $SECONDS -ge "$deadline" ]; then
            echo "gave up after ${limit} s waiting for: $what" >&2
            return 1
        fi
        sleep 0.1
    done
}

has_line() {
    grep -qxF -- "$2" "$1" 2>/dev/null
}

# br_mosquitto CONF: starts mosquitto with CONF (log: $D/mosquitto.log) and waits until it
# accepts connections on M_PORT; M_PID is its pid.
br_mosquitto() {
    echo "===== mosquitto -c $1 =====" >>"$D/mosquitto.log"
    br_spawn "$D/mosquitto.log" stdbuf -oL "$MOSQUITTO" -c "$1"
    M_PID=$SPAWNED
    PORT=$M_PORT br_until 15 "mosquitto on port $M_PORT" wait_for_port 0.2 || return 1
}

# br_tern CONF: starts tern with CONF (log: $D/tern.log) and waits for T_PORT; T_PID is its pid.
br_tern() {
    br_spawn "$D/tern.log" env NO_COLOR=1 RUST_LOG="${RUST_LOG:-debug,fjall=info,lsm_tree=info}" \
        "$TERN_BIN" -c "$1"
    T_PID=$SPAWNED
    PORT=$T_PORT br_until 30 "tern on port $T_PORT" wait_for_port 0.2 || return 1
}

# The mosquitto.conf lines every check's mosquitto has: a listener on M_PORT, everything logged.
# `user`: started as root, mosquitto would become user mosquitto, who cannot write its
# persistence file under $WORK.
br_mosquitto_base() {
    cat <<CONF
user $(id -un)
listener $M_PORT $HOST
allow_anonymous true
log_dest stdout
log_type all
log_timestamp_format %Y-%m-%dT%H:%M:%S
connection_messages true
CONF
}

# br_sub NAME PORT VERSION FILTER [ARGS...]: a QoS 1 mosquitto_sub printing `=>topic|payload`
# lines to $D/NAME.out, started and waited for until its SUBACK.
br_sub() {
    local name=$1 port=$2 version=$3 filter=$4
    shift 4
    local out="$D/$name.out"
    br_spawn "$out" stdbuf -oL mosquitto_sub -d -h "$HOST" -p "$port" -V "$version" -q 1 -t "$filter" \
        -F '=>%t|%p' "$@"
    br_until 10 "SUBACK for $name" grep -qs "received SUBACK" "$out"
}

# br_pub PORT VERSION TOPIC PAYLOAD: one QoS 1 message.
br_pub() {
    mosquitto_pub -h "$HOST" -p "$1" -V "$2" -q 1 -t "$3" -m "$4" || {
        echo "mosquitto_pub to port $1 ($3) failed" >&2
        return 1
    }
}

# br_state_is FILE NAME VALUE: the last state seen in FILE (a subscription to the state topic
# of bridge NAME) is VALUE.
br_state_is() {
    [ "$(grep "^=>\$SYS/broker/connection/$2/state|" "$1" 2>/dev/null | tail -n 1)" \
        = "=>\$SYS/broker/connection/$2/state|$3" ]
}

# br_warm_up SECONDS PUB_PORT TOPIC SUB_FILE LINE: publishes TOPIC on PUB_PORT every half second
# until LINE shows up in SUB_FILE: the far side's bridge has subscribed.
br_warm_up() {
    local limit=$1 port=$2 topic=$3 file=$4 line=$5
    local deadline=$((SECONDS + limit)) n=0
    while ! has_line "$file" "$line"; do
        if [ $SECONDS -ge $deadline ]; then
            echo "warm-up message on $topic never crossed the bridge ($n sent in $limit s)" >&2
            return 1
        fi
        if [ $((n % 5)) -eq 0 ]; then
            mosquitto_pub -h "$HOST" -p "$port" -q 1 -t "$topic" -m "${line##*|}" || true
        fi
        n=$((n + 1))
        sleep 0.1
    done
}

# br_expect_exactly FILE LINES...: once the fences are in, FILE's message lines (warm-up ones
# aside) are exactly LINES, each once (order aside).
br_expect_exactly() {
    local file=$1
    shift
    local got want
    got=$(grep '^=>' "$file" | grep -v '/warmup|' | sort)
    want=$(printf '%s\n' "$@" | sort)
    if [ "$got" != "$want" ]; then
        echo "$(basename "$file"): want exactly (sorted):" >&2
        printf '%s\n' "$want" | sed 's/^/    want| /' >&2
        echo "  got:" >&2
        printf '%s\n' "$got" | sed 's/^/    got | /' >&2
        return 1
    fi
}

# br_fences: a fence from tern to mosquitto (awaited at M_SUB), then one from mosquitto to tern
# (awaited at T_SUB), on FENCE_TOPIC (a topic bridged both ways).
br_fences() {
    br_pub "$T_PORT" mqttv311 "$FENCE_TOPIC/t" "fence $TOK" || return 1
    br_until 20 "the fence from tern at mosquitto" has_line "$D/m_sub.out" "=>$FENCE_TOPIC/t|fence $TOK" \
        || return 1
    br_pub "$M_PORT" mqttv311 "$FENCE_TOPIC/m" "fence $TOK" || return 1
    br_until 20 "the fence from mosquitto at tern" has_line "$D/t_sub.out" "=>$FENCE_TOPIC/m|fence $TOK"
}

# The tern.toml listener and storage lines.
br_tern_base() {
    printf '[[listener]]\nbind = "%s:%s"\n\n[storage]\ndir = "%s"\n' "$HOST" "$T_PORT" "$D/tern-data"
}

# ---------------------------------------------------------------------------------------------
# tern bridging to mosquitto (`[[bridge]]`, protocol v311 or v5): `out` with prefixes, `in`
# with a remote prefix, `both`; each message crosses once, nothing comes back, the state topic
# on tern goes to 1.
check_bridge_tern_to_mosquitto() {
    local protocol=$1
    br_begin "tern-to-mosquitto-$protocol"
    M_PORT=$(free_port)
    T_PORT=$(free_port)
    br_mosquitto_base >"$D/mosquitto.conf"
    br_mosquitto "$D/mosquitto.conf" || return 1
    {
        br_tern_base
        cat <<TOML

[[bridge]]
name = "up"
addresses = ["$HOST:$M_PORT"]
protocol = "$protocol"
client_id = "tern-up-$protocol"

[[bridge.topics]]
pattern = "sensors/#"
direction = "out"
qos = 1
local_prefix = "site/"
remote_prefix = "cloud/site1/"

[[bridge.topics]]
pattern = "cmd/#"
direction = "in"
qos = 1
remote_prefix = "cloud/site1/"

[[bridge.topics]]
pattern = "shared/#"
direction = "both"
qos = 1
TOML
    } >"$D/tern.toml"
    br_tern "$D/tern.toml" || return 1
    br_sub state "$T_PORT" mqttv311 '$SYS/broker/connection/up/state' || return 1
    br_until 20 "state topic of bridge 'up' on tern to be 1" br_state_is "$D/state.out" up 1 || return 1
    # A 3.1.1 bridge says so (protocol level 0x84, try_private) and mosquitto takes it as one.
    if [ "$protocol" = v311 ]; then
        br_until 10 "mosquitto to log tern's 3.1.1 bridge as a bridge" \
            grep -q "New bridge connected from .* as tern-up-v311 " "$D/mosquitto.log" || return 1
    fi
    br_sub m_sub "$M_PORT" mqttv5 '#' || return 1
    br_sub t_sub "$T_PORT" mqttv5 '#' || return 1
    # The bridge subscribes at mosquitto after its CONNACK: wait until that is in place.
    br_warm_up 20 "$M_PORT" cloud/site1/cmd/warmup "$D/t_sub.out" "=>cmd/warmup|w $TOK" || return 1

    br_pub "$T_PORT" mqttv311 site/sensors/t1 "21.5 $TOK" || return 1
    br_pub "$T_PORT" mqttv5 shared/a "from tern $TOK" || return 1
    br_pub "$T_PORT" mqttv311 site/other "tern only $TOK" || return 1
    br_pub "$T_PORT" mqttv311 cmd/local "in only, stays $TOK" || return 1
    br_pub "$M_PORT" mqttv311 cloud/site1/cmd/lamp "on $TOK" || return 1
    br_pub "$M_PORT" mqttv5 shared/b "from mosquitto $TOK" || return 1
    br_pub "$M_PORT" mqttv311 cloud/site1/sensors/t2 "out only, stays $TOK" || return 1
    br_until 20 "messages from tern at mosquitto" eval \
        'has_line "$D/m_sub.out" "=>cloud/site1/sensors/t1|21.5 $TOK" && has_line "$D/m_sub.out" "=>shared/a|from tern $TOK"' \
        || return 1
    br_until 20 "messages from mosquitto at tern" eval \
        'has_line "$D/t_sub.out" "=>cmd/lamp|on $TOK" && has_line "$D/t_sub.out" "=>shared/b|from mosquitto $TOK"' \
        || return 1
    FENCE_TOPIC=shared/fence
    br_fences || return 1
    br_expect_exactly "$D/m_sub.out" \
        "=>cloud/site1/sensors/t1|21.5 $TOK" \
        "=>shared/a|from tern $TOK" \
        "=>cloud/site1/cmd/lamp|on $TOK" \
        "=>shared/b|from mosquitto $TOK" \
        "=>cloud/site1/sensors/t2|out only, stays $TOK" \
        "=>shared/fence/t|fence $TOK" \
        "=>shared/fence/m|fence $TOK" || return 1
    br_expect_exactly "$D/t_sub.out" \
        "=>site/sensors/t1|21.5 $TOK" \
        "=>shared/a|from tern $TOK" \
        "=>site/other|tern only $TOK" \
        "=>cmd/local|in only, stays $TOK" \
        "=>cmd/lamp|on $TOK" \
        "=>shared/b|from mosquitto $TOK" \
        "=>shared/fence/t|fence $TOK" \
        "=>shared/fence/m|fence $TOK" || return 1
}

# ---------------------------------------------------------------------------------------------
# mosquitto bridging to tern (`connection`, `address`, `topic` lines; bridge_protocol_version
# mqttv311 with try_private, or mqttv50): `both`, `out` and `in` with prefixes; each message
# crosses once, nothing comes back. mosquitto's bridge notifications (on by default: a retained
# `$SYS/broker/connection/<remote_clientid>/state` message, and a will on it) reach tern.
check_bridge_mosquitto_to_tern() {
    local version=$1
    br_begin "mosquitto-to-tern-$version"
    M_PORT=$(free_port)
    T_PORT=$(free_port)
    br_tern_base >"$D/tern.toml"
    br_tern "$D/tern.toml" || return 1
    {
        br_mosquitto_base
        cat <<CONF

connection totern
address $HOST:$T_PORT
bridge_protocol_version $version
try_private true
cleansession false
remote_clientid mosq-bridge-$version
keepalive_interval 60
restart_timeout 1 5
topic shared/# both 1
topic sensors/# out 1 site/ cloud/site1/
topic cmd/# in 1 "" cloud/site1/
CONF
    } >"$D/mosquitto.conf"
    br_sub notification "$T_PORT" mqttv311 "\$SYS/broker/connection/mosq-bridge-$version/state" || return 1
    br_mosquitto "$D/mosquitto.conf" || return 1
    br_until 20 "mosquitto's bridge notification (1) at tern" \
        br_state_is "$D/notification.out" "mosq-bridge-$version" 1 || return 1
    br_sub m_sub "$M_PORT" mqttv5 '#' || return 1
    br_sub t_sub "$T_PORT" mqttv5 '#' || return 1
    br_warm_up 20 "$T_PORT" cloud/site1/cmd/warmup "$D/m_sub.out" "=>cmd/warmup|w $TOK" || return 1
    br_warm_up 20 "$M_PORT" shared/warmup "$D/t_sub.out" "=>shared/warmup|w $TOK" || return 1

    br_pub "$M_PORT" mqttv311 site/sensors/t1 "21.5 $TOK" || return 1
    br_pub "$M_PORT" mqttv5 shared/a "from mosquitto $TOK" || return 1
    br_pub "$T_PORT" mqttv311 cloud/site1/cmd/lamp "on $TOK" || return 1
    br_pub "$T_PORT" mqttv5 shared/b "from tern $TOK" || return 1
    br_until 20 "messages from mosquitto at tern" eval \
        'has_line "$D/t_sub.out" "=>cloud/site1/sensors/t1|21.5 $TOK" && has_line "$D/t_sub.out" "=>shared/a|from mosquitto $TOK"' \
        || return 1
    br_until 20 "messages from tern at mosquitto" eval \
        'has_line "$D/m_sub.out" "=>cmd/lamp|on $TOK" && has_line "$D/m_sub.out" "=>shared/b|from tern $TOK"' \
        || return 1
    FENCE_TOPIC=shared/fence
    br_fences || return 1
    br_expect_exactly "$D/t_sub.out" \
        "=>cloud/site1/sensors/t1|21.5 $TOK" \
        "=>shared/a|from mosquitto $TOK" \
        "=>cloud/site1/cmd/lamp|on $TOK" \
        "=>shared/b|from tern $TOK" \
        "=>shared/fence/t|fence $TOK" \
        "=>shared/fence/m|fence $TOK" || return 1
    br_expect_exactly "$D/m_sub.out" \
        "=>site/sensors/t1|21.5 $TOK" \
        "=>shared/a|from mosquitto $TOK" \
        "=>cmd/lamp|on $TOK" \
        "=>shared/b|from tern $TOK" \
        "=>shared/fence/t|fence $TOK" \
        "=>shared/fence/m|fence $TOK" || return 1
    # mosquitto stopping cleanly tells tern (its will, or a last notification) the bridge is down.
    br_stop "$M_PID" || return 1
    br_until 20 "mosquitto's bridge notification (0) at tern after it stopped" \
        br_state_is "$D/notification.out" "mosq-bridge-$version" 0
}

# ---------------------------------------------------------------------------------------------
# Store-and-forward: tern bridges `fwd/#` out to mosquitto (persistence on, a persistent
# subscriber session there); mosquitto is stopped; 50 QoS 1 messages are published to tern;
# tern retries after about 1 s, then 2 s (the back-off, read from its log); mosquitto restarts on its
# persistence file; the subscriber, back on its session, gets all 50, in order, none twice.
check_bridge_store_and_forward() {
    local protocol=$1
    br_begin "store-and-forward-$protocol"
    M_PORT=$(free_port)
    T_PORT=$(free_port)
    mkdir -p "$D/mosq-data"
    {
        br_mosquitto_base
        printf 'persistence true\npersistence_location %s/\n' "$D/mosq-data"
    } >"$D/mosquitto.conf"
    br_mosquitto "$D/mosquitto.conf" || return 1
    # The subscriber's persistent session at mosquitto, then it goes away.
    mosquitto_sub -h "$HOST" -p "$M_PORT" -V mqttv311 -c -i "far-sub-$TOK" -q 1 -t 'fwd/#' -E || {
        echo "could not create the persistent subscriber session" >&2
        return 1
    }
    {
        br_tern_base
        cat <<TOML

[[bridge]]
name = "fwd"
addresses = ["$HOST:$M_PORT"]
protocol = "$protocol"

[[bridge.topics]]
pattern = "fwd/#"
direction = "out"
qos = 1
TOML
    } >"$D/tern.toml"
    br_tern "$D/tern.toml" || return 1
    br_sub state "$T_PORT" mqttv311 '$SYS/broker/connection/fwd/state' || return 1
    br_until 20 "state topic of bridge 'fwd' to be 1" br_state_is "$D/state.out" fwd 1 || return 1

    br_stop "$M_PID" || return 1
    br_until 20 "state topic of bridge 'fwd' to be 0 once mosquitto stopped" br_state_is "$D/state.out" fwd 0 \
        || return 1
    seq 1 50 | sed "s/\$/ $TOK/" | mosquitto_pub -h "$HOST" -p "$T_PORT" -V mqttv311 -q 1 -t fwd/x -l || {
        echo "mosquitto_pub -l of 50 messages to tern failed" >&2
        return 1
    }
    # The first attempts after the loss: about 1 s, then about 2 s later.
    br_until 20 "two failed reconnection attempts in tern's log" \
        eval '[ "$(grep -c "bridge connection failed.*bridge=fwd" "$D/tern.log")" -ge 2 ]' || return 1
    python3 - "$D/tern.log" <<'EOF' || return 1
import datetime, re, sys
times = []
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    if "bridge=fwd" in line and ("bridge connection lost" in line or "bridge connection failed" in line):
        stamp = line.split()[0].rstrip("Z")[:26]
        times.append(datetime.datetime.fromisoformat(stamp))
gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])][:2]
print("reconnection attempts after the loss, gaps in s:", ", ".join(f"{g:.2f}" for g in gaps))
if len(gaps) < 2:
    sys.exit("fewer than two gaps in the log")
# backoff(n) is 2^(n-1) s +-25 %; a loaded machine may add, never subtract.
lows, highs = [0.7, 1.45], [2.0, 3.5]
for g, lo, hi, n in zip(gaps, lows, highs, (1, 2)):
    if not lo <= g <= hi:
        sys.exit(f"gap {g:.2f} s, want about {n} s ({lo} ... {hi})")
EOF

    br_mosquitto "$D/mosquitto.conf" || return 1
    br_until 30 "state topic of bridge 'fwd' to be 1 again" br_state_is "$D/state.out" fwd 1 || return 1
    br_sub far_sub "$M_PORT" mqttv311 'fwd/#' -c -i "far-sub-$TOK" || return 1
    br_until 30 "all 50 messages at mosquitto's subscriber" \
        eval '[ "$(grep -c "^=>fwd/x|" "$D/far_sub.out")" -ge 50 ]' || return 1
    # A fence after them: a duplicate would be ahead of it.
    br_pub "$T_PORT" mqttv311 fwd/fence "fence $TOK" || return 1
    br_until 20 "the fence at mosquitto's subscriber" has_line "$D/far_sub.out" "=>fwd/fence|fence $TOK" || return 1
    local got want
    got=$(grep '^=>' "$D/far_sub.out")
    want=$(seq 1 50 | sed "s/.*/=>fwd\/x|& $TOK/"; echo "=>fwd/fence|fence $TOK")
    if [ "$got" != "$want" ]; then
        echo "want the 50 messages once each, in order, then the fence; got:" >&2
        diff <(printf '%s\n' "$want") <(printf '%s\n' "$got") | head -n 40 | sed 's/^/    diff| /' >&2
        return 1
    fi
}

export -f br_begin br_end br_spawn br_stop br_until has_line br_mosquitto br_tern br_mosquitto_base br_sub \
    br_pub br_state_is br_warm_up br_expect_exactly br_fences br_tern_base check_bridge_tern_to_mosquitto \
    check_bridge_mosquitto_to_tern check_bridge_store_and_forward uniq_token

# run_check prints the new lines of LOG on failure; these checks print their own brokers' logs.
LOG="$BR/none.log"
: >"$LOG"
BRIDGE_TIMEOUT=${INTEROP_BRIDGE_TIMEOUT:-90}
if [ ! -x "$MOSQUITTO" ]; then
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=(bridge_mosquitto_missing)
    printf 'FAIL  %-30s (%s not found: install the Debian package mosquitto)\n' bridge_mosquitto_missing "$MOSQUITTO"
else
    for protocol in v311 v5; do
        run_check "bridge_tern_to_mosquitto_$protocol" "$BRIDGE_TIMEOUT" check_bridge_tern_to_mosquitto "$protocol"
    done
    for version in mqttv311 mqttv50; do
        run_check "bridge_mosquitto_to_tern_${version#mqtt}" "$BRIDGE_TIMEOUT" check_bridge_mosquitto_to_tern "$version"
    done
    for protocol in v5 v311; do
        run_check "bridge_store_and_forward_$protocol" "$BRIDGE_TIMEOUT" check_bridge_store_and_forward "$protocol"
    done
fi
