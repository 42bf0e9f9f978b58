"""How far can the offline metrics be trusted? Each one measured on the 39 real LLMs of the shared AlpacaEval data,
on the replica's held-out prompts, and ranked against the AlpacaEval 2.0 leaderboard (GPT-4 Turbo as judge).

    python bench/metric_trust.py [--source ../shared/data/alpaca_eval] [--resamples 2000]

Per model: ROUGE-L (evaluate's: F1 × 100, Porter stemming) against gpt-4o-2024-05-13's answers and against
gpt4_1106_preview's (AlpacaEval 2's own reference), both at equal length (ROUGE-L minus what the models' mean log
length ratio to the reference predicts, fitted across models), and the answers' mean length in words. Per metric:
Spearman's ρ with the leaderboard's length-controlled win rate and with its raw win rate, each with a bootstrap 95%
interval over models (scipy.stats.bootstrap, paired), and the least-squares slope of the LC win rate on the metric
(what one point of it is worth in win-rate points). A reference model is left out of its own metric's rows (its ROUGE-L
against itself is 100). Writes bench/results/metric-trust.{json,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from alpaca_eval_data import REFERENCES, SOURCE, SPLIT_SEED, HELDOUT, answers_of, read_jsonl, split
from common import machine

RESULTS = Path(__file__).resolve().parent / "results"


def model_figures(source: Path, models: list[str], heldout: list[str]) -> dict[str, dict]:
    """Per model, its per-prompt ROUGE-L against each reference and its answers' words, on the held-out prompts."""
    from tqdm import tqdm

    from soda_distill.evaluation.metrics import rouge_l

    references = {column: answers_of(source, model) for column, model in REFERENCES.items()}
    out = {}
    for model in tqdm(models, desc="models", file=sys.stdout):
        answers = answers_of(source, model)
        ids = [i for i in heldout if answers.get(i, "").strip()]
        out[model] = {"prompts": len(ids), "words": [len(answers[i].split()) for i in ids],
                      **{column: [rouge_l(refs[i], answers[i]) for i in ids] for column, refs in references.items()},
                      **{f"{column} words": [len(refs[i].split()) for i in ids] for column, refs in references.items()}}
    return out


def spearman_with_interval(x: list[float], y: list[float], resamples: int) -> dict:
    """Spearman's ρ of x and y over models, with a percentile bootstrap 95% interval resampling models."""
    import numpy as np
    from scipy.stats import bootstrap, spearmanr

    rho = float(spearmanr(x, y).statistic)
    ci = bootstrap((np.asarray(x), np.asarray(y)), lambda a, b: spearmanr(a, b).statistic, paired=True,
                   vectorized=False, n_resamples=resamples, method="percentile", random_state=0).confidence_interval
    return {"rho": round(rho, 3), "ci95": [round(float(ci.low), 3), round(float(ci.high), 3)], "models": len(x)}


def metrics_per_model(figures: dict[str, dict]) -> dict[str, dict[str, float]]:
    """metric -> model -> value: ROUGE-L against each reference, raw and at equal length, and mean words."""
    import numpy as np

    metrics = {"words": {m: statistics.fmean(f["words"]) for m, f in figures.items()}}
    for column, reference in REFERENCES.items():
        models = [m for m in figures if m != reference]
        metrics[f"ROUGE-L vs {column}"] = {m: statistics.fmean(figures[m][column]) for m in models}
        # at equal length: the across-model fit of ROUGE-L on the mean log length ratio, its value at ratio 1
        ratio = {m: statistics.fmean(math.log((w + 1) / (r + 1)) for w, r in zip(figures[m]["words"], figures[m][f"{column} words"]))
                 for m in models}
        slope, intercept = np.polyfit([ratio[m] for m in models], [metrics[f"ROUGE-L vs {column}"][m] for m in models], 1)
        metrics[f"ROUGE-L vs {column}, at equal length"] = {m: metrics[f"ROUGE-L vs {column}"][m] - slope * ratio[m]
                                                            for m in models}
    return metrics


def correlations(metrics: dict, leaderboard: dict[str, dict], resamples: int) -> dict:
    import numpy as np

    out = {}
    for name, values in metrics.items():
        models = sorted(values)
        x = [values[m] for m in models]
        lc = [leaderboard[m]["length_controlled_winrate"] for m in models]
        raw = [leaderboard[m]["win_rate"] for m in models]
        slope = float(np.polyfit(x, lc, 1)[0])
        out[name] = {"vs_lc_win_rate": spearman_with_interval(x, lc, resamples),
                     "vs_win_rate": spearman_with_interval(x, raw, resamples),
                     "lc_win_rate_points_per_unit": round(slope, 3)}
    return out


def render(record: dict) -> str:
    lines = [f"# How far the offline metrics can be trusted ({record['models']} AlpacaEval models, "
             f"{record['heldout_prompts']} held-out prompts)", "",
             "Spearman's ρ across models between each offline metric and the AlpacaEval 2.0 leaderboard (GPT-4 Turbo "
             "judge), with bootstrap 95% intervals over models; the slope: leaderboard LC win-rate points per unit of "
             "the metric (least squares across models).", "",
             "| metric | ρ with LC win rate | ρ with win rate | LC win-rate points per unit |", "| --- | ---: | ---: | ---: |"]
    for name, c in record["correlations"].items():
        lc, raw = c["vs_lc_win_rate"], c["vs_win_rate"]
        lines.append(f"| {name} | {lc['rho']:+.2f} [{lc['ci95'][0]:+.2f}, {lc['ci95'][1]:+.2f}] | "
                     f"{raw['rho']:+.2f} [{raw['ci95'][0]:+.2f}, {raw['ci95'][1]:+.2f}] | {c['lc_win_rate_points_per_unit']:+.2f} |")
    worth = {name: c for name, c in record["correlations"].items() if name.startswith("ROUGE-L") and "equal" not in name}
    lines += ["", "What a ROUGE-L difference is worth: across these models, one point of ROUGE-L goes with "
              + " and ".join(f"{c['lc_win_rate_points_per_unit']:+.1f} points of LC win rate ({name})" for name, c in worth.items())
              + ", and ROUGE-L orders models as the judge does only in part (ρ above). A difference of a point or two "
              "between two students is a small one in judged quality; report it with its paired interval and beside "
              "its length-controlled value.",
              "", f"`{record['command']}` — {record['date']}, {record['machine']}; the data: {record['source']}.", ""]
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in record["per_model"] if n.startswith("ROUGE-L") or n == "words"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6))
    for ax, name in zip(axes, names):
        values = record["per_model"][name]
        models = sorted(values)
        ax.scatter([values[m] for m in models], [record["leaderboard"][m]["length_controlled_winrate"] for m in models], s=14)
        rho = record["correlations"][name]["vs_lc_win_rate"]
        ax.set_title(f"{name}\nρ = {rho['rho']:+.2f} [{rho['ci95'][0]:+.2f}, {rho['ci95'][1]:+.2f}]", fontsize=8)
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel("AlpacaEval 2 LC win rate (%)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    prompts = read_jsonl(args.source / "prompts.jsonl")
    heldout, _ = split(prompts, HELDOUT, SPLIT_SEED)
    with open(args.source / "leaderboard_alpaca_eval_2.csv", newline="") as f:
        board = {r[""]: {"win_rate": float(r["win_rate"]), "length_controlled_winrate": float(r["length_controlled_winrate"])}
                 for r in csv.DictReader(f)}
    models = sorted(p.stem for p in (args.source / "outputs").glob("*.jsonl") if p.stem in board)
    figures = model_figures(args.source, models, heldout)
    metrics = metrics_per_model(figures)
    record = {"command": "python bench/metric_trust.py" + (f" --resamples {args.resamples}" if args.resamples != 2000 else ""),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "source": "tatsu-lab/alpaca_eval (CC BY-NC 4.0) via ../shared/data/alpaca_eval",
              "models": len(models), "heldout_prompts": len(heldout), "references": REFERENCES,
              "correlations": correlations(metrics, board, args.resamples),
              "per_model": {name: {m: round(v, 3) for m, v in values.items()} for name, values in metrics.items()},
              "leaderboard": {m: board[m] for m in models}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "metric-trust.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "metric-trust.md").write_text(render(record))
    plot(record, RESULTS / "metric-trust.png")
    print(render(record))


if __name__ == "__main__":
    main()
