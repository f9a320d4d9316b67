#!/usr/bin/env python3
"""Summarise compare.sh's results.tsv: per scenario and metric, the median and min-max of each
broker's runs and the ratio tern/mosquitto of the medians, as a Markdown table.

usage: summarize.py results.tsv [machine.txt]
"""
import statistics
import sys

# scenario -> [(metric, unit, higher_is_better)]
METRICS = {
    "fanin0": [("rate", "msg/s", True)],
    "fanin1": [("rate", "msg/s", True)],
    "fanout0": [("rate", "deliveries/s", True)],
    "fanout1": [("rate", "deliveries/s", True)],
    "latency": [("p50_us", "µs", False), ("p99_us", "µs", False), ("p999_us", "µs", False),
                ("max_us", "µs", False), ("net_p99_us", "µs", False)],
    "conns": [("conn_rate", "conn/s", True), ("bytes_per_conn", "B", False)],
    "retained": [("rate", "msg/s", True), ("secs", "s", False)],
    "durable": [("rate", "msg/s", True)],
    "tls_handshakes": [("conn_rate", "conn/s", True), ("connack_p99_us", "µs", False)],
    "tls_fanin1": [("rate", "msg/s", True)],
    "overload0": [("rate", "msg/s", True), ("lost", "msgs", False), ("rss_peak_kb", "KiB", False),
                  ("rss_end_kb", "KiB", False)],
    "overload1": [("rate", "msg/s", True), ("lost", "msgs", False), ("rss_peak_kb", "KiB", False),
                  ("rss_end_kb", "KiB", False)],
    "conns_device": [("conn_rate", "conn/s", True), ("bytes_per_conn", "B", False)],
}
# Across a bridge (A -> B): end-to-end rate at B, loss, duplicates, CPU of A and of B.
for _s in ("bridge0_default", "bridge1_default", "bridge0", "bridge1"):
    METRICS[_s] = [("rate", "msg/s", True), ("lost", "msgs", False), ("dup", "msgs", False),
                   ("broker_cpu_pct", "% (A)", False), ("broker2_cpu_pct", "% (B)", False)]
TARGETS = {
    ("fanin0", "rate"): "≥ 8×",
    ("fanin1", "rate"): "≥ 6×",
    ("fanout0", "rate"): "≥ 20×",
    ("fanout1", "rate"): "≥ 17×",
    ("latency", "p99_us"): "≤ 1× (≤ mosquitto)",
    ("latency", "max_us"): "tern < 5000 µs",
    ("conns", "conn_rate"): "≥ 1×",
    ("conns", "bytes_per_conn"): "tern ≤ 2048 B",
    ("retained", "rate"): "≥ 4×",
    ("durable", "rate"): "≥ mosquitto fanin1",
    ("conns_device", "bytes_per_conn"): "≤ 1× (≤ mosquitto)",
}
BROKERS = ("tern", "mosquitto")


def parse(line):
    kv = {}
    for part in line.split():
        if "=" in part:
            k, v = part.split("=", 1)
            kv[k] = v
    return kv


def fmt(x):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def main():
    rows = []
    with open(sys.argv[1], encoding="utf-8") as f:
        for raw in f:
            parts = raw.rstrip("\n").split("\t", 4)
            if len(parts) == 5:
                scen, broker, run, rc, line = parts
                rows.append((scen, broker, int(run), int(rc), parse(line)))
    if len(sys.argv) > 2:
        with open(sys.argv[2], encoding="utf-8") as f:
            for l in f:
                print(f"    {l.rstrip()}")
        print()
    print("| scenario | metric | tern median [min–max] | mosquitto median [min–max] | tern/mosquitto | target | runs ok (tern, mosq) |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    medians = {}
    order = [s for s in METRICS if any(r[0] == s for r in rows)]
    for scen in order:
        for metric, unit, higher in METRICS[scen]:
            cells, med = [], {}
            ok = []
            for b in BROKERS:
                rs = [r for r in rows if r[0] == scen and r[1] == b]
                # A run that failed before measuring anything (e.g. no TLS handshake) reports 0.
                vals = [float(r[4][metric]) for r in rs if metric in r[4] and r[4].get("timeout", "0") == "0"
                        and not ("error" in r[4] and float(r[4][metric]) == 0)]
                ok.append(f"{sum(1 for r in rs if r[3] == 0)}/{len(rs)}")
                if vals:
                    m = statistics.median(vals)
                    med[b] = m
                    cells.append(f"{fmt(m)} [{fmt(min(vals))}–{fmt(max(vals))}] {unit}")
                else:
                    cells.append("no result")
            medians[(scen, metric)] = med
            ratio = "–"
            if med.get("tern") is not None and med.get("mosquitto"):
                ratio = f"{med['tern'] / med['mosquitto']:.2f}×"
                ratio += "" if higher else " (lower is better)"
            print(f"| {scen} | {metric} | {cells[0]} | {cells[1]} | {ratio} | {TARGETS.get((scen, metric), '')} | {ok[0]}, {ok[1]} |")
        for r in rows:
            if r[0] != scen:
                continue
            kv = r[4]
            keys = ("lost", "dup", "bad", "first_lost", "timeout", "error", "broker_died", "closed_by_broker")
            if scen.startswith("overload") and r[3] == 0:
                # QoS 0 loss is what overload measures (it is in the table), not a problem.
                keys = keys[1:3] + keys[4:]
            bits = [f"{k}={kv[k]}" for k in keys if k in kv and kv[k] not in ("0",)]
            if r[3] != 0 or bits:
                notes.append(f"- {scen} {r[1]} run {r[2]}: exit {r[3]}" + (": " + " ".join(bits) if bits else ""))
    if ("durable", "rate") in medians and ("fanin1", "rate") in medians:
        d = medians[("durable", "rate")].get("tern")
        f = medians[("fanin1", "rate")].get("mosquitto")
        if d and f:
            print(f"\ndurable target: tern durable {fmt(d)} msg/s vs mosquitto fanin1 {fmt(f)} msg/s = {d / f:.2f}×")
    sweep = [r for r in rows if r[0] == "sweep"]
    if sweep:
        print("\nLatency sweep (µs; offered rate → p50 / p99 / p99.9 / max, lost):\n")
        print("| rate | tern p50 | tern p99 | tern p99.9 | tern max | tern lost | mosq p50 | mosq p99 | mosq p99.9 | mosq max | mosq lost |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        rates = sorted({float(r[4].get("rate", 0)) for r in sweep})
        for rate in rates:
            cols = []
            for b in BROKERS:
                kv = next((r[4] for r in sweep if r[1] == b and float(r[4].get("rate", 0)) == rate), {})
                cols += [kv.get(k, "–") for k in ("p50_us", "p99_us", "p999_us", "max_us", "lost")]
            print(f"| {rate:,.0f} | " + " | ".join(cols) + " |")
    if notes:
        print("\nRuns with problems:\n")
        print("\n".join(notes))


if __name__ == "__main__":
    main()
