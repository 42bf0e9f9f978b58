"""`soda-distill report`: one page on a run directory, or on several side by side — what exists and what is
missing, the config, each stage's cost, the evaluation table, the training curves, the representation analysis
and the preference pairs' lengths.

The page is written as Markdown (`report.md`, its charts in `images/`) and converted to one self-contained HTML file
(`report.html`, no scripts, the charts embedded as base64 data URIs) that can be mailed as is; both say the same.
Nothing is required: what a directory lacks is named on the page instead of drawn, and an unreadable file is
reported, not raised. Evaluations (`results.json`) and analyses (`analysis.json`) are found in each run's
subdirectories, and can also be given as directories of their own (a comparison evaluated into `runs/compare`).
"""

from __future__ import annotations

import io
import json
import re
import statistics
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from ..errors import SodaError
from ..markdown_html import html_document
from ..plots import TRAINING_CURVES, cost, has_curves, plot_costs, plot_pair_lengths, plot_training, recorded_costs
from ..records import atomic_write_bytes, atomic_write_text, read_metrics
from ..registry import STAGES
from ..stats import length_summary
from .runs import EXPECTED, OPTIONAL, Run, classify, load_run, names

# --- Markdown building blocks --------------------------------------------------------------------------------------


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        value = f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    """A pipe table; columns whose cells are all numbers are right-aligned."""
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and i > 0 for i in range(len(header))]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join(" ---: " if n else " --- " for n in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _decodes(data: bytes) -> str | None:
    """None when the bytes are an image a browser can show (PNG, as matplotlib reads it), else why not."""
    from matplotlib.image import imread

    try:
        image = imread(io.BytesIO(data), format="png")
    except Exception as e:  # whatever a broken file makes Pillow raise, the page says so instead
        return f"{type(e).__name__}: {e}"
    return None if image.size else "empty image"


class Page:
    """The report as Markdown blocks, with its images under `out/images/`."""

    def __init__(self, out: Path):
        self.out, self.blocks = out, []

    def add(self, *blocks: str) -> None:
        self.blocks += blocks

    def image(self, name: str, alt: str, caption: str) -> None:
        self.add(f"![{alt}](images/{name})", f"*{caption}*")

    def copy_image(self, source: Path, name: str, alt: str, caption: str) -> None:
        """Another command's chart, checked to decode before it is shown."""
        try:
            data = source.read_bytes()
        except OSError as e:
            self.add(f"`{source}` could not be read ({e.strerror}).")
            return
        problem = _decodes(data)
        if problem:
            self.add(f"`{source}` is not a readable PNG image ({problem}); not shown.")
            return
        atomic_write_bytes(self.out / "images" / name, data)
        self.image(name, alt, caption)

    def markdown(self) -> str:
        return "\n\n".join(self.blocks) + "\n"


# --- Sections ------------------------------------------------------------------------------------------------------


def _overview(page: Page, runs: list[Run], evaluations: list[Path], analyses: list[Path]) -> None:
    page.add("## What is here")
    if not runs:
        page.add("No run directories were given, only evaluation or analysis outputs.")
        return

    def status(run: Run, stage: str, expected: bool) -> str:
        state = run.status(stage)
        if state == "done":
            return f"done, {run.stages[stage].get('wall_s', 0):.1f} s"
        if state == "started":
            return "started, not finished"
        return "**missing**" if expected else "not run"

    def found(items: list[Path], run: Run) -> str:
        inside = [p.name for p in items if p.parent == run.path]
        return ", ".join(f"`{n}/`" for n in inside) if inside else "none in the run directory"

    rows = [["config.yaml", *("yes" if r.config else "**missing**" for r in runs)],
            ["manifest.json", *("yes" if r.manifest else "**missing**" for r in runs)]]
    rows += [[f"{stage} (`{STAGES[stage].outputs[0]}`)", *(status(r, stage, stage in EXPECTED) for r in runs)]
             for stage in STAGES]
    rows += [["evaluation", *(found(evaluations, r) for r in runs)], ["analysis", *(found(analyses, r) for r in runs)]]
    page.add(_table(["", *(r.name for r in runs)], rows))
    notes = []
    for run in runs:
        missing = [name for name, ok in (("config.yaml", run.config), ("manifest.json", run.manifest)) if not ok]
        missing += [f"{stage} (`{STAGES[stage].outputs[0]}`)" for stage in EXPECTED if run.status(stage) != "done"]
        if missing:
            notes.append(f"- **{run.name}** is missing: {', '.join(missing)}. " + (
                f"`soda-distill run --out {run.path}` runs or resumes the unfinished stages." if run.config else
                "Without a config.yaml this may not be a run directory of soda-distill."))
        notes += [f"- **{run.name}**: {problem}" for problem in run.problems]
    page.add("\n".join(notes) if notes else "Every stage of the pipeline finished; every file could be read.")
    page.add("GAD, evaluation and analysis are optional: `soda-distill evaluate RUN` writes `RUN/eval/`, "
             "`soda-distill analyze RUN` writes `RUN/analysis/`.")


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _config(page: Page, runs: list[Run]) -> None:
    page.add("## Configuration")
    with_config = [r for r in runs if r.config is not None]
    if not with_config:
        page.add("No config.yaml in any run directory.")
        return
    if len(with_config) > 1:
        flat = [_flatten(r.config) for r in with_config]
        keys = dict.fromkeys(k for f in flat for k in f)
        differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
        page.add("Settings that differ between the runs:",
                 _table(["key", *(r.name for r in with_config)], [[f"`{k}`", *(json.dumps(f.get(k)) for f in flat)] for k in differ]))
    for run in with_config:
        if len(with_config) > 1:
            page.add(f"### {run.name}")
        page.add(f"The resolved config (`{run.path / 'config.yaml'}`):", "```yaml\n" + run.config_text.rstrip() + "\n```")


def _costs(page: Page, runs: list[Run]) -> None:
    page.add("## Cost per stage")
    recorded = [r for r in runs if r.stages]
    shown = [(key, column) for key, _, _, column in recorded_costs(rec for r in recorded for rec in r.stages.values())]
    if not shown:
        page.add("No stage has a finished record with its cost in a manifest.json yet.")
        return
    order = list(STAGES)
    stages = sorted({s for r in recorded for s in r.stages}, key=lambda s: (order.index(s) if s in order else len(order), s))
    header, rows = ["stage"], [[s] for s in stages] + [["total"]]
    for run in recorded:
        prefix = f"{run.name}: " if len(recorded) > 1 else ""
        header += [prefix + column for _, column in shown]
        for row, stage in zip(rows, stages):
            row += [cost(run.stages.get(stage, {}), key) for key, _ in shown]
        rows[-1] += [round(sum(rec.get("wall_s", 0) for rec in run.stages.values()), 2) if key == "wall_s" else None
                     for key, _ in shown]
    page.add(_table(header, rows))
    plot_costs({r.name: r.stages for r in recorded}, stages, page.out / "images" / "costs.png")
    page.image("costs.png", "cost per stage", "Wall time and peak memory of each finished stage, from manifest.json: "
               "peak resident memory of the process on CPU, peak allocated memory of the largest GPU where one was used.")
    for run in recorded:
        env = run.manifest.get("soda_distill", {})
        versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
        page.add(f"**{run.name}** ran on {env.get('device', 'an unrecorded device')} ({versions or 'no versions recorded'}).")


def _nested(markdown: str, top: int) -> str:
    """Another file's Markdown under a heading of ours: its title dropped (our heading names the file), its other
    headings demoted so that the highest is level `top`."""
    markdown = re.sub(r"\A# .*\n+", "", markdown)
    levels = [len(m) for m in re.findall(r"^(#+) ", markdown, flags=re.M)]
    shift = top - min(levels, default=top)
    return re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m[1]) + shift) + " ", markdown, flags=re.M)


def _label(path: Path, runs: list[Run]) -> str:
    """A run's output directory as `RUN: eval/`; another directory by its path."""
    owner = next((r for r in runs if r.path == path.parent), None)
    return f"{owner.name}: `{path.name}/`" if owner else f"`{path}`"


def _evaluation(page: Page, evaluations: list[Path], runs: list[Run]) -> None:
    page.add("## Evaluation")
    if not evaluations:
        page.add("No evaluation found (a `results.json` in a run's subdirectory, or a directory given). "
                 "`soda-distill evaluate RUN` writes one to `RUN/eval/`.")
        return
    for i, path in enumerate(evaluations, 1):
        page.add(f"### {_label(path, runs)}")
        try:
            page.add(_nested((path / "results.md").read_text(encoding="utf-8").strip(), 4))
        except (OSError, ValueError) as e:
            page.add(f"`results.md` could not be read ({e}).")
        page.copy_image(path / "results.png", f"evaluation-{i}.png", "evaluation chart",
                        f"Evaluation results from `{path / 'results.png'}`.")


def _training(page: Page, runs: list[Run]) -> None:
    page.add("## Training curves")
    for curves in TRAINING_CURVES:
        page.add(f"### {curves.title}")
        metrics = {r.name: read_metrics(r.path / curves.metrics) for r in runs}
        drawn = {name: steps for name, steps in metrics.items() if has_curves(curves, steps)}
        absent = [name for name in metrics if name not in drawn]
        if drawn:
            plot_training(curves, drawn, page.out / "images" / f"training-{curves.stage}.png")
            page.image(f"training-{curves.stage}.png", curves.title,
                       f"Every logged optimizer step of `{curves.metrics}`" + (", one colour per run." if len(drawn) > 1 else "."))
        optional = curves.stage in OPTIONAL
        if absent:
            page.add(f"No `{curves.metrics}` with these metrics in: {', '.join(absent)}"
                     + (" (GAD is an optional baseline)." if optional else "."))


def _analysis(page: Page, analyses: list[Path], runs: list[Run]) -> None:
    page.add("## Representation analysis")
    if not analyses:
        page.add("No representation analysis found (an `analysis.json` in a run's subdirectory, or a directory given). "
                 "`soda-distill analyze RUN` writes one to `RUN/analysis/`.")
        return
    for i, path in enumerate(analyses, 1):
        page.add(f"### {_label(path, runs)}")
        try:
            result = json.loads((path / "analysis.json").read_text(encoding="utf-8"))
            models = result["models"]
            rows = []
            for name, m in models.items():
                cka = [c for c in m["cka"] if c is not None]
                rows.append([name, statistics.fmean(cka) if cka else None, m["cka"][-1], m["final_layer_entropy"],
                             m["final_layer_kurtosis"]])
        except (OSError, ValueError, KeyError, TypeError) as e:
            page.add(f"`analysis.json` could not be read ({type(e).__name__}: {e}).")
            continue
        source = result.get("source") or {}
        page.add(f"{result['num_prompts']} held-out prompts" + (f" from `{source['prompts']}`" if "prompts" in source else "")
                 + f"; the last prompt token's hidden state at each of {result['num_layers']} layers, compared with "
                 f"**{result['base']}**. Kurtosis: {result['kurtosis']}.",
                 _table(["model", "mean CKA (layers with variance)", "final-layer CKA", "final-layer entropy (nats)",
                         "final-layer kurtosis"], rows))
        page.copy_image(path / "cka.png", f"analysis-{i}-cka.png", "linear CKA per layer",
                        "Linear CKA of each layer to the base model's same layer (1 = the same structure up to rotation "
                        "and scale).")
        page.copy_image(path / "activation_stats.png", f"analysis-{i}-activations.png", "activation statistics",
                        "Entropy and kurtosis of all final-layer activation values (entropy over bins shared by "
                        "all models).")


def _pairs(page: Page, runs: list[Run]) -> None:
    page.add("## Preference pairs")
    lengths = {r.name: r.pair_lengths for r in runs if r.pair_lengths is not None}
    absent = [r.name for r in runs if r.name not in lengths]
    if lengths:
        rows = []
        for run in (r for r in runs if r.name in lengths):
            chosen, rejected = lengths[run.name]["chosen"], lengths[run.name]["rejected"]
            summary = {side: length_summary(v) for side, v in lengths[run.name].items()}
            tokens = run.stages.get("pairs", {}).get("lengths", {})
            dropped = run.stages.get("pairs", {}).get("dropped")
            rows.append([run.name, len(chosen), *(summary[s].get(k) for s in ("chosen", "rejected") for k in ("mean", "median", "p90", "max")),
                         round(100 * statistics.fmean(r > c for c, r in zip(chosen, rejected)), 1) if chosen else None,
                         tokens.get("chosen", {}).get("mean"), tokens.get("rejected", {}).get("mean"),
                         ", ".join(f"{k} {v}" for k, v in dropped.items()) if dropped else "none" if dropped is not None else None])
        page.add(_table(["run", "pairs", "chosen mean", "chosen median", "chosen p90", "chosen max", "rejected mean",
                         "rejected median", "rejected p90", "rejected max", "% rejected longer",
                         "chosen mean tokens", "rejected mean tokens", "dropped"], rows))
        plot_pair_lengths(lengths, page.out / "images" / "pair-lengths.png")
        page.image("pair-lengths.png", "pair lengths",
                   "Response lengths in whitespace-separated words (Python's str.split), counted from pairs.jsonl: "
                   "chosen = the teacher's answer, rejected = the student q0's. The token means in the table are the "
                   "pairs stage's own counts with the student's tokenizer (manifest.json; an end-of-turn token "
                   "included).")
    if absent:
        page.add(f"No readable `pairs.jsonl` in: {', '.join(absent)}.")


def write_report(paths: list[str | Path], out: str | Path) -> Path:
    """Write `report.md`, `images/` and the self-contained `report.html` into `out`; returns the HTML's path."""
    if not paths:
        raise SodaError("give one or more run directories (or evaluation or analysis directories) to report on")
    run_paths, evaluations, analyses = classify([Path(p) for p in paths])
    runs = [load_run(p, n) for p, n in zip(run_paths, names(run_paths))]
    out = Path(out)
    page = Page(out)
    title = "SODA report: " + (" vs ".join(r.name for r in runs) if runs else ", ".join(names(evaluations + analyses)))
    try:
        version = metadata.version("soda-distill")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    page.add(f"# {title}", f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')} by soda-distill {version}.")
    if runs:
        page.add("\n".join(f"- **{r.name}**: `{r.path}`" for r in runs))
    _overview(page, runs, evaluations, analyses)
    _evaluation(page, evaluations, runs)
    if runs:
        _training(page, runs)
    _analysis(page, analyses, runs)
    if runs:
        _pairs(page, runs)
        _costs(page, runs)
        _config(page, runs)
    markdown = page.markdown()
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html", html_document(title, markdown, out))
    return out / "report.html"
