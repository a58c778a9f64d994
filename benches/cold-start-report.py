#!/usr/bin/env python3
"""Summarise benches/cold-start.sh's CSV: medians per link and mode, the
ratios that matter, as a Markdown table; and a grouped bar chart (SVG,
written by hand: no plotting library needed).

    cold-start-report.py RESULTS.csv OUT.svg
"""
import csv
import statistics
import sys

MODES = [("overlayfs", "overlayfs, full pull"), ("lazy", "HyperBox, no trace"), ("traced", "HyperBox, with trace")]
COLORS = {"overlayfs": "#9e9e9e", "lazy": "#4f8fd6", "traced": "#e07b39"}


def main(path, svg_path):
    rows = list(csv.DictReader(open(path)))
    profiles = list(dict.fromkeys(r["profile"] for r in rows))
    med = {}
    for p in profiles:
        for m, _ in MODES:
            rs = [r for r in rows if r["profile"] == p and r["mode"] == m]
            if not rs:
                continue
            med[p, m] = {
                "secs": statistics.median(float(r["seconds"]) for r in rs),
                "bytes": statistics.median(int(r["bytes"]) for r in rs),
                "runs": len(rs),
                "precision": [float(r["precision"]) for r in rs if r["precision"]],
                "recall": [float(r["recall"]) for r in rs if r["recall"]],
            }
    print("| link | overlayfs, full pull | HyperBox, no trace | HyperBox, with trace | no trace vs full | trace vs no trace | recall / precision |")
    print("|---|---|---|---|---|---|---|")
    for p in profiles:
        cells = []
        for m, _ in MODES:
            x = med.get((p, m))
            cells.append(f"{x['secs']:.2f} s ({x['bytes'] / 1e6:.0f} MB)" if x else "-")
        o, l, t = (med.get((p, m)) for m, _ in MODES)
        r1 = f"{o['secs'] / l['secs']:.1f}x" if o and l else "-"
        r2 = f"{l['secs'] / t['secs']:.2f}x" if l and t else "-"
        pr = "-"
        if t and t["recall"]:
            pr = f"{statistics.median(t['recall']) * 100:.1f}% / {statistics.median(t['precision']) * 100:.1f}%"
        print(f"| {p} | {' | '.join(cells)} | {r1} | {r2} | {pr} |")
    runs = {x["runs"] for x in med.values()}
    print(f"\nmedians of {'/'.join(map(str, sorted(runs)))} runs; time from pull to the workload's output")
    write_svg(svg_path, profiles, med)


def write_svg(path, profiles, med):
    width, height = 760, 360
    left, right, top, bottom = 70, 20, 40, 70
    top_secs = max(x["secs"] for x in med.values()) * 1.15
    plot_h = height - top - bottom
    group_w = (width - left - right) / len(profiles)
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
    for gi, p in enumerate(profiles):
        gx = left + gi * group_w + bar_w * 0.75
        for mi, (m, _) in enumerate(MODES):
            x = med.get((p, m))
            if not x:
                continue
            h = x["secs"] / top_secs * plot_h
            bx = gx + mi * bar_w
            out.append(f'<rect x="{bx:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w * 0.9:.1f}" height="{h:.1f}" fill="{COLORS[m]}"/>')
            out.append(f'<text x="{bx + bar_w * 0.45:.1f}" y="{top + plot_h - h - 4:.1f}" text-anchor="middle">{x["secs"]:.1f}</text>')
        out.append(f'<text x="{left + gi * group_w + group_w / 2:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{p}</text>')
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
