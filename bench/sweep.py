"""Where does SODA's DPO step show on this student? A small sweep of the distill learning rate, β and epochs and of
the warmup's length, on the demo's data (configs/demo.yaml), to choose the demo's and the package's defaults.

    python bench/sweep.py [--quick] [--out DIR]      # resumable: run it again to continue
    python bench/sweep.py --points demo,refresh4,refresh1 --name dial --out runs/dial   # the on-policy dial
    python bench/sweep.py --points demo,warmup0.5,warmup1,warmup2 --name coldstart --out runs/dial   # the warmup's length

Every point is a run directory under DIR (default runs/sweep) that shares the demo's teacher answers, snapshot,
pairs and warmup — those the point does not change — as hard links: each is made once. After each point trains, one
evaluation over all points so far scores every model on Dolly's held-out prompts: ROUGE-L, the per-token NLL of the
human reference, and the preference margin (NLL of q0's greedy answer − NLL of the reference), each SODA model
against its own warmup q_w, against SODA at the demo's settings (and a point's control, where it has one), and
against the demo's SeqKD, with paired bootstrap 95% intervals. Beside them, how well DPO learned its own pairs: the mean reward accuracy and margin
of the last quarter of its steps. Writes bench/results/sweep[-quick].json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

from common import DEMO_DATA, machine, paired, prompt_figures

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# One change at a time from the demo's settings (distill lr 5e-6, β 0.1, 1 epoch; warmup 1 epoch until 2026-12-04,
# 3 since, with cut negatives dropped: warmup3 and dropcut are then no-ops). The lr5e-5 points came first, when the
# demo's DPO barely moved; the points after them change the demo: its DPO (β, epochs), its warmup's length (is
# SODA's deficit to SeqKD its shorter SFT?), the paper's Table 2 (the source of the rejected answers) with the cut
# negatives dropped beside it, pair selection and the on-policy dial.
POINTS = {
    "demo": [],
    "lr5e-5": ["distill.learning_rate=5e-5"],
    "lr2e-5": ["distill.learning_rate=2e-5"],
    "warmup3": ["warmup.epochs=3"],
    "beta0.5": ["distill.beta=0.5"],
    "beta0.02": ["distill.beta=0.02"],
    "ep2": ["distill.epochs=2"],
    "other_q0": ["pairs.rejected_source=other_q0"],
    "degraded_teacher": ["pairs.rejected_source=degraded_teacher"],
    "dropcut": ["pairs.truncated_rejected=drop"],
    "select_nll": ["distill.select=teacher_nll"],  # the half of the pairs whose teacher answers q_w finds likeliest
    "select_random": ["distill.select=random"],  # a random half: selection's control
    "refresh4": ["distill.refresh_every=4"],  # the on-policy dial: rejected answers from the current student every 4 steps
    "refresh2": ["distill.refresh_every=2"],
    "refresh1": ["distill.refresh_every=1"],  # on-policy DPO: each step's negatives from that step's policy
    "warmup0.5": ["warmup.epochs=0.5"],  # the "off-policy cold start" dial: SODA's DPO from a shorter SFT
    "warmup1": ["warmup.epochs=1"],
    "warmup2": ["warmup.epochs=2"],
    "lr1e-4": ["distill.learning_rate=1e-4"],
    "lr5e-5_beta0.5": ["distill.learning_rate=5e-5", "distill.beta=0.5"],
    "lr5e-5_beta0.02": ["distill.learning_rate=5e-5", "distill.beta=0.02"],
}
QUICK_POINTS = ("demo", "lr5e-5")
SHARED = "_shared"  # the run the points share their stages with; its SeqKD is every point's baseline
CONTROLS = {"select_nll": "select_random"}  # a point also paired with its control, beside the demo point
METRICS = ("rouge_l", "reference_nll", "preference_margin", "preference_accuracy")
EVALUATE = ["evaluate.benchmarks=[dolly]", "evaluate.limit=30", "evaluate.max_new_tokens=96"]
QUICK = ["data.limit=16", "snapshot.max_new_tokens=64", "evaluate.limit=10", "evaluate.max_new_tokens=64"]


def learned(run: Path) -> dict:
    """DPO's reward accuracy and margin on its own pairs, mean over the last quarter of its steps."""
    from soda_distill.records import read_metrics

    steps = [m for m in read_metrics(run / "distill" / "metrics.jsonl") if "rewards/accuracies" in m]
    tail = steps[-max(1, len(steps) // 4):]
    return {"steps": len(steps),
            "reward_accuracy_last_quarter": round(statistics.fmean(m["rewards/accuracies"] for m in tail), 3),
            "reward_margin_last_quarter": round(statistics.fmean(m["rewards/margins"] for m in tail), 3)}


def versus(evaldir: Path, mine: str, theirs: str, bench: str) -> dict:
    """Row `mine` − row `theirs` (MODEL/METHOD labels) on the same held-out prompts (paired bootstrap), from the
    evaluation's per-prompt records: two points' SODA models side by side, or one against the demo's SeqKD."""
    from soda_distill.evaluation.evaluate import slug

    def figures(label: str) -> dict[str, dict]:
        path = evaldir / "responses" / slug(label) / f"{slug(bench)}.jsonl"
        return prompt_figures([json.loads(line) for line in path.read_text().splitlines()])

    return paired(figures(mine), figures(theirs))


def summarize(results: dict, out: Path, points: dict) -> dict:
    from soda_distill.registry import METHODS

    soda, warmup, seqkd = METHODS["soda"].column, METHODS["warmup"].column, METHODS["seqkd"].column
    bench = results["benchmarks"][0]["name"]
    rows = {(row["model"], row["method"]) for row in results["rows"]}
    done = {row["model"] for row in results["rows"] if row["method"] == soda}
    summary = {}
    for row in results["rows"]:
        if row["method"] != soda or row["model"] == SHARED:
            continue
        c = row["cells"][bench]
        own_start = c["paired"][f"vs {warmup}"]
        base = c["paired"]["vs Base"]
        manifest = json.loads((out / row["model"] / "manifest.json").read_text())
        summary[row["model"]] = {
            "overrides": points[row["model"]],
            "dpo": learned(out / row["model"]),
            "distill_wall_s": manifest["stages"]["distill"]["wall_s"],
            **({"refresh": manifest["stages"]["distill"]["refresh"]} if "refresh" in manifest["stages"]["distill"] else {}),
            "warmup_wall_s": manifest["stages"]["warmup"]["wall_s"],
            **{metric: c.get(metric) for metric in METRICS},
            **{f"{metric}_vs_warmup": own_start.get(metric) for metric in METRICS},
            **{f"{metric}_vs_base": base.get(metric) for metric in METRICS},
            "versus": {
                **{other: versus(out / "_evaluation", f"{row['model']}/{soda}", f"{other}/{soda}", bench)
                   for other in ("demo", CONTROLS.get(row["model"])) if other in done and other != row["model"]},
                **({seqkd: versus(out / "_evaluation", f"{row['model']}/{soda}", f"{SHARED}/{seqkd}", bench)}
                   if (SHARED, seqkd) in rows else {})},
        }
    return summary


def markdown(record: dict) -> str:
    """The sweep as one Markdown table: each point's own-pair learning and its held-out change from its warmup."""
    refreshed = lambda r: "—" if not r else f"{r['refreshes']}, {r['answers']} ({r['kept_previous']} cut), {r['generation_s']:.0f}"
    show = lambda d, digits: "—" if not d else f"{d['difference']:+.{digits}f} [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}]"
    lines = [f"Sweep of SODA's DPO on {record['config']} ({record['date']}, {record['machine']}); held-out: "
             f"{', '.join(record['evaluation'])}. Differences are SODA − its own warmup q_w on the same prompts, "
             "paired bootstrap 95% intervals.", "",
             "| point | DPO reward accuracy (last ¼) | DPO margin (last ¼) | Δ ROUGE-L | Δ reference NLL | Δ preference margin | Δ preference accuracy | distill s | of it: refreshes, new answers (cut, pair kept its previous), generation s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, p in record["points"].items():
        lines.append(f"| {name} | {p['dpo']['reward_accuracy_last_quarter']:.2f} | {p['dpo']['reward_margin_last_quarter']:.2f} | "
                     f"{show(p['rouge_l_vs_warmup'], 2)} | {show(p['reference_nll_vs_warmup'], 3)} | "
                     f"{show(p['preference_margin_vs_warmup'], 3)} | {show(p.get('preference_accuracy_vs_warmup'), 1)} | "
                     f"{p['distill_wall_s']:.0f} | {refreshed(p.get('refresh'))} |")
    against = [(name, other, d) for name, p in record["points"].items() for other, d in p.get("versus", {}).items()]
    if against:
        lines += ["", "The same points against SODA at the demo's settings, their control, and the demo's SeqKD (SFT to "
                  "its least held-out loss; this point − that one, same prompts; each point's model from its own warmup):", "",
                  "| point | against | Δ ROUGE-L | Δ reference NLL | Δ preference margin |", "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {name} | {other} | {show(d['rouge_l'], 2)} | {show(d['reference_nll'], 3)} | "
                  f"{show(d['preference_margin'], 3)} |" for name, other, d in against]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    """Each point's learning on its own pairs, then its held-out difference to its own warmup and to the demo's SeqKD,
    and what its DPO stage cost (the on-policy dial's refreshes included)."""
    from soda_distill.plots import label_axes, panels, run_color, save_png
    from soda_distill.registry import METHODS

    seqkd = METHODS["seqkd"].column
    names = list(summary)
    interval = lambda d: (d["difference"], d["ci95"]) if d else (None, None)
    spec = [("DPO reward accuracy on its pairs\n(last quarter of steps)", lambda s: (s["dpo"]["reward_accuracy_last_quarter"], None))]
    for against, figures in (("its warmup", lambda s, m: s[f"{m}_vs_warmup"]), (seqkd, lambda s, m: s.get("versus", {}).get(seqkd, {}).get(m))):
        spec += [(f"Δ {heading} vs {against}" + ("\n(lower is better)" if metric == "reference_nll" else ""),
                  lambda s, metric=metric, figures=figures: interval(figures(s, metric)))
                 for metric, heading in (("rouge_l", "ROUGE-L"), ("reference_nll", "reference NLL"),
                                         ("preference_margin", "preference margin"))]
    spec.append(("DPO stage wall time (s)", lambda s: (s["distill_wall_s"], None)))
    fig, axes = panels(len(spec))
    for ax, (heading, value) in zip(axes, spec):
        for i, name in enumerate(names):
            v, ci = value(summary[name])
            if v is not None:
                ax.barh(i, v, xerr=[[v - ci[0]], [ci[1] - v]] if ci else None, color=run_color(i), capsize=3)
        ax.axvline(0.5 if "accuracy" in heading else 0, color="grey", lw=0.8)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        label_axes(ax, heading, "", "", grid="x")
    fig.suptitle(title, fontsize=9)
    save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two points on 16 prompts: the regression check")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep", help="where the runs are kept (resumable)")
    parser.add_argument("--points", help="comma-separated subset of the points, in this order")
    parser.add_argument("--summarize", action="store_true",
                        help="train nothing: evaluate and write up the points already trained under --out")
    parser.add_argument("--replot", action="store_true", help="only the Markdown and the chart again, from the results' JSON")
    parser.add_argument("--name", default="sweep", help="the results' name: bench/results/NAME[-quick].json, .md, .png")
    args = parser.parse_args()
    stem = f"{args.name}-quick" if args.quick else args.name
    if args.replot:
        record = json.loads((RESULTS / f"{stem}.json").read_text())
        return write_up(record, stem)
    from soda_distill.config import load_config
    from soda_distill.evaluation.evaluate import prepare_evaluation, run_evaluate
    from soda_distill.manifest import copy_stages
    from soda_distill.pipeline import prepare, run_methods, run_stage
    from soda_distill.registry import shared_stages

    base = ["student.model=embedded", *DEMO_DATA, *(QUICK if args.quick else [])]
    names = args.points.split(",") if args.points else list(QUICK_POINTS if args.quick else POINTS)
    points = {name: POINTS[name] for name in names}
    demo = ROOT / "configs" / "demo.yaml"
    if not args.summarize:
        shared_cfg = load_config(demo, base)
        shared = prepare(shared_cfg, args.out / SHARED)
        for stage in ("pairs", "warmup", "seqkd"):
            run_stage(stage, shared_cfg, shared)
    done = []
    for name, overrides in points.items():
        target = args.out / name
        if not args.summarize:
            cfg = load_config(demo, [*base, *overrides])
            target.mkdir(parents=True, exist_ok=True)
            copy_stages(shared.path, target, shared_stages(overrides), link=True)
            run_methods(cfg, prepare(cfg, target), ["soda"])
        elif not (target / "distill" / "config.json").is_file():
            continue
        done.append(str(target))
        runs = [str(args.out / SHARED)] * (args.out / SHARED / "seqkd" / "config.json").is_file() + done
        ev = load_config(demo, [*EVALUATE, *base, f"evaluate.runs=[{','.join(runs)}]"])  # --quick's limits win
        results = run_evaluate(ev, prepare_evaluation(ev, args.out / "_evaluation"))
        summary = summarize(results, args.out, points)
        record = {
            "command": "python bench/sweep.py" + (" --quick" if args.quick else "") + (f" --points {args.points}" if args.points else "")
                       + (f" --name {args.name}" if args.name != "sweep" else ""),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "config": "configs/demo.yaml", "shared_overrides": base, "evaluation": EVALUATE,
            "points_planned": names, "points_done": list(summary),
            "points": summary,
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
        write_up(record, stem)
        print(json.dumps({name: summary[name]["dpo"] for name in summary}, indent=1), flush=True)


def write_up(record: dict, stem: str) -> None:
    (RESULTS / f"{stem}.md").write_text(markdown(record))
    plot(record["points"], RESULTS / f"{stem}.png", f"SODA's DPO on the demo's pairs: one change at a time "
                                                    f"({len(record['points_done'])}/{len(record['points_planned'])} points, Dolly held-out)")


if __name__ == "__main__":
    main()
