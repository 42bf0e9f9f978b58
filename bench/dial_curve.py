"""The on-policy dial's curve on the replica: quality and cost against k, from bench/quality.py's committed results.

    python bench/quality.py --seeds 42 --methods none --with-committed --variant norefresh \
        --variant refresh16 distill.refresh_every=16        # each k: a variant SODA (refreshK) beside SODA (norefresh)
    python bench/dial_curve.py [--seed 42]

Each `SODA (refreshK)` row of bench/results/quality/rows/ against `SODA (norefresh)` (k = never, trained beside them
from the same q_w and pairs), paired on the same prompts per benchmark, with what its refreshes cost (the runs'
`distill.refresh` figures in bench/results/quality.json). Writes bench/results/dial-replica.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from common import paired, prompt_figures

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = RESULTS / "quality" / "rows"
CONTROL = "SODA (norefresh)"
METRICS = {"rouge_l": ("ROUGE-L", 2), "reference_nll": ("reference NLL (lower is better)", 3),
           "preference_margin": ("preference margin vs q0's answers", 3), "words": ("answer length (words)", 1)}


def figures(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """benchmark -> metric -> prompt id -> value, from a committed row's per-prompt records."""
    by_bench: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_bench.setdefault(record["id"].rsplit("-", 1)[0], []).append(record)
    return {bench: prompt_figures(records) for bench, records in by_bench.items()}


def versus(mine: dict, theirs: dict) -> dict:
    """Per benchmark and metric, mine − theirs on the prompts both have (paired bootstrap; None without any)."""
    return {bench: paired(mine[bench], theirs[bench]) for bench in sorted(mine.keys() & theirs.keys())}


def dial(seed: int, before: dict) -> dict:
    """k -> the row, its refreshes' figures and its differences. Each call of bench/quality.py rewrites quality.json
    with its own runs: a refresh's figures not there now are taken from the curve's previous record, `before`."""
    index = json.loads((ROWS / "index.json").read_text())
    runs = json.loads((RESULTS / "quality.json").read_text()).get("runs", {})
    if f"seed-{seed}/{CONTROL}" not in index:
        raise SystemExit(f"dial_curve.py: no `{CONTROL}` row of seed {seed} in {ROWS / 'index.json'}")
    control = figures(ROWS / index[f"seed-{seed}/{CONTROL}"])
    points = {}
    for label, file in index.items():
        if found := re.fullmatch(rf"seed-{seed}/SODA \(refresh(\d+)\)", label):
            refresh = (runs.get(f"seed-{seed} (refresh{found[1]})", {}).get("distill", {}).get("refresh")
                       or before.get(found[1], {}).get("refresh"))
            points[int(found[1])] = {"row": label, "refresh": refresh,
                                     "versus_never": versus(figures(ROWS / file), control)}
    return dict(sorted(points.items(), reverse=True))  # from the fewest refreshes


def markdown(record: dict) -> str:
    show = lambda d, n: "—" if not d else f"{d['difference']:+.{n}f} [{d['ci95'][0]:+.{n}f}, {d['ci95'][1]:+.{n}f}]"
    benches = sorted({b for p in record["points"].values() for b in p["versus_never"]})
    lines = [f"The on-policy dial on the replica (seed {record['seed']}; {record['date']}, from the committed rows: "
             f"their commands and machine in bench/results/quality.json): SODA (refreshK) − {CONTROL}, same prompts, "
             "paired bootstrap 95% intervals.", "",
             "| k | metric | " + " | ".join(benches) + " |", "| --- | --- |" + " ---: |" * len(benches)]
    for k, point in record["points"].items():
        for metric, (heading, digits) in METRICS.items():
            lines.append(f"| {k} | {heading} | "
                         + " | ".join(show(point["versus_never"].get(b, {}).get(metric), digits) for b in benches)
                         + " |")
    lines += ["", "| k | refreshes | new answers (cut at their limit) |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {r['refreshes']} | {r['answers']} ({r['truncated']}) |" if (r := p["refresh"]) else
              f"| {k} | not in quality.json | |" for k, p in record["points"].items()]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """Each metric's difference to k = never against k, one line per benchmark; then the new answers generated."""
    from soda_distill.plots import label_axes, panels, run_color, save_png

    ks, points = ["never", *map(str, record["points"])], list(record["points"].values())
    benches = sorted({b for p in record["points"].values() for b in p["versus_never"]})
    fig, axes = panels(len(METRICS) + 1)
    for ax, (metric, (heading, _)) in zip(axes, METRICS.items()):
        for j, bench in enumerate(benches):
            shown = [(0, 0.0, [0.0, 0.0])] + [(i, d["difference"], d["ci95"]) for i, p in enumerate(points, 1)
                                              if (d := p["versus_never"].get(bench, {}).get(metric))]
            x, y, ci = zip(*shown)
            errors = [[v - c[0] for v, c in zip(y, ci)], [c[1] - v for v, c in zip(y, ci)]]
            ax.errorbar([i + (j - 1) * 0.08 for i in x], y, yerr=errors, color=run_color(j), marker="o", capsize=3,
                        label=bench)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(ks)), ks)
        label_axes(ax, f"Δ {heading}\nvs k = never", "k (refresh every k steps)", "")
    axes[0].legend(fontsize=7)
    cost = axes[len(METRICS)]  # a run quality.json no longer has: no bar
    cost.bar(*zip(*[(i, p["refresh"]["answers"]) for i, p in enumerate(points, 1) if p["refresh"]]) or ([], []),
             color=run_color(0))
    cost.set_xticks(range(len(ks)), ks)
    label_axes(cost, "cost: new answers generated\nduring DPO", "k (refresh every k steps)", "", grid="y")
    fig.suptitle(f"The on-policy dial on the replica (seed {record['seed']})", fontsize=9)
    save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    from datetime import datetime, timezone

    path = RESULTS / "dial-replica.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    points = dial(args.seed, before.get("points", {}) if before.get("seed") == args.seed else {})
    if not points:
        raise SystemExit(f"dial_curve.py: no `SODA (refreshK)` row of seed {args.seed} in {ROWS / 'index.json'}")
    record = {"command": f"python bench/dial_curve.py --seed {args.seed}",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "seed": args.seed, "control": CONTROL, "points": points}
    path.write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "dial-replica.md").write_text(markdown(record))
    plot(record, RESULTS / "dial-replica.png")
    print(markdown(record))


if __name__ == "__main__":
    main()
