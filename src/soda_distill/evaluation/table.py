"""evaluate's results as Markdown, in the layout of the paper's Table 1: one table per metric, rows × benchmarks."""

from __future__ import annotations


def cell(row: dict, bench: str, *path):
    value = row["cells"].get(bench)
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def markdown_table(results: dict, title: str, *path, bold_best: bool = True) -> str:
    """One metric across rows × benchmarks in Table 1's layout (the best per model in bold, as there)."""
    names = [b["name"] for b in results["benchmarks"]]
    lines = [f"### {title}", "", "| Model | Method | " + " | ".join(names) + " |", "| --- | --- |" + " ---: |" * len(names)]
    rows, previous = results["rows"], None
    for row in rows:
        cells = []
        for name in names:
            value = cell(row, name, *path)
            peers = [cell(r, name, *path) for r in rows if r["model"] == row["model"]]
            peers = [p for p in peers if p is not None]
            text = "—" if value is None else f"{value:.1f}"
            if bold_best and value is not None and len(peers) > 1 and value == max(peers):
                text = f"**{text}**"
            cells.append(text)
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
    parts.append(markdown_table(results, f"Exact match (%, on references of at most {s['exact_match_max_words']} words)",
                                "exact_match", "score"))
    parts.append(markdown_table(results, "Mean response length (words)", "length", "words", "mean", bold_best=False))
    parts.append("### Benchmarks\n\n" + "\n".join(
        f"- **{b['name']}** ({b['prompts']} prompts, `{b['path']}`){': ' + b['note'] if b['note'] else ''}"
        for b in results["benchmarks"]) + "\n")
    return "\n".join(parts)
