#!/usr/bin/env bash
# Power-cut test: tern in a small virtual machine, killed mid-stream, booted again; everything
# it acknowledged must still be there.
#
#   tests/powercut/run.sh target/release/tern
#
# The VM: qemu-system-x86_64 (KVM where /dev/kvm is usable, else TCG emulation with longer
# time limits), Debian's kernel (/boot/vmlinuz-*, package linux-image-amd64), an initramfs
# made here (busybox-static as /init, the tern binary with the shared libraries ldd lists, the
# kernel modules for virtio-pci, virtio-blk, virtio-net and ext4), and tern's data directory
# on an ext4 disk image attached as virtio-blk with the host cache off (cache=none: O_DIRECT,
# guest flushes become fdatasync on the host). tern runs with durability = "sync" (the
# default) and listens on 0.0.0.0:1883, forwarded by qemu's user network to a free port on
# 127.0.0.1.
#
# Each round (POWERCUT_ROUNDS, default 2) on the same disk image:
#   boot; three persistent sessions subscribe (QoS 1, QoS 2, and QoS 2 over MQTT 5 with a
#   Session Expiry Interval) and go away; three publishers
#   stream QoS 1, QoS 2 and retained messages; after a random number of acknowledgements the
#   qemu process gets SIGKILL: whatever the guest had only in its page cache (or in qemu's
#   queues) is gone, as in a power cut;
#   boot again on the same image; the sessions must come back with every acknowledged
#   message, in order per topic, QoS 2 at most once, and the retained topics must hold their
#   last acknowledged value (or a later one).
# The next round runs on that boot, so round 2 cuts a store that was itself recovered.
#
# Figures per round: messages acknowledged before the cut, recovered, boot-to-ready time, and
# tern's own recovery time (its first log line to "state recovered from the store").
# The last line is `powercut: N passed, M failed`. Needs qemu-system-x86, linux-image-amd64,
# busybox-static, cpio, e2fsprogs and python3 (`.ci/run` installs them).
# POWERCUT_ACCEL=kvm|tcg forces the accelerator; POWERCUT_KEEP=1 keeps the work directory;
# POWERCUT_DURABILITY=none|periodic runs the same test against a tern that acknowledges before
# syncing (a negative control: it should fail).
set -uo pipefail

if [ $# -ne 1 ] || [ ! -x "$1" ]; then
    echo "usage: $0 PATH/TO/tern   (an executable tern binary)" >&2
    exit 2
fi
TERN_BIN=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
HERE=$(cd "$(dirname "$0")" && pwd)
ROUNDS=${POWERCUT_ROUNDS:-2}
# mkfs.ext4 and modprobe live in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

for tool in qemu-system-x86_64 cpio gzip mkfs.ext4 python3 ldd timeout; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "powercut: required tool '$tool' not found (run .ci/run, or install qemu-system-x86, cpio, e2fsprogs)" >&2
        echo "powercut: 0 passed, 1 failed"
        exit 2
    fi
done
BUSYBOX=/bin/busybox
if [ ! -x "$BUSYBOX" ] || ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "powercut: a static /bin/busybox is needed (package busybox-static)" >&2
    echo "powercut: 0 passed, 1 failed"
    exit 2
fi
KERNEL=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
KVER=${KERNEL#/boot/vmlinuz-}
if [ -z "$KERNEL" ] || [ ! -d "/lib/modules/$KVER" ]; then
    echo "powercut: no kernel in /boot with modules in /lib/modules (package linux-image-amd64)" >&2
    echo "powercut: 0 passed, 1 failed"
    exit 2
fi

ACCEL=${POWERCUT_ACCEL:-}
if [ -z "$ACCEL" ]; then
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then ACCEL=kvm; else ACCEL=tcg; fi
fi
if [ "$ACCEL" = kvm ]; then
    # arch-capabilities off: nested KVM hosts often refuse to set that MSR (qemu aborts).
    ACCEL_ARGS=(-accel kvm -cpu host,-arch-capabilities)
    SLOW=1
else
    # Emulation: every time limit 4 times longer.
    ACCEL_ARGS=(-accel tcg)
    SLOW=4
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tern-powercut.XXXXXX")
QEMU_PID=""
QEMU_JOB=""
PASSED=0
FAILED=0

stop_vm() {
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill -KILL "$QEMU_PID" 2>/dev/null
    fi
    [ -n "$QEMU_JOB" ] && wait "$QEMU_JOB" 2>/dev/null
    QEMU_PID=""
    QEMU_JOB=""
}
cleanup() {
    stop_vm
    if [ "${POWERCUT_KEEP:-0}" = 1 ] || [ $FAILED -ne 0 ]; then
        echo "powercut: work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the initramfs -------------------------------------------------------------------------
T0=$SECONDS
ROOT=$WORK/initramfs
mkdir -p "$ROOT"/{bin,etc,dev,proc,sys,data,modules,tmp}
cp "$BUSYBOX" "$ROOT/bin/busybox"
# tern without its debug symbols (a smaller image, same code).
if command -v strip >/dev/null 2>&1; then
    strip -o "$ROOT/bin/tern" "$TERN_BIN"
else
    cp "$TERN_BIN" "$ROOT/bin/tern"
fi
# Its shared libraries and the dynamic loader, at the paths ldd gives.
for lib in $(ldd "$TERN_BIN" | grep -o '/[^ ]*'); do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done
# Kernel modules (Debian builds virtio and ext4 as modules), dependencies first, in the order
# modprobe would load them; decompressed, as busybox insmod may not read .ko.xz/.ko.zst.
n=0
for m in virtio_pci virtio_blk virtio_net ext4; do
    modprobe -S "$KVER" --show-depends "$m" 2>/dev/null || python3 - "$KVER" "$m" <<'EOF'
# No modprobe: resolve the dependencies from modules.dep.
import sys
ver, want = sys.argv[1], sys.argv[2]
base = f"/lib/modules/{ver}/"
deps = {}
for line in open(base + "modules.dep"):
    mod, _, rest = line.partition(":")
    deps[mod.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")] = (mod, rest.split())
order, seen = [], set()
def visit(path):
    if path in seen:
        return
    seen.add(path)
    name = path.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")
    for d in deps[name][1]:
        visit(d)
    order.append(path)
visit(deps[want.replace("-", "_")][0])
for p in order:
    print("insmod " + base + p)
EOF
done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$WORK/modules.list"
while read -r ko; do
    n=$((n + 1))
    name=$(printf '%02d-%s' "$n" "$(basename "$ko" | sed -E 's/\.ko(\..*)?$//').ko")
    case "$ko" in
    *.ko.xz) xz -dc "$ko" >"$ROOT/modules/$name" ;;
    *.ko.zst) zstd -qdc "$ko" >"$ROOT/modules/$name" ;;
    *.ko.gz) gzip -dc "$ko" >"$ROOT/modules/$name" ;;
    *) cp "$ko" "$ROOT/modules/$name" ;;
    esac
done <"$WORK/modules.list"
DURABILITY=${POWERCUT_DURABILITY:-sync}
cat >"$ROOT/etc/tern.toml" <<EOF
[[listener]]
bind = "0.0.0.0:1883"

[storage]
dir = "/data/tern"
durability = "$DURABILITY"

[auth]
allow_anonymous = true
EOF
cat >"$ROOT/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /modules/*.ko; do
    insmod "$m" || echo "powercut-init: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
# An unclean ext4 is recovered from its journal here.
if ! mount -t ext4 /dev/vda /data; then
    echo "powercut-init: cannot mount /dev/vda"
    poweroff -f
fi
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
echo "powercut-init: uptime $(cut -d' ' -f1 /proc/uptime)s, starting tern"
NO_COLOR=1 RUST_LOG=info /bin/tern -c /etc/tern.toml
echo "powercut-init: tern exited with status $?"
umount /data
poweroff -f
EOF
chmod 755 "$ROOT/init"
(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1) >"$WORK/initramfs.gz"
echo "powercut: kernel $KERNEL, accel $ACCEL, durability $DURABILITY, initramfs $(du -k "$WORK/initramfs.gz" | cut -f1) KiB ($(wc -l <"$WORK/modules.list") modules), built in $((SECONDS - T0))s"

# --- the disk ---------------------------------------------------------------------------
IMG=$WORK/data.img
truncate -s 512M "$IMG"
mkfs.ext4 -q -F "$IMG"
CACHE=none
if ! dd if=/dev/zero of="$WORK/odirect.test" bs=4096 count=1 oflag=direct status=none 2>/dev/null; then
    # No O_DIRECT on this file system: writethrough still sends every guest write to the
    # host file before completing it (a qemu kill loses only what the guest had not written).
    CACHE=writethrough
fi
rm -f "$WORK/odirect.test"

free_port() {
    python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Starts qemu on the image, console to $WORK/console-$BOOTS.log; sets QEMU_PID.
# qemu runs under an inner shell whose messages go to the qemu log, so that its SIGKILL
# does not print "Killed" here; QEMU_PID is qemu's own pid (its -pidfile).
start_qemu() {
    rm -f "$WORK/qemu.pid"
    bash -c '"$@"; status=$?; exit $status' qemu qemu-system-x86_64 "${ACCEL_ARGS[@]}" -pidfile "$WORK/qemu.pid" -m 768 -smp 2 -nodefaults -no-user-config -display none \
        -no-reboot -kernel "$KERNEL" -initrd "$WORK/initramfs.gz" \
        -append "console=ttyS0 quiet panic=-1" \
        -serial "file:$CONSOLE" \
        -drive "file=$IMG,format=raw,if=virtio,cache=$CACHE" \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:1883" -device virtio-net-pci,netdev=n0 \
        >"$WORK/qemu-$BOOTS.log" 2>&1 &
    QEMU_JOB=$!
    local i
    for i in $(seq 1 100); do
        [ -s "$WORK/qemu.pid" ] && break
        kill -0 "$QEMU_JOB" 2>/dev/null || break
        sleep 0.05
    done
    QEMU_PID=$(cat "$WORK/qemu.pid" 2>/dev/null || echo "$QEMU_JOB")
}

use_tcg() {
    ACCEL=tcg
    ACCEL_ARGS=(-accel tcg)
    SLOW=4
}

# Boots the VM and waits until tern answers a CONNECT. Sets QEMU_PID, PORT, BOOT_S (boot to
# ready, seconds), RECOVERY_MS (tern's own start-up: first log line to "state recovered").
BOOTS=0
boot() {
    BOOTS=$((BOOTS + 1))
    CONSOLE=$WORK/console-$BOOTS.log
    PORT=$(free_port)
    local start
    start=$(date +%s.%N)
    start_qemu
    if [ "$ACCEL" = kvm ] && [ -z "${POWERCUT_ACCEL:-}" ] && [ $BOOTS -eq 1 ]; then
        # /dev/kvm can be there and still not run a guest (nested virtualisation that hangs,
        # or a CPU model KVM refuses): the first boot must reach the init script in 20 s,
        # or every boot falls back to emulation.
        local waited=0
        while [ $waited -lt 200 ] && ! grep -q 'powercut-init:' "$CONSOLE" 2>/dev/null; do
            kill -0 "$QEMU_PID" 2>/dev/null || break
            sleep 0.1
            waited=$((waited + 1))
        done
        if ! grep -q 'powercut-init:' "$CONSOLE" 2>/dev/null; then
            echo "powercut: KVM did not boot the guest in 20 s (qemu: $(head -c 300 "$WORK/qemu-$BOOTS.log" | tr '\n' ' ')); using TCG emulation"
            stop_vm
            use_tcg
            : >"$CONSOLE"
            start=$(date +%s.%N)
            start_qemu
        fi
    fi
    if ! timeout $((60 * SLOW + 10)) python3 "$HERE/powercut.py" wait-ready --port "$PORT" --pid "$QEMU_PID" --timeout $((60 * SLOW)); then
        echo "powercut: boot $BOOTS: tern did not come up; qemu log and console:"
        cat "$WORK/qemu-$BOOTS.log"
        tail -n 40 "$CONSOLE"
        return 1
    fi
    BOOT_S=$(python3 -c "print('%.2f' % ($(date +%s.%N) - $start))")
    RECOVERY_MS=$(python3 - "$CONSOLE" <<'EOF'
import re, sys, datetime
first = rec = None
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"\s*(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
    if not m:
        continue
    t = datetime.datetime.fromisoformat(m.group(1)[:26])
    first = first or t
    if "state recovered" in line:
        rec = t
        break
print(round((rec - first).total_seconds() * 1000, 1) if first and rec else "?")
EOF
)
    RECOVERED_LINE=$(grep -o 'state recovered.*' "$CONSOLE" | head -n 1)
    return 0
}

report_fail() {
    echo "powercut: round $1 FAILED; console of the last boot:"
    tail -n 60 "$CONSOLE"
    FAILED=$((FAILED + 1))
}

FIGURES=()
if ! boot; then
    FAILED=$((FAILED + 1))
    echo "powercut: 0 passed, $FAILED failed"
    exit 1
fi
echo "powercut: first boot ready in ${BOOT_S}s (port $PORT)"
for round in $(seq 1 "$ROUNDS"); do
    prefix="pc$round"
    state=$WORK/state-$round.json
    kill_after=$(python3 -c 'import random; print(random.randint(300, 4000))')
    echo "--- round $round: cut after $kill_after acknowledgements"
    if ! timeout $((20 * SLOW)) python3 "$HERE/powercut.py" setup --port "$PORT" --prefix "$prefix"; then
        report_fail "$round"
        break
    fi
    if ! timeout $((120 * SLOW)) python3 "$HERE/powercut.py" publish --port "$PORT" --prefix "$prefix" \
        --state "$state" --kill-pid "$QEMU_PID" --kill-after "$kill_after" --timeout $((90 * SLOW)); then
        report_fail "$round"
        break
    fi
    wait "$QEMU_JOB" 2>/dev/null
    QEMU_PID=""
    QEMU_JOB=""
    if ! boot; then
        report_fail "$round"
        break
    fi
    echo "boot after the cut: ready in ${BOOT_S}s, tern start-up ${RECOVERY_MS} ms: ${RECOVERED_LINE}"
    if timeout $((120 * SLOW)) python3 "$HERE/powercut.py" check --port "$PORT" --prefix "$prefix" \
        --state "$state" --summary "$WORK/summary-$round.json" --quiet $((3 * SLOW)) --settle $SLOW --timeout $((60 * SLOW)); then
        PASSED=$((PASSED + 1))
        FIGURES+=("round $round: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["acked"])' "$WORK/summary-$round.json") acknowledged, all recovered; boot to ready ${BOOT_S}s, tern recovery ${RECOVERY_MS} ms")
    else
        report_fail "$round"
    fi
done
stop_vm
for f in "${FIGURES[@]}"; do
    echo "powercut: $f"
done
echo "powercut: $PASSED passed, $FAILED failed"
[ $FAILED -eq 0 ]
