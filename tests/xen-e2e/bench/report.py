#!/usr/bin/env python3
"""The table of scripts/bench-xen.sh.

report.py RESULTS BACKENDS WORKLOADS HEADER

RESULTS holds "XEN-BENCH-RESULT: round=R backend=B workload=W mbps=X iops=Y" lines; BACKENDS
and WORKLOADS are bench-xen.sh's (space-separated; workloads NAME:MODE:BS:QD); HEADER is
printed as the table's preamble. Prints markdown: medians (min-max) per backend, then the
ratios of each tapdisk variant to qdisk (target >= 1.0, met or not met) and to blkback,
marked * where the two backends' min-max ranges overlap.
Workloads of 64 KiB requests and more are compared in MB/s, smaller ones in IOPS.
"""
import re
import statistics
import sys


def size(bs):
    m = re.fullmatch(r"(\d+)([kKM]?)", bs)
    if not m:
        raise SystemExit(f"report.py: bad block size {bs!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "K": 10, "M": 20}[m.group(2)]


def main():
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    path, backends, workloads, header = sys.argv[1:]
    backends = backends.split()
    wl = [w.split(":") for w in workloads.split()]
    vals = {}
    pat = re.compile(r"XEN-BENCH-RESULT: round=(\d+) backend=(\S+) workload=(\S+) mbps=([0-9.]+) iops=([0-9.]+)")
    with open(path) as f:
        for line in f:
            m = pat.search(line)
            if not m:
                continue
            _, b, w, mbps, iops = m.groups()
            vals.setdefault((b, w), []).append((float(mbps), float(iops)))

    def metric(w):
        return "MB/s" if size(w[2]) >= 65536 else "IOPS"

    def series(b, w):
        col = 0 if metric(w) == "MB/s" else 1
        return [v[col] for v in vals.get((b, w[0]), [])]

    def med(b, w):
        s = series(b, w)
        return statistics.median(s) if s else None

    def fmt(x):
        return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"

    print("## Guest throughput under Xen (scripts/bench-xen.sh)")
    print()
    for line in header.splitlines():
        print("    " + line)
    print()
    print("TCG makes absolute numbers meaningless; only ratios between backends measured in the")
    print("same boot count.")
    print()
    print("| workload | " + " | ".join(backends) + " |")
    print("|---|" + "---|" * len(backends))
    for w in wl:
        cells = []
        for b in backends:
            s = series(b, w)
            if not s:
                cells.append("-")
            elif len(s) == 1:
                cells.append(fmt(s[0]))
            else:
                cells.append(f"{fmt(statistics.median(s))} ({fmt(min(s))}-{fmt(max(s))})")
        print(f"| {w[0]} ({metric(w)}, {w[2]} QD{w[3]}) | " + " | ".join(cells) + " |")
    print()

    taps = [b for b in backends if b.startswith("tap-")]
    peers = [p for p in ("qdisk", "qdisk-vhd", "blkback") if p in backends]
    if not taps or not peers:
        return
    cols = [(t, p) for p in peers for t in taps]
    # qdisk-vhd is the like-for-like peer of the VHD variants only.
    cols = [(t, p) for t, p in cols if p != "qdisk-vhd" or t != "tap-raw"]
    # Ring polling against the same image without it.
    if "tap-raw-poll" in backends and "tap-raw" in backends:
        cols.append(("tap-raw-poll", "tap-raw"))
    qcols = [c for c in cols if c[1] == "qdisk"]
    others = [c for c in cols if c[1] != "qdisk"]
    heads = [f"{t[4:]}/{p}" for t, p in qcols]
    if qcols:
        heads.append(">= 1.0x qdisk")
    heads += [f"{t[4:]}/{p}" for t, p in others]
    print("| workload | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))

    def ratio(t, p, w):
        a, b = med(t, w), med(p, w)
        return None if a is None or b is None or b == 0 else a / b

    def overlap(t, p, w):
        """Whether the two backends' min-max ranges over the rounds overlap."""
        a, b = series(t, w), series(p, w)
        return len(a) > 1 and len(b) > 1 and min(a) <= max(b) and min(b) <= max(a)

    def cell(t, p, w):
        r = ratio(t, p, w)
        if r is None:
            return "-"
        return f"{r:.2f}*" if overlap(t, p, w) else f"{r:.2f}"

    for w in wl:
        cells = []
        misses = []
        for t, p in qcols:
            r = ratio(t, p, w)
            cells.append(cell(t, p, w))
            if r is not None and r < 1.0:
                misses.append(f"{t[4:]} {r:.2f}")
        if qcols:
            cells.append("met" if not misses else "NOT met (" + ", ".join(misses) + ")")
        for t, p in others:
            cells.append(cell(t, p, w))
        print(f"| {w[0]} | " + " | ".join(cells) + " |")
    print()
    print("Ratios are of medians; * marks a ratio whose two min-max ranges overlap (not resolved")
    print("at this run's noise).")

if __name__ == "__main__":
    main()
