#!/usr/bin/env python3
"""Summarise benches/cold-start.sh's CSV: medians per image, link and mode,
the ratios that matter, as a Markdown table; hyperboxd's memory; and a
grouped bar chart (SVG, written by hand: no plotting library needed).

    cold-start-report.py RESULTS.csv OUT.svg
"""
import csv
import statistics
import sys

MODES = [("overlayfs", "overlayfs, full pull"), ("lazy", "HyperBox, no trace"), ("traced", "HyperBox, with trace")]
COLORS = {"overlayfs": "#9e9e9e", "lazy": "#4f8fd6", "traced": "#e07b39"}


def fmt(x):
    return f"{x['secs']:.2f} s ({x['bytes'] / 1e6:.0f} MB)" if x else "-"


def main(path, svg_path):
    rows = list(csv.DictReader(open(path)))
    memory = {r["profile"]: r["rss_peak_mb"] for r in rows if r["image"] == "memory"}
    rows = [r for r in rows if r["image"] != "memory"]
    groups = list(dict.fromkeys((r["image"], r["profile"]) for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    extra = [m for m in modes if m not in dict(MODES)]
    med = {}
    for g in groups:
        for m in modes:
            rs = [r for r in rows if (r["image"], r["profile"]) == g and r["mode"] == m]
            if not rs:
                continue
            med[g, m] = {
                "secs": statistics.median(float(r["seconds"]) for r in rs),
                "bytes": statistics.median(int(r["bytes"]) for r in rs),
                "runs": sorted(float(r["seconds"]) for r in rs),
                "rss": max((int(r["rss_peak_mb"]) for r in rs if r["rss_peak_mb"]), default=None),
                "precision": [float(r["precision"]) for r in rs if r["precision"]],
                "recall": [float(r["recall"]) for r in rs if r["recall"]],
            }
    head = "| image | link | overlayfs, full pull | HyperBox, no trace | HyperBox, with trace |"
    head += "".join(f" {m} |" for m in extra)
    head += " no trace / full | traced / full | recall / precision | hyperboxd peak RSS |"
    print(head)
    print("|---|---|" + "---:|" * (3 + len(extra)) + "---:|---:|---:|---:|")
    for g in groups:
        o, l, t = (med.get((g, m)) for m, _ in MODES)
        cells = [fmt(x) for x in (o, l, t)] + [fmt(med.get((g, m))) for m in extra]
        r1 = f"{l['secs'] / o['secs']:.2f}x" if o and l else "-"
        r2 = f"{t['secs'] / o['secs']:.2f}x" if o and t else "-"
        pr = "-"
        if t and t["recall"]:
            pr = f"{statistics.median(t['recall']) * 100:.1f}% / {statistics.median(t['precision']) * 100:.1f}%"
        rss = max((x["rss"] for m in modes if (x := med.get((g, m))) and x["rss"]), default=None)
        print(f"| {g[0]} | {g[1]} | {' | '.join(cells)} | {r1} | {r2} | {pr} | {f'{rss} MiB' if rss else '-'} |")
    runs = {len(x["runs"]) for x in med.values()}
    print(f"\nmedians of {'/'.join(map(str, sorted(runs)))} runs; time from pull to the workload's output; "
          "bytes: what the registry sent")
    print("\nruns (seconds):")
    for g in groups:
        parts = [f"{m} {', '.join(f'{s:.2f}' for s in med[g, m]['runs'])}" for m in modes if (g, m) in med]
        print(f"- {g[0]}, {g[1]}: " + "; ".join(parts))
    if memory:
        print("\nhyperboxd RSS (MiB): " + ", ".join(f"{k} {v}" for k, v in memory.items()))
    write_svg(svg_path, groups, med)


def write_svg(path, groups, med):
    width, height = max(760, 95 * len(groups) + 90), 380
    left, right, top, bottom = 70, 20, 40, 90
    shown = [x["secs"] for (g, m), x in med.items() if m in dict(MODES)]
    if not shown:
        return  # none of the plotted modes ran (the table has the others)
    top_secs = max(shown) * 1.15
    plot_h = height - top - bottom
    group_w = (width - left - right) / len(groups)
    bar_w = group_w / (len(MODES) + 1.5)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">Cold start to first output (median, lower is better)</text>']
    step = nice_step(top_secs)
    t = 0.0
    while t <= top_secs:
        y = top + plot_h - t / top_secs * plot_h
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g} s</text>')
        t += step
    for gi, g in enumerate(groups):
        gx = left + gi * group_w + bar_w * 0.75
        for mi, (m, _) in enumerate(MODES):
            x = med.get((g, m))
            if not x:
                continue
            h = x["secs"] / top_secs * plot_h
            bx = gx + mi * bar_w
            out.append(f'<rect x="{bx:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w * 0.9:.1f}" height="{h:.1f}" fill="{COLORS[m]}"/>')
            out.append(f'<text x="{bx + bar_w * 0.45:.1f}" y="{top + plot_h - h - 4:.1f}" text-anchor="middle" font-size="10">{x["secs"]:.1f}</text>')
        cx = left + gi * group_w + group_w / 2
        out.append(f'<text x="{cx:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{g[0]}</text>')
        out.append(f'<text x="{cx:.1f}" y="{top + plot_h + 30}" text-anchor="middle" font-size="10">{g[1]}</text>')
    lx = left
    for m, name in MODES:
        out.append(f'<rect x="{lx}" y="{height - 28}" width="12" height="12" fill="{COLORS[m]}"/>')
        out.append(f'<text x="{lx + 16}" y="{height - 18}">{name}</text>')
        lx += 200
    out.append("</svg>")
    open(path, "w").write("\n".join(out) + "\n")


def nice_step(top):
    for s in (0.5, 1, 2, 5, 10, 20, 50, 100):
        if top / s <= 8:
            return s
    return 200


if __name__ == "__main__":
    main(*sys.argv[1:3])
