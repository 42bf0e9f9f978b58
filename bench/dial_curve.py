"""The on-policy dial's curve on the replica: quality and cost against k, from bench/quality.py's committed results.

    python bench/quality.py --seeds 42 --methods none --with-committed --variant norefresh \
        --variant refresh16 distill.refresh_every=16        # each k: a variant SODA (refreshK) beside SODA (norefresh)
    python bench/dial_curve.py [--seeds 42,43]              # default: every seed with a SODA (norefresh) row

Each `SODA (refreshK)` row of bench/results/quality/rows/ against `SODA (norefresh)` (k = never, trained beside it
from the same q_w and pairs), paired on the same prompts per benchmark and seed, with what its refreshes cost (the
runs' `distill.refresh` figures and the DPO stage's seconds against k = never's, in bench/results/quality.json,
where both count all their pieces: a resumed stage's include the steps it redid); where several seeds have a k, their pooled difference
(seeds and prompts resampled: the interval holds the seed-to-seed spread). Writes
bench/results/dial-replica.{json,md,png}.
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
    from soda_distill.records import read_jsonl

    by_bench: dict[str, list[dict]] = {}
    for _, record in read_jsonl(path):
        by_bench.setdefault(record["id"].rsplit("-", 1)[0], []).append(record)
    return {bench: prompt_figures(records) for bench, records in by_bench.items()}


def versus(mine: dict, theirs: dict) -> dict:
    """Per benchmark and metric, mine − theirs on the prompts both have (paired bootstrap; None without any)."""
    return {bench: paired(mine[bench], theirs[bench]) for bench in sorted(mine.keys() & theirs.keys())}


def pooled(pairs: list[tuple[dict, dict]]) -> dict:
    """Per benchmark and metric, mine − theirs over several seeds' (mine, theirs) on the prompts all of them have."""
    from soda_distill.stats import seeded_paired_difference

    out: dict = {}
    for bench in sorted(set.intersection(*(set(m) & set(t) for m, t in pairs))):
        for metric in METRICS:
            ids = sorted(set.intersection(*(set(f[bench][metric]) for pair in pairs for f in pair)))
            out.setdefault(bench, {})[metric] = seeded_paired_difference(
                [[m[bench][metric][i] for i in ids] for m, _ in pairs], [[t[bench][metric][i] for i in ids] for _, t in pairs])
    return out


def dial(seeds: list[int], before: dict) -> dict:
    """seed -> k -> the row, its refreshes' figures and its differences. Each call of bench/quality.py rewrites
    quality.json with its own runs: a refresh's figures not there now are taken from the curve's previous record."""
    index = json.loads((ROWS / "index.json").read_text())
    runs = json.loads((RESULTS / "quality.json").read_text()).get("runs", {})
    by_seed = {}
    for seed in seeds:
        if f"seed-{seed}/{CONTROL}" not in index:
            raise SystemExit(f"dial_curve.py: no `{CONTROL}` row of seed {seed} in {ROWS / 'index.json'}")
        control, points = figures(ROWS / index[f"seed-{seed}/{CONTROL}"]), {}
        for label, file in index.items():
            if found := re.fullmatch(rf"seed-{seed}/SODA \(refresh(\d+)\)", label):
                dpo, never = (r.get("distill", {}) if isinstance(r := runs.get(f"seed-{seed} ({name})"), dict) else {}
                              for name in (f"refresh{found[1]}", "norefresh"))
                whole = all(r.get("wall_s") and not r.get("pieces_uncounted") and not r.get("contended")
                            and ("pieces" in r or "resumed_from_step" in r and r["resumed_from_step"] is None)
                            for r in (dpo, never))  # else a last piece's seconds, or a run slowed by another
                cost = {"refresh": dpo.get("refresh"), "dpo_s": [dpo["wall_s"], never["wall_s"]] if whole else None} \
                    if dpo else before.get(str(seed), {}).get(found[1], {})  # not in this quality.json: as recorded
                points[found[1]] = {"row": label, "refresh": cost.get("refresh"), "dpo_s": cost.get("dpo_s"),
                                    "mine": figures(ROWS / file), "control": control}
        by_seed[str(seed)] = dict(sorted(points.items(), key=lambda p: -int(p[0])))  # from the fewest refreshes
    return by_seed


def markdown(record: dict) -> str:
    from soda_distill.stats import seeds_interval_of

    show = lambda d, n: "—" if not d else f"{d['difference']:+.{n}f} [{d['ci95'][0]:+.{n}f}, {d['ci95'][1]:+.{n}f}]"
    show_seeds = lambda d, n: "[{:+.{n}f}, {:+.{n}f}]".format(*seeds_interval_of(d), n=n)
    benches = sorted({b for points in record["by_seed"].values() for p in points.values() for b in p["versus_never"]})
    header = ["| k | seed | metric | " + " | ".join(benches) + " |", "| --- | --- | --- |" + " ---: |" * len(benches)]
    lines = [f"The on-policy dial on the replica (seeds {', '.join(record['by_seed'])}; {record['date']}, from the "
             "committed rows: their commands and machines in bench/results/quality.json): SODA (refreshK) − "
             f"{CONTROL}, same prompts, paired bootstrap 95% intervals; `pooled`: over the seeds that have k (seeds "
             "and prompts resampled), each seed's own difference after it and the t interval over those (`seeds`).",
             "", *header]
    for k in record["ks"]:
        for metric, (heading, digits) in METRICS.items():
            if k in record["pooled"]:
                lines.append(f"| {k} | pooled | {heading} | " + " | ".join(
                    show(d := record["pooled"][k].get(b, {}).get(metric), digits)
                    + (f" ({', '.join(f'{v:+.{digits}f}' for v in d['per_seed'])}; seeds {show_seeds(d, digits)})"
                       if d else "") for b in benches) + " |")
            lines += [f"| {k} | {seed} | {heading} | " + " | ".join(
                show(points[k]["versus_never"].get(b, {}).get(metric), digits) for b in benches) + " |"
                for seed, points in record["by_seed"].items() if k in points and k not in record["pooled"]]
    seconds = lambda s: f"{s[0]:.0f} s, {s[0] / s[1]:.1f}× k = never's" if s else "—"
    lines += ["", "| k | seed | refreshes | new answers (cut at their limit) | DPO stage, all its pieces |",
              "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {k} | {seed} | {r['refreshes']} | {r['answers']} ({r['truncated']}) | {seconds(points[k]['dpo_s'])} |"
              if (r := points[k]["refresh"]) else f"| {k} | {seed} | not in quality.json | | |"
              for k in record["ks"] for seed, points in record["by_seed"].items() if k in points]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """Each metric's difference to k = never against k, one line per benchmark (pooled over the seeds where several
    have k, each seed's own as open marks); then the new answers generated."""
    from soda_distill.plots import label_axes, panels, run_color, save_png

    ks = ["never", *record["ks"]]
    benches = sorted({b for points in record["by_seed"].values() for p in points.values() for b in p["versus_never"]})
    fig, axes = panels(len(METRICS) + 1)
    for ax, (metric, (heading, _)) in zip(axes, METRICS.items()):
        for j, bench in enumerate(benches):
            offset = (j - 1) * 0.08
            shown = [(0, 0.0, [0.0, 0.0])]
            for i, k in enumerate(record["ks"], 1):
                seeds = [d for points in record["by_seed"].values()
                         if k in points and (d := points[k]["versus_never"].get(bench, {}).get(metric))]
                d = record["pooled"][k].get(bench, {}).get(metric) if k in record["pooled"] else next(iter(seeds), None)
                if d:
                    shown.append((i, d["difference"], d["ci95"]))
                if k in record["pooled"]:
                    ax.scatter([i + offset] * len(seeds), [s["difference"] for s in seeds], s=12,
                               facecolors="none", edgecolors=run_color(j))
            x, y, ci = zip(*shown)
            errors = [[v - c[0] for v, c in zip(y, ci)], [c[1] - v for v, c in zip(y, ci)]]
            ax.errorbar([i + offset for i in x], y, yerr=errors, color=run_color(j), marker="o", capsize=3, label=bench)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(ks)), ks)
        label_axes(ax, f"Δ {heading}\nvs k = never", "k (refresh every k steps)", "")
    axes[0].legend(fontsize=7)
    cost = axes[len(METRICS)]  # a run quality.json no longer has: no bar
    seeds = list(record["by_seed"])
    for s, seed in enumerate(seeds):
        bars = [(i + (s - (len(seeds) - 1) / 2) * 0.3, points[k]["refresh"]["answers"])
                for i, k in enumerate(record["ks"], 1) if k in (points := record["by_seed"][seed]) and points[k]["refresh"]]
        if bars:
            cost.bar(*zip(*bars), width=0.3, color=run_color(s), label=f"seed {seed}")
    cost.set_xticks(range(len(ks)), ks)
    cost.legend(fontsize=7)
    label_axes(cost, "cost: new answers generated\nduring DPO", "k (refresh every k steps)", "", grid="y")
    fig.suptitle(f"The on-policy dial on the replica (seeds {', '.join(seeds)})", fontsize=9)
    save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", help="comma-separated (default: every seed with a SODA (norefresh) row)")
    args = parser.parse_args()
    from datetime import datetime, timezone

    index = json.loads((ROWS / "index.json").read_text())
    seeds = ([int(s) for s in args.seeds.split(",")] if args.seeds else
             sorted(int(found[1]) for label in index if (found := re.fullmatch(rf"seed-(\d+)/{re.escape(CONTROL)}", label))))
    path = RESULTS / "dial-replica.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    by_seed = dial(seeds, before.get("by_seed", {}))
    ks = sorted({k for points in by_seed.values() for k in points}, key=lambda k: -int(k))
    if not ks:
        raise SystemExit(f"dial_curve.py: no `SODA (refreshK)` row of seeds {seeds} in {ROWS / 'index.json'}")
    several = {k: [(p[k]["mine"], p[k]["control"]) for p in by_seed.values() if k in p] for k in ks}
    record = {"command": "python bench/dial_curve.py" + (f" --seeds {args.seeds}" if args.seeds else ""),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "control": CONTROL, "ks": ks,
              "pooled": {k: pooled(pairs) for k, pairs in several.items() if len(pairs) > 1},
              "by_seed": {seed: {k: {"row": p["row"], "refresh": p["refresh"], "dpo_s": p["dpo_s"], "versus_never": versus(p["mine"], p["control"])}
                                 for k, p in points.items()} for seed, points in by_seed.items()}}
    path.write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "dial-replica.md").write_text(markdown(record))
    plot(record, RESULTS / "dial-replica.png")
    print(markdown(record))


if __name__ == "__main__":
    main()
