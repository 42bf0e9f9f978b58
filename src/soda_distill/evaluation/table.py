"""evaluate's results as Markdown, in the layout of the paper's Table 1: one table per metric, rows × benchmarks."""

from __future__ import annotations

from ..stats import seeds_interval_of


def cell(row: dict, bench: str, *path):
    value = row["cells"].get(bench)
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _interval(ci: list[float] | None, digits: int, signed: bool = False) -> str:
    if not ci:
        return ""
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f" [{f.format(ci[0])}, {f.format(ci[1])}]"


def markdown_table(results: dict, title: str, *path, bold_best: bool = True, lower_is_better: bool = False,
                   digits: int = 1) -> str:
    """One metric across rows × benchmarks in Table 1's layout (the best per model in bold, as there), with its
    bootstrap 95% interval over prompts where results.json has one (the metric's key + `_ci95`); nothing where no row
    has the metric."""
    names = [b["name"] for b in results["benchmarks"]]
    if all(cell(row, name, *path) is None for row in results["rows"] for name in names):
        return ""
    lines = [f"### {title}", "", "| Model | Method | " + " | ".join(names) + " |", "| --- | --- |" + " ---: |" * len(names)]
    rows, previous = results["rows"], None
    for row in rows:
        cells = []
        for name in names:
            value = cell(row, name, *path)
            peers = [cell(r, name, *path) for r in rows if r["model"] == row["model"]]
            peers = [p for p in peers if p is not None]
            text = "—" if value is None else f"{value:.{digits}f}"
            best = (min if lower_is_better else max)(peers, default=None)
            if bold_best and value is not None and len(peers) > 1 and value == best:
                text = f"**{text}**"
            interval = cell(row, name, *path[:-1], f"{path[-1]}_ci95")
            cells.append(text + (_interval(interval, digits) if isinstance(interval, list) else ""))
        model = row["model"] if row["model"] != previous else ""
        previous = row["model"]
        lines.append(f"| {model} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(results: dict) -> str:
    s, judge = results["settings"], results["judge"]
    parts = [
        "# Evaluation results\n",
        f"Greedy decoding, at most {s['max_new_tokens']} new tokens, prompt format `{s['prompt_format']}`"
        + (f", first {s['limit']} prompts per benchmark" if s["limit"] else "") + ".\n",
    ]
    if judge:
        parts.append(markdown_table(results, f"Judge score ({judge['model']}): S/(S+R)×100 against {results['reference']['source']}, "
                                              "50 = parity, mean over both presentation orders", "judge", "score"))
        parts.append(f"Per order in results.json. Unparseable judge replies (counted, not scored): {judge['unparseable']} "
                     f"of {judge['judgments']}. Judge tokens: {judge['usage']['prompt_tokens']} in, "
                     f"{judge['usage']['completion_tokens']} out; estimated cost: "
                     + (f"${judge['cost_usd']:.4f}" if judge["cost_usd"] is not None else "no price set") + ".\n")
    parts.append(markdown_table(results, "ROUGE-L (F1 × 100, against the benchmarks' references)", "rouge_l"))
    parts.append(markdown_table(results, "Reference NLL (nats per token of the benchmarks' reference answers; lower is "
                                "closer)", "reference_nll", lower_is_better=True, digits=3))
    parts.append(markdown_table(results, "Held-out preference margin (nats per token: NLL of q0's own greedy answer − "
                                "NLL of the reference answer; higher prefers the reference more)", "preference_margin",
                                digits=3))
    parts.append(markdown_table(results, "Held-out preference accuracy (% of prompts on which the model finds the "
                                "reference answer more likely per token than q0's own greedy answer)", "preference_accuracy"))
    parts.append(paired_tables(results))
    parts.append(across_runs_tables(results))
    parts.append(markdown_table(results, f"Exact match (%, on references of at most {s['exact_match_max_words']} words)",
                                "exact_match", "score"))
    parts.append(markdown_table(results, "Mean response length (words)", "length", "words", "mean", bold_best=False))
    parts.append(markdown_table(results, "Repetition (seq-rep-4 × 100: the share of an answer's word 4-grams that "
                                "repeat an earlier one; lower is better)", "repetition", lower_is_better=True))
    parts.append(markdown_table(results, f"Answers cut at the token limit ({s['max_new_tokens']} new tokens, %; lower "
                                "is better)", "cut", lower_is_better=True))
    parts.append("### Benchmarks\n\n" + "\n".join(
        f"- **{b['name']}** ({b['prompts']} prompts, `{b['path']}`){': ' + b['note'] if b['note'] else ''}"
        for b in results["benchmarks"]) + "\n")
    return "\n".join(part for part in parts if part)


PAIRED = (("rouge_l", "ROUGE-L"), ("reference_nll", "reference NLL (negative: closer to the references)"),
          ("preference_margin", "held-out preference margin (positive: the reference gained on q0's answer)"),
          ("preference_accuracy", "held-out preference accuracy, points of %"),
          ("repetition", "repetition, seq-rep-4 (negative: fewer repeated 4-grams)"),
          ("cut", "answers cut at the token limit, points of % (negative: fewer)"),
          ("judge", "judge score"))


def _difference(c: dict | None, digits: int) -> str:
    """A paired difference with its interval, each run's own difference where there are several runs, and the
    difference at equal length with its interval."""
    if c is None:
        return "—"
    text = f"{c['difference']:+.{digits}f}" + _interval(c["ci95"], digits, signed=True)
    if "per_seed" in c:
        seeds = seeds_interval_of(c)
        text += " (" + ", ".join(f"{d:+.{digits}f}" for d in c["per_seed"]) + (
            f"; seeds{_interval(seeds, digits, signed=True)}" if seeds else "") + ")"
    lc = c.get("length_controlled")
    if not lc:
        return text
    lc_seeds = seeds_interval_of(lc)
    return (text + f"; LC {lc['difference']:+.{digits}f}" + _interval(lc["ci95"], digits, signed=True)
            + (f" (seeds{_interval(lc_seeds, digits, signed=True)})" if lc_seeds else ""))


def _difference_tables(heading: str, columns: list[str], names: list[str], rows: list[tuple[list[str], callable]]) -> str:
    """One table per metric of PAIRED: a line per (its first cells, a function from (benchmark, metric) to the
    difference), benchmarks as columns; lines and tables with nothing in them are left out."""
    parts = [heading]
    for metric, title in PAIRED:
        digits = 3 if metric in ("reference_nll", "preference_margin") else 2
        lines = []
        for first, difference in rows:
            cells = [difference(n, metric) for n in names]
            if any(cells):
                lines.append("| " + " | ".join([*first, *(_difference(c, digits) for c in cells)]) + " |")
        if lines:
            parts.append(f"**{title}**\n\n| " + " | ".join([*columns, *names]) + " |\n|" + " --- |" * len(columns)
                         + " ---: |" * len(names) + "\n" + "\n".join(lines) + "\n")
    return "\n".join(parts) if len(parts) > 1 else ""


def paired_tables(results: dict) -> str:
    """Each row's difference to Base, SeqKD and q_w of its own model, on the same prompts, with paired bootstrap 95%
    intervals: an interval that excludes 0 is a difference these prompts can tell apart."""
    comparisons = [(row, vs) for row in results["rows"] for vs in dict.fromkeys(
        k for c in row["cells"].values() for k in (c.get("paired") or {}))]
    return _difference_tables(
        "### Paired differences (this row − the named one, same prompts; bootstrap 95% interval over prompts; LC: at "
        "equal answer length, the per-prompt differences fitted against the log ratio of the two answers' words)\n",
        ["Model", "Method", "against"], [b["name"] for b in results["benchmarks"]],
        [([row["model"], row["method"], vs],
          lambda n, metric, row=row, vs=vs: ((row["cells"].get(n, {}).get("paired") or {}).get(vs) or {}).get(metric))
         for row, vs in comparisons])


def across_runs_tables(results: dict) -> str:
    """Each method that several runs (seeds) have, against each baseline: the difference over all runs and prompts
    with its two-level bootstrap interval (runs and prompts resampled), then each run's own difference and the t
    interval over those."""
    entries = results.get("across_runs") or []
    return _difference_tables(
        "### Across runs (this method − the named one over every run and prompt; 95% interval resampling runs and "
        "prompts; in parentheses each run's own difference and, `seeds`, the t 95% interval over them: where the method's "
        "mean difference lies, wide for two or three runs. A difference of the method, not only of these models, is clear "
        "of 0 where both intervals are)\n",
        ["Method", "against", "runs"], [b["name"] for b in results["benchmarks"]],
        [([e["method"], vs, str(len(e["runs"]))],
          lambda n, metric, e=e, vs=vs: ((e["cells"].get(n) or {}).get(vs) or {}).get(metric))
         for e in entries for vs in dict.fromkeys(k for c in e["cells"].values() for k in c)])
