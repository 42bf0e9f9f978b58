"""Every chart soda-distill draws, in one look: figures outside pyplot (no global state, no display; Agg draws the
PNG), constrained layout, light grids, one colour per run, 150 dpi, files written atomically.

Here: the training curves of each stage's `metrics.jsonl`, the manifest's cost per stage, the preference pairs'
lengths, evaluate's results chart and analyze's representation charts; report.py gathers them all.
"""

from __future__ import annotations

import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .evaluation.table import cell
from .records import atomic_write_bytes
from .stats import seeds_interval_of
from .registry import STAGES

DPI = 150


def new_figure(width: float, height: float):
    """A figure of this size in inches, with constrained layout."""
    from matplotlib.figure import Figure  # imported here: matplotlib loads only when something is drawn

    return Figure(figsize=(width, height), layout="constrained")


FULL_WIDTH = 11.7  # inches: the width of the report's column at 100 CSS pixels per inch


def panels(n: int, width: float = FULL_WIDTH / 3, height: float = 3.2):
    """A figure of n panels of about this size each (inches): side by side up to three, else two per row; one panel
    alone is wider."""
    cols = n if n <= 3 else 2
    rows = math.ceil(n / cols)
    fig = new_figure(width * cols if n > 1 else 1.4 * width, height * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def label_axes(ax, title: str, xlabel: str, ylabel: str, grid: str = "both") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis=grid, alpha=0.3)


def run_color(index: int) -> str:
    """The colour of the index-th run (or model), the same in every chart of a report."""
    return f"C{index % 10}"


def save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())


# --- Training curves ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]  # (metrics.jsonl key, legend label), drawn solid, then dashed
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class Curves:
    """One training stage's chart: its panels, read from the stage's `metrics.jsonl` (registry.STAGES)."""

    stage: str
    title: str
    panels: tuple[Panel, ...]

    @property
    def metrics(self) -> str:
        return STAGES[self.stage].metrics


FRACTION = (-0.05, 1.05)
TRAINING_CURVES = (
    Curves("warmup", "SFT warmup (q_w)", (
        Panel("SFT loss", "cross-entropy per assistant token", (("loss", "loss"),)),
    )),
    Curves("seqkd", "SeqKD: SFT to its least held-out loss", (
        Panel("SFT loss", "cross-entropy per assistant token", (("loss", "training"), ("eval_loss", "held-out"))),
    )),
    Curves("distill", "DPO distillation (SODA)", (
        Panel("DPO loss", "loss", (("loss", "loss"),)),
        Panel("Reward margin", "reward(chosen) − reward(rejected)", (("rewards/margins", "margin"),)),
        Panel("Reward accuracy", "pairs with chosen above rejected", (("rewards/accuracies", "accuracy"),), FRACTION),
        Panel("Log-probabilities", "log p(response)", (("logps/chosen", "chosen (teacher)"),
                                                       ("logps/rejected", "rejected (q0)"))),
    )),
    Curves("gad_warmup", "GAD discriminator warmup", (
        Panel("Discriminator loss", "Bradley–Terry loss", (("loss", "loss"),)),
        Panel("Discriminator accuracy", "teacher scored above q0", (("accuracy", "accuracy"),), FRACTION),
    )),
    Curves("gad", "GAD adversarial phase", (
        Panel("Generator reward", "discriminator score of rollouts", (("reward", "reward"),)),
        Panel("Discriminator accuracy", "teacher scored above rollout", (("discriminator/accuracy", "accuracy"),),
              FRACTION),
        Panel("Discriminator loss", "Bradley–Terry loss", (("discriminator/loss", "loss"),)),
    )),
    Curves("opd", "Open-teacher on-policy distillation (OPD)", (
        Panel("Divergence to the teacher", "generalized JSD per token, on the student's samples", (("loss", "loss"),)),
        Panel("Shared top-k tokens", "at the student's states", (("overlap/ratio", "|S ∩ T| / k"),
                                                                  ("overlap/teacher_mass_shared", "teacher's mass on S ∩ T"),
                                                                  ("overlap/student_mass_shared", "student's mass on S ∩ T")),
              FRACTION),
        Panel("Sampled answers", "tokens", (("completions/mean_length", "mean length"),)),
    )),
)


def has_curves(curves: Curves, steps: list[dict]) -> bool:
    return any(key in m for m in steps for panel in curves.panels for key, _ in panel.series)


def plot_training(curves: Curves, runs: dict[str, list[dict]], path: Path) -> None:
    """Each panel's metrics against the optimizer step, one colour per run (the summary line TRL logs last has
    none of these keys, so it is not drawn)."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = panels(len(curves.panels))
    several = len(runs) > 1
    for ax, panel in zip(axes, curves.panels):
        for i, (run, steps) in enumerate(runs.items()):
            for (key, label), style in zip(panel.series, ("-", "--")):
                points = [(m["step"], m[key]) for m in steps if isinstance(m.get(key), (int, float))]
                if not points:
                    continue
                x, y = zip(*points)
                name = ": ".join(filter(None, (run if several else "", label if len(panel.series) > 1 else "")))
                ax.plot(x, y, color=run_color(i), linestyle=style, marker="o" if len(points) <= 60 else None,
                        markersize=2.5, label=name or None)
        label_axes(ax, panel.title, "optimizer step", panel.ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(curves.title)
    save_png(fig, path)


# --- Costs and pairs -----------------------------------------------------------------------------------------------


# (manifest key, chart title, unit, table column)
COSTS = (("wall_s", "Wall time", "seconds", "wall s"), ("peak_rss_mb", "Peak memory (process RSS)", "MB", "peak RSS MB"),
         ("peak_gpu_mb", "Peak GPU memory (largest GPU)", "MB", "peak GPU MB"))


def cost(record: dict, key: str) -> float | None:
    """A stage record's cost; for per-GPU peaks, the largest."""
    value = record.get(key)
    return max(value, default=None) if isinstance(value, list) else value


def recorded_costs(records) -> list[tuple[str, str, str, str]]:
    """The COSTS that at least one of these stage records has."""
    records = list(records)
    return [c for c in COSTS if any(cost(rec, c[0]) is not None for rec in records)]


def plot_costs(runs: dict[str, dict[str, dict]], stages: list[str], path: Path) -> None:
    """Grouped bars per stage, one colour per run, one full-width row per cost: wall time, peak RSS, and peak GPU
    memory where recorded."""
    shown = recorded_costs(rec for records in runs.values() for rec in records.values())
    fig = new_figure(FULL_WIDTH, 2.6 * len(shown) + 0.5)
    width = 0.8 / len(runs)
    for ax, (key, title, unit, _) in zip(fig.subplots(len(shown), 1, squeeze=False).ravel(), shown):
        for i, (run, records) in enumerate(runs.items()):
            values = [cost(records.get(stage, {}), key) for stage in stages]
            xs = [s - 0.4 + width * (i + 0.5) for s in range(len(stages))]
            bars = ax.bar(xs, [math.nan if v is None else v for v in values], width, color=run_color(i), label=run)
            ax.bar_label(bars, labels=["" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" for v in values],
                         padding=2, fontsize="x-small")
        ax.set_xticks(range(len(stages)), stages)
        ax.set_xlim(-0.6, len(stages) - 0.4)  # every stage, even where no run recorded this cost
        ax.margins(y=0.15)
        label_axes(ax, title, "", unit, grid="y")
    if len(runs) > 1:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside upper right", fontsize="small")
    fig.suptitle("Cost per stage (manifest.json)")
    save_png(fig, path)


def plot_pair_lengths(runs: dict[str, dict[str, list[int]]], path: Path) -> None:
    """Per run, histograms of chosen (teacher) and rejected (q0) response lengths over the same bins, medians
    dashed. Lengths are whatever unit the caller counted; the axis says whitespace words."""
    import numpy as np

    fig, axes = panels(len(runs))
    for ax, (run, sides) in zip(axes, runs.items()):
        top = max((max(v) for v in sides.values() if v), default=1)
        bins = np.linspace(0, top, 31)
        for (side, label), color in zip((("chosen", "chosen (teacher)"), ("rejected", "rejected (q0)")), ("C0", "C1")):
            values = sides[side]
            if not values:
                continue
            median = statistics.median(values)
            ax.hist(values, bins=bins, color=color, alpha=0.55, label=f"{label}, median {median:g}")
            ax.axvline(median, color=color, linestyle="--", linewidth=1)
        label_axes(ax, run, "response length (whitespace words)", "pairs", grid="y")
        ax.legend(fontsize="small")
    fig.suptitle("Preference pairs: response lengths")
    save_png(fig, path)


# --- Evaluation and representation analysis ------------------------------------------------------------------------


FOREST = (("rouge_l", "ROUGE-L"), ("reference_nll", "Reference NLL (−: closer)"),
          ("preference_margin", "Preference margin"))  # the across-seed differences drawn, when an evaluation has them


def plot_results(results: dict, path: Path) -> None:
    """evaluate's grouped bars per metric (the judge score when there is one, ROUGE-L, reference NLL): benchmarks ×
    rows, one colour per row, with each bar's bootstrap 95% interval over prompts where there is one; below them,
    where several seeds have a method, its differences across seeds (`plot_across_runs`)."""
    names = [b["name"] for b in results["benchmarks"]]
    metrics = [("Judge score (50 = parity)", ("judge", "score"))] if results["judge"] else []
    metrics.append(("ROUGE-L", ("rouge_l",)))
    if any(cell(row, name, "reference_nll") is not None for row in results["rows"] for name in names):
        metrics.append(("Reference NLL (lower: closer)", ("reference_nll",)))
    rows = results["rows"]
    lines = across_lines(results)
    fig = new_figure(max(6.0, 1.6 * len(names) * len(metrics) + 2, 4.0 + 2.8 * len(FOREST) if lines else 0),
                     4.2 + (1.2 + 0.3 * len(lines) if lines else 0))
    bars, forest = fig.subfigures(2, 1, height_ratios=[4.2, 1.2 + 0.3 * len(lines)]) if lines else (fig, None)
    axes = bars.subplots(1, len(metrics), squeeze=False)[0]
    width = 0.8 / len(rows)
    for ax, (title, keys) in zip(axes, metrics):
        for k, row in enumerate(rows):
            values = [cell(row, name, *keys) for name in names]
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(names))]
            intervals = [cell(row, name, *keys[:-1], f"{keys[-1]}_ci95") for name in names]
            # clamped: the bar's value is rounded apart from its interval's ends
            errors = [[math.nan if v is None or not ci else max(0.0, v - ci[0]) for v, ci in zip(values, intervals)],
                      [math.nan if v is None or not ci else max(0.0, ci[1] - v) for v, ci in zip(values, intervals)]]
            ax.bar(xs, [math.nan if v is None else v for v in values], width, color=run_color(k),
                   yerr=errors, capsize=2, error_kw={"linewidth": 0.8}, label=f"{row['model']} {row['method']}".strip())
        if keys[0] == "judge":
            ax.axhline(50, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(names)), names)
        label_axes(ax, title, "", title.split(" (")[0], grid="y")
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0), ncols=math.ceil(len(rows) / 16))
    if lines:
        plot_across_runs(forest, results, lines)
    save_png(fig, path)


def across_lines(results: dict) -> list[tuple[dict, str]]:
    """(its across_runs entry, `vs BASELINE`): each method's comparison over several seeds."""
    return [(entry, against) for entry in results.get("across_runs", [])
            for against in dict.fromkeys(k for cells in entry["cells"].values() for k in cells)]


def plot_across_runs(fig, results: dict, lines: list[tuple[dict, str]]) -> None:
    """A forest of each method's difference to its baselines over every seed and prompt, with its 95% interval (seeds
    and prompts resampled), raw (filled) and at equal length (hollow), one colour per benchmark, and behind the raw
    one, shaded, the t interval over the seeds' own differences: the figure that answers "does it beat SeqKD?"."""
    names = [b["name"] for b in results["benchmarks"]]
    drawn = [(metric, title) for metric, title in FOREST
             if any(entry["cells"].get(name, {}).get(against, {}).get(metric) for entry, against in lines for name in names)]
    axes = fig.subplots(1, len(drawn), squeeze=False, sharey=True)[0]
    step = 0.7 / (2 * len(names))
    for ax, (metric, title) in zip(axes, drawn):
        for j, name in enumerate(names):
            for i, (entry, against) in enumerate(lines):
                found = entry["cells"].get(name, {}).get(against, {}).get(metric)
                for k, figure in enumerate([found, (found or {}).get("length_controlled")]):
                    if not figure:
                        continue
                    d, (low, high) = figure["difference"], figure["ci95"]
                    y = i - 0.35 + step * (2 * j + k + 0.5)
                    seeds = seeds_interval_of(figure)
                    if seeds:
                        ax.hlines(y, *seeds, color=run_color(j), alpha=0.3, linewidth=5)
                    ax.errorbar(d, y, xerr=[[max(0.0, d - low)], [max(0.0, high - d)]],
                                fmt="os"[k], color=run_color(j), markerfacecolor=[run_color(j), "none"][k], markersize=4,
                                capsize=2, linewidth=0.8, label=(name if len(names) > 1 else None) if i == k == 0 else None)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(range(len(lines)), [f"{entry['method']} − {against.removeprefix('vs ')} ({len(entry['runs'])} seeds)"
                                          for entry, against in lines])
        ax.set_ylim(len(lines) - 0.5, -0.5)
        label_axes(ax, title, "", "", grid="x")
    if len(names) > 1:
        axes[-1].legend(fontsize="small", loc="lower left", bbox_to_anchor=(1.0, 0.0))
    fig.suptitle("Across seeds: this method − that one, 95% interval over seeds and prompts (bars) and over the seeds' "
                 "own differences (shaded)")
    fig.supxlabel("difference (filled: raw; hollow: at equal length)")


def model_colors(result: dict) -> dict[str, str]:
    """One colour per model of an analysis, the same in both of its charts; grey for the base model, the reference."""
    others = [name for name in result["models"] if name != result["base"]]
    return {result["base"]: "0.5", **{name: run_color(i) for i, name in enumerate(others)}}


def plot_cka(result: dict, path: Path) -> None:
    names, base = list(result["models"]), result["base"]
    colors = model_colors(result)
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    for name in names:
        values = [math.nan if c is None else c for c in result["models"][name]["cka"]]
        if name == base:
            ax.plot(range(len(values)), values, color=colors[name], linestyle="--", label=f"{base} (reference)")
        else:
            ax.plot(range(len(values)), values, color=colors[name], marker="o", markersize=3, label=name)
    label_axes(ax, f"Linear CKA to {base}, last-token hidden states ({result['num_prompts']} prompts)",
               "layer (0 = embeddings)", "linear CKA")
    ax.set_ylim(0, 1.05)
    ax.legend()
    save_png(fig, path)


def plot_activation_stats(result: dict, path: Path) -> None:
    names = list(result["models"])
    by_name = model_colors(result)
    colors = [by_name[name] for name in names]
    fig = new_figure(10, 4.5)
    panels = (
        ("final_layer_entropy", f"Activation entropy ({result['binning']['bins']} bins)", "entropy (nats)"),
        ("final_layer_kurtosis", "Activation kurtosis", "excess kurtosis (Fisher)"),
    )
    for ax, (key, title, ylabel) in zip(fig.subplots(1, 2), panels):
        values = [math.nan if (v := result["models"][name][key]) is None else v for name in names]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt="%.2f", padding=2)
        label_axes(ax, title, "model", ylabel, grid="y")
        ax.margins(y=0.12)
    fig.suptitle(f"Final-layer activation statistics ({result['num_prompts']} prompts)")
    save_png(fig, path)
