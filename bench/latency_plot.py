#!/usr/bin/env python3
"""Plot latency percentiles against offered rate from `tern-bench latency --sweep` output.

usage: latency_plot.py SWEEP_TERN SWEEP_MOSQUITTO [OUT.png]   (default bench/latency.png)

Each input holds one `scenario=latency ... rate=R ... p50_us=.. p99_us=.. p999_us=..` line per
rate. A missing input file is skipped. Without matplotlib the PNG is skipped (said on stderr,
exit 0) and the figures are printed as text instead.
"""
import os
import sys


def read(path):
    pts = []
    if not os.path.exists(path):
        return pts
    with open(path, encoding="utf-8") as f:
        for line in f:
            kv = dict(p.split("=", 1) for p in line.split() if "=" in p)
            if kv.get("scenario") != "latency" or "p50_us" not in kv:
                continue
            pts.append((float(kv["rate"]), float(kv["p50_us"]), float(kv["p99_us"]), float(kv["p999_us"]),
                        int(kv.get("lost", "0"))))
    return sorted(pts)


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[3] if len(sys.argv) > 3 else os.path.join(os.path.dirname(__file__), "latency.png")
    series = {"tern": read(sys.argv[1]), "mosquitto": read(sys.argv[2])}
    for name, pts in series.items():
        for r, p50, p99, p999, lost in pts:
            print(f"{name:9} rate={r:>8.0f} p50={p50:>8.0f}us p99={p99:>8.0f}us p99.9={p999:>8.0f}us lost={lost}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("latency_plot: matplotlib is not installed; skipping the PNG", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"tern": "tab:blue", "mosquitto": "tab:orange"}
    styles = (("p50", 1, "-", "o"), ("p99", 2, "--", "s"), ("p99.9", 3, ":", "^"))
    for name, pts in series.items():
        if not pts:
            continue
        xs = [p[0] for p in pts]
        for label, idx, ls, mk in styles:
            ax.plot(xs, [max(p[idx], 1) for p in pts], ls, marker=mk, color=colors[name], label=f"{name} {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (msg/s, Poisson arrivals)")
    ax.set_ylabel("latency from intended send time (µs)")
    ax.set_title("MQTT publish → subscriber latency (QoS 0, 64 B, 1 pub → 1 sub)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"latency_plot: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
