"""The on-policy dial's curve on the replica: quality and cost against k, from bench/quality.py's committed results.

    python bench/quality.py --seeds 42 --methods none --with-committed --variant norefresh \
        --variant refresh16 distill.refresh_every=16          # each k: a variant SODA (refreshK) beside SODA (norefresh)
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

from common import machine

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = RESULTS / "quality" / "rows"
CONTROL = "SODA (norefresh)"
METRICS = {"rouge_l": ("ROUGE-L", 2), "reference_nll": ("reference NLL (lower is better)", 3),
           "preference_margin": ("preference margin vs q0's answers", 3), "words": ("answer length (words)", 1)}


def figures(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """benchmark -> metric -> prompt id -> value, from a committed row's per-prompt records."""
    from soda_distill.evaluation.evaluate import preference_margins

    records = [json.loads(line) for line in path.read_text().splitlines()]
    out: dict = {}
    for record, margin in zip(records, preference_margins(records)):
        bench = record["id"].rsplit("-", 1)[0]
        values = {"rouge_l": record["rouge_l"], "reference_nll": record["reference_nll"], "preference_margin": margin,
                  "words": len(record["messages"][-1]["content"].split())}
        for metric, value in values.items():
            out.setdefault(bench, {}).setdefault(metric, {})[record["id"]] = value
    return out


def dial(seed: int) -> dict:
    from soda_distill.stats import paired_difference

    index = json.loads((ROWS / "index.json").read_text())
    runs = json.loads((RESULTS / "quality.json").read_text()).get("runs", {})
    control = figures(ROWS / index[f"seed-{seed}/{CONTROL}"])
    points = {}
    for label, file in index.items():
        found = re.fullmatch(rf"seed-{seed}/SODA \(refresh(\d+)\)", label)
        if not found:
            continue
        mine = figures(ROWS / file)
        distill = runs.get(f"seed-{seed} (refresh{found[1]})", {}).get("distill", {})
        points[int(found[1])] = {
            "row": label, "refresh": distill.get("refresh"),
            "versus_never": {bench: {metric: paired_difference([mine[bench][metric][i] for i in ids],
                                                               [control[bench][metric][i] for i in ids])
                                     for metric in METRICS for ids in [sorted(mine[bench][metric].keys()
                                                                              & control[bench][metric].keys())]}
                             for bench in control if bench in mine}}
    return dict(sorted(points.items(), reverse=True))  # from the fewest refreshes


def markdown(record: dict) -> str:
    show = lambda d, digits: f"{d['difference']:+.{digits}f} [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}]"
    benches = list(next(iter(record["points"].values()))["versus_never"]) if record["points"] else []
    lines = [f"The on-policy dial on the replica (seed {record['seed']}, {record['date']}, {record['machine']}): "
             f"SODA (refreshK) − {CONTROL}, same prompts, paired bootstrap 95% intervals.", "",
             "| k | metric | " + " | ".join(benches) + " |", "| --- | --- |" + " ---: |" * len(benches)]
    for k, point in record["points"].items():
        for metric, (heading, digits) in METRICS.items():
            lines.append(f"| {k} | {heading} | "
                         + " | ".join(show(point["versus_never"][b][metric], digits) for b in benches) + " |")
    lines += ["", "| k | refreshes | new answers (cut at their limit) |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {r['refreshes']} | {r['answers']} ({r['truncated']}) |"
              for k, p in record["points"].items() if (r := p["refresh"])]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """Each metric's difference to k = never against k, one line per benchmark; then the new answers generated."""
    from soda_distill.plots import label_axes, panels, run_color, save_png

    ks = ["never", *map(str, record["points"])]
    fig, axes = panels(len(METRICS) + 1)
    for ax, (metric, (heading, _)) in zip(axes, METRICS.items()):
        benches = list(next(iter(record["points"].values()))["versus_never"])
        for j, bench in enumerate(benches):
            diffs = [{"difference": 0.0, "ci95": [0.0, 0.0]}] + [p["versus_never"][bench][metric]
                                                                 for p in record["points"].values()]
            x = [i + (j - 1) * 0.08 for i in range(len(ks))]
            y = [d["difference"] for d in diffs]
            errors = [[v - d["ci95"][0] for v, d in zip(y, diffs)], [d["ci95"][1] - v for v, d in zip(y, diffs)]]
            ax.errorbar(x, y, yerr=errors, color=run_color(j), marker="o", capsize=3, label=bench)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(ks)), ks)
        label_axes(ax, f"Δ {heading}\nvs k = never", "k (refresh every k steps)", "")
    axes[0].legend(fontsize=7)
    answers = [0] + [(p["refresh"] or {}).get("answers", 0) for p in record["points"].values()]
    axes[len(METRICS)].bar(range(len(ks)), answers, color=run_color(0))
    axes[len(METRICS)].set_xticks(range(len(ks)), ks)
    label_axes(axes[len(METRICS)], "cost: new answers generated\nduring DPO", "k (refresh every k steps)", "", grid="y")
    fig.suptitle(f"The on-policy dial on the replica (seed {record['seed']})", fontsize=9)
    save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    from datetime import datetime, timezone

    record = {"command": f"python bench/dial_curve.py --seed {args.seed}",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "seed": args.seed, "control": CONTROL, "points": dial(args.seed)}
    (RESULTS / "dial-replica.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "dial-replica.md").write_text(markdown(record))
    plot(record, RESULTS / "dial-replica.png")
    print(markdown(record))


if __name__ == "__main__":
    main()
