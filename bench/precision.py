"""Does bf16 train as fp32 does? The demo's warmup (configs/demo.yaml: SFT of the embedded student on 48 Dolly
answers, 18 steps) trained from the same seed and data in each precision, its per-step losses side by side.

    python bench/precision.py [--modes fp32,bf16,bf16_grid_masters,autocast] [--out runs/precision]

Modes: `fp32` (student.bf16=false); `bf16`, the package's bf16 path on CPU (bf16 weights, fp32 master weights in
the optimizer); `bf16_grid_masters`, that path as it was before 2026-12-06, its masters copied from the weights
already rounded to bf16; `autocast`, fp32 weights under bf16 autocast (what the package does on a GPU or across
processes). Each mode is a run directory under --out (resumable: a finished one is read, not trained again), each in
a process of its own. Every mode's losses against fp32's, step by step: the mean difference with a paired bootstrap
interval over the steps. Writes bench/results/precision.{json,md,png}.

    python bench/precision.py --replica

The quick replica (`bench/quality.py --quick`: every method trained, evaluated and paired) once in bf16 and once in
fp32 on this machine (`--tag bf16`, `--tag fp32`: tables of their own, resumable), and each paired effect (a method
against its baselines: ROUGE-L, reference NLL) in both, with whether bf16's estimate lies in fp32's interval. Adds
`quick_replica` to precision.json; the warmup modes there are kept.

    python bench/precision.py --eval-dtype [--runs runs]

Training or evaluation? The quick replica's models of both tables (under --runs) scored again on the same prompts'
reference answers with their weights in fp32 and in bf16: each row's reference NLL minus Base's, by the precision it
was trained in and the one it is scored in. Adds `evaluation_dtype` to precision.json.

    python bench/precision.py --across-machines [--row bench/results/alpaca_eval/rows/seed-42_Base.jsonl.gz]

Another kind of machine: a committed Base row of the AlpacaEval replica (the untouched student, bf16) made on one
machine, its answers and reference NLLs made again here. Greedy answers: one batch of the whole list's (the
shortest prompts, as the evaluation batched them), their first PREFIX_TOKENS tokens against the committed answers;
reference NLL: the first NLL_PROMPTS prompts, scored in bf16 and in fp32, minus the committed values. Adds
`across_machines` to precision.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from common import machine, versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("fp32", "bf16", "bf16_grid_masters", "autocast")
# The quick replica's tables: tag -> its settings. bf16's models once more with their NLL scored in fp32 (no training)
REPLICA = {"bf16": [], "fp32": ["--set", "student.bf16=false"],
           "bf16-fp32scored": ["--out", str(ROOT / "runs" / "quality-quick-bf16"), "--set", "evaluate.nll_dtype=float32"]}
EFFECTS = ("rouge_l", "reference_nll")


def train(mode: str, out: Path) -> None:
    """The demo's warmup in `mode`, in this process."""
    import torch

    import soda_distill.cpu.master_weights as training  # where bf16_weights looks adamw_for up
    from soda_distill.cli import main

    if mode == "autocast":
        training.adamw_for = lambda model, bf16: torch.optim.AdamW
    if mode == "bf16_grid_masters":
        chosen = training.adamw_for

        def rounded_first(model, bf16):
            model.to(torch.bfloat16)  # the weights rounded before the optimizer copies its masters, as before
            return chosen(model, bf16)

        training.adamw_for = rounded_first
    main(["warmup", str(ROOT / "configs" / "demo.yaml"), "--out", str(out), f"student.bf16={str(mode != 'fp32').lower()}"])


def summary(out: Path) -> dict:
    from soda_distill.manifest import read_manifest

    losses = [m["loss"] for m in map(json.loads, (out / "warmup" / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    stage = read_manifest(out)["stages"]["warmup"]
    return {"losses": losses, "mean_loss": round(sum(losses) / len(losses), 4), "wall_s": stage["wall_s"],
            "trained": stage["finished"]}  # a finished run is read, not trained again: when it was


def paired_effects(fp32: dict, bf16: dict) -> list[dict]:
    """Each paired difference (a row against a baseline, on a benchmark, for each metric of EFFECTS) that both
    evaluations' results have: both estimates, and whether bf16's lies in fp32's interval."""
    def by_effect(results):
        return {(row["method"], bench, vs): paired for row in results["rows"]
                for bench, cell in row["cells"].items() for vs, paired in (cell.get("paired") or {}).items()}

    theirs, effects = by_effect(bf16), []
    for key, mine in by_effect(fp32).items():
        for metric in EFFECTS:
            f, b = mine.get(metric), theirs.get(key, {}).get(metric)
            if f and b:
                effects.append({"effect": f"{key[0]} {key[2]}", "benchmark": key[1], "metric": metric,
                                "fp32": {k: f[k] for k in ("difference", "ci95")}, "bf16": {k: b[k] for k in ("difference", "ci95")},
                                "bf16_within_fp32": f["ci95"][0] <= b["difference"] <= f["ci95"][1]})
    return effects


def agreement(effects: list[dict]) -> dict:
    """Per metric: how many of bf16's estimates lie in fp32's interval; of the effects fp32 finds clear of 0, how many
    bf16 finds with the same sign, and clear of 0 too; and the median of bf16's size over fp32's on those."""
    out = {}
    for metric in EFFECTS:
        mine = [e for e in effects if e["metric"] == metric]
        clear = [e for e in mine if e["fp32"]["ci95"][0] > 0 or e["fp32"]["ci95"][1] < 0]
        same = [e for e in clear if e["bf16"]["difference"] * e["fp32"]["difference"] > 0]
        ratios = sorted(e["bf16"]["difference"] / e["fp32"]["difference"] for e in clear)
        out[metric] = {"within": sum(e["bf16_within_fp32"] for e in mine), "of": len(mine),
                       "fp32_clear_of_0": len(clear), "bf16_same_sign": len(same),
                       "bf16_clear_same_sign": sum(e["bf16"]["ci95"][0] > 0 or e["bf16"]["ci95"][1] < 0 for e in same),
                       "median_bf16_over_fp32": round(ratios[len(ratios) // 2], 2) if ratios else None}
    return out


def quick_replica() -> dict:
    """The quick replica in each precision (each table resumed until its evaluation is complete), and its paired
    effects side by side."""
    tables = {}
    for tag, settings in REPLICA.items():
        path = RESULTS / f"quality-quick-{tag}.json"
        for _ in range(3):  # a piece stops after --minutes; the next resumes it
            if path.exists() and json.loads(path.read_text())["evaluation_complete"]:
                break
            subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--tag", tag, *settings],
                           check=True)
        record = json.loads(path.read_text())
        if not record["evaluation_complete"]:
            raise SystemExit(f"{path}: the quick replica in {tag} did not complete")
        tables[tag] = record["results"]
    effects = paired_effects(tables["fp32"], tables["bf16"])
    scored = paired_effects(tables["fp32"], tables["bf16-fp32scored"])
    return {"command": "python bench/precision.py --replica", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tables": {tag: f"bench/results/quality-quick-{tag}.json" for tag in REPLICA}, "effects": effects,
            "within": sum(e["bf16_within_fp32"] for e in effects), "of": len(effects), "by_metric": agreement(effects),
            "scored_fp32": {"effects": scored, "within": sum(e["bf16_within_fp32"] for e in scored), "of": len(scored),
                            "by_metric": agreement(scored)}}


ROWS = {"Warmup (q_w)": "warmup", "SeqKD": "seqkd", "SODA": "distill", "GAD": "gad/generator"}  # row -> its model


def evaluation_dtype(runs: Path) -> dict:
    """Each trained row's reference NLL minus Base's (mean over the quick replica's prompts, each benchmark's), its
    weights in each dtype: trained in bf16 or fp32 × scored in bf16 or fp32."""
    import torch

    from soda_distill.config import load_config
    from soda_distill.evaluation.benchmarks import load_benchmarks, student_prompt
    from soda_distill.evaluation.nll import reference_nll
    from soda_distill.models import load_model, load_tokenizer, resolve_model

    cfg = load_config(str(ROOT / "configs" / "quality.yaml"), ["evaluate.limit=10"])  # as --quick evaluates
    items = [item for bench in load_benchmarks(cfg.evaluate) for item in bench.items]
    prompts = [student_prompt(item, cfg.evaluate.prompt_format) for item in items]
    references = [item.reference for item in items]
    base = resolve_model(cfg.student.model)
    tokenizer = load_tokenizer(base)
    out = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):

        def mean_nll(path: str) -> float:
            values = reference_nll(load_model(path, dtype), tokenizer, prompts, references, desc=f"{Path(path).name} ({name})")
            return sum(values) / len(values)

        base_nll = mean_nll(base)
        for trained in ("bf16", "fp32"):
            seed = runs / f"quality-quick-{trained}" / "seed-42"
            for row, folder in ROWS.items():
                out.setdefault(f"trained {trained}", {}).setdefault(row, {})[f"scored {name}"] = round(
                    mean_nll(str(seed / folder)) - base_nll, 4)
    return {"command": "python bench/precision.py --eval-dtype", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "prompts": len(prompts), "minus_base": out}


PREFIX_TOKENS, NLL_PROMPTS = 160, 40


def across_machines(row: Path) -> dict:
    """The committed Base row `row` made again on this machine: how many greedy answers of one batch begin as they
    did there (over PREFIX_TOKENS tokens), and how far each prompt's reference NLL moved, in bf16 and in fp32."""
    import statistics

    import torch

    from soda_distill.config import load_config
    from soda_distill.evaluation.benchmarks import load_benchmarks, student_prompt
    from soda_distill.evaluation.nll import reference_nll
    from soda_distill.generation import Sampling, generate_transformers, prompt_tokens
    from soda_distill.models import load_model, load_tokenizer, resolve_model
    from soda_distill.records import read_jsonl

    cfg = load_config(str(ROOT / "configs" / "alpaca_eval.yaml"))
    committed = [record for _, record in read_jsonl(row)]
    (bench,) = load_benchmarks(cfg.evaluate)
    assert [item.id for item in bench.items] == [r["id"] for r in committed], f"{row}: not {bench.name}'s prompts"
    prompts = [student_prompt(item, cfg.evaluate.prompt_format) for item in bench.items]
    path = resolve_model(cfg.student.model)
    tokenizer, model = load_tokenizer(path), load_model(path, torch.bfloat16)
    # the batch of the shortest prompts, cut from the whole list as the evaluation cut it (the batch shapes the sums)
    size = cfg.evaluate.batch_size
    lengths = prompt_tokens(tokenizer, prompts)
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    batch, answers = set(order[(len(order) - 1) // size * size :]), {}
    generate_transformers(model, tokenizer, prompts, Sampling(max_new_tokens=PREFIX_TOKENS), size,
                          done=lambda i: i not in batch, on_batch=lambda results: answers.update(results))
    same = sum(committed[i]["messages"][-1]["content"].startswith(g.text) for i, g in answers.items())
    nll = {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        values = reference_nll(load_model(path, dtype), tokenizer, prompts[:NLL_PROMPTS],
                               [item.reference for item in bench.items[:NLL_PROMPTS]], desc=f"reference NLL ({name})")
        diffs = [v - r["reference_nll"] for v, r in zip(values, committed)]
        nll[name] = {"mean_difference": round(statistics.fmean(diffs), 5),
                     "mean_absolute_difference": round(statistics.fmean(map(abs, diffs)), 5),
                     "largest_absolute_difference": round(max(map(abs, diffs)), 5)}
    made = json.loads((row.parent / "provenance.json").read_text()).get(f"{row.stem.split('_', 1)[0]}/Base", {})
    return {"command": f"python bench/precision.py --across-machines --row {row.relative_to(ROOT)}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "row": str(row.relative_to(ROOT)),
            "made_on": made.get("machine"), "made_with": {k: made.get(k) for k in ("precision", "versions")},
            "here": machine(), "versions_here": versions(),
            "answers": {"batch": len(answers), "prefix_tokens": PREFIX_TOKENS, "begin_the_same": same},
            "reference_nll": {"prompts": NLL_PROMPTS, "committed_dtype": "bf16", "minus_committed": nll}}


def render(record: dict) -> str:
    lines = ["# Does bf16 train as fp32 does?", "", f"The demo's warmup ({record['config']}), trained from the same seed "
             "and data in each precision; each mode's per-step SFT loss against fp32's, paired over the steps (bootstrap "
             "95% interval).", "", "| mode | mean loss | − fp32, per step | stage wall time (s) | trained |",
             "| --- | ---: | ---: | ---: | --- |"]
    for mode, run in record["modes"].items():
        d = run.get("minus_fp32")
        lines.append(f"| {mode} | {run['mean_loss']:.3f} | "
                     + (f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "—")
                     + f" | {run['wall_s']:.0f} | {run['trained']} |")
    lines += ["", "![per-step losses](precision.png)", "",
              f"`{record['command']}` — {record['date']}, {record['machine']}.", ""]
    if replica := record.get("quick_replica"):
        interval = lambda d, n: f"{d['difference']:+.{n}f} [{d['ci95'][0]:+.{n}f}, {d['ci95'][1]:+.{n}f}]"
        lines += ["## The quick replica's effects in each precision", "",
                  f"`bench/quality.py --quick` trained and evaluated in bf16 and in fp32 on this machine (the tables: "
                  f"{', '.join(f'`{t}`' for t in replica['tables'].values())}); each paired effect in both, and whether "
                  f"bf16's estimate lies in fp32's 95% interval: {replica['within']} of {replica['of']}.", "",
                  "| bf16's models, NLL scored in | metric | bf16 in fp32's interval | clear of 0 in fp32 | same sign in "
                  "bf16 | and clear of 0 | median bf16 ÷ fp32 there |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        comparisons = {"bf16": replica["by_metric"], **({"fp32": replica["scored_fp32"]["by_metric"]} if "scored_fp32" in replica else {})}
        lines += [f"| {dtype} | {metric} | {a['within']} of {a['of']} | {a['fp32_clear_of_0']} | {a['bf16_same_sign']} | "
                  f"{a['bf16_clear_same_sign']} | {a['median_bf16_over_fp32']} |"
                  for dtype, by_metric in comparisons.items() for metric, a in by_metric.items()
                  if dtype == "bf16" or metric == "reference_nll"]  # scoring changes no answer: ROUGE-L is the same
        lines += ["", "| effect | benchmark | metric | fp32 | bf16 | bf16 in fp32's interval |", "| --- | --- | --- | ---: | ---: | --- |"]
        lines += [f"| {e['effect']} | {e['benchmark']} | {e['metric']} | {interval(e['fp32'], 3 if 'nll' in e['metric'] else 2)} "
                  f"| {interval(e['bf16'], 3 if 'nll' in e['metric'] else 2)} | {'yes' if e['bf16_within_fp32'] else '**no**'} |"
                  for e in replica["effects"]]
        lines += ["", f"`{replica['command']}` — {replica['date']}.", ""]
    if scored := record.get("evaluation_dtype"):
        columns = sorted({c for rows in scored["minus_base"].values() for r in rows.values() for c in r})
        lines += ["## Trained or scored in bf16?", "",
                  f"Each quick-replica row's reference NLL minus Base's, mean over the {scored['prompts']} prompts of "
                  "its three benchmarks, the weights of both scored in each dtype:", "",
                  "| trained in | row | " + " | ".join(columns) + " |", "| --- | --- |" + " ---: |" * len(columns)]
        lines += [f"| {trained.removeprefix('trained ')} | {row} | " + " | ".join(f"{v[c]:+.4f}" for c in columns) + " |"
                  for trained, rows in scored["minus_base"].items() for row, v in rows.items()]
        lines += ["", f"`{scored['command']}` — {scored['date']}.", ""]
    if remade := record.get("across_machines"):
        first = remade[0]
        lines += ["## Another kind of machine", "",
                  f"The AlpacaEval replica's committed Base row (`{first['row']}`: bf16, made on {first['made_on']} with "
                  f"transformers {first['made_with']['versions']['transformers']}) made again here. Greedy answers: of "
                  f"one batch of {first['answers']['batch']}, how many begin with the same {first['answers']['prefix_tokens']} "
                  f"tokens; reference NLL of the first {first['reference_nll']['prompts']} prompts minus the committed "
                  "values (nats per token), mean and mean absolute difference:", "",
                  "| made again on | transformers | same answers | NLL in bf16 | \\|bf16\\| | NLL in fp32 | \\|fp32\\| |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for run in remade:
            nll = run["reference_nll"]["minus_committed"]
            lines.append(f"| {run['here']} | {run['versions_here']['transformers']} | {run['answers']['begin_the_same']} of "
                         f"{run['answers']['batch']} | " + " | ".join(f"{nll[d]['mean_difference']:+.5f} | "
                                                                     f"{nll[d]['mean_absolute_difference']:.5f}" for d in ("bf16", "fp32")) + " |")
        lines += ["", *(f"`{run['command']}` — {run['date']}." for run in remade), ""]
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, run in record["modes"].items():
        ax.plot(range(1, len(run["losses"]) + 1), run["losses"], marker="o", ms=3, label=f"{mode} (mean {run['mean_loss']:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("SFT loss (nats per answer token)")
    ax.set_title("The demo's warmup, same seed and data, by precision")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "precision")
    parser.add_argument("--replica", action="store_true", help="the quick replica's effects in bf16 and in fp32")
    parser.add_argument("--eval-dtype", action="store_true", help="the quick replica's models scored in fp32 and bf16")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="with --eval-dtype: where its runs are")
    parser.add_argument("--across-machines", action="store_true",
                        help="a committed Base row of the AlpacaEval replica made again on this machine")
    parser.add_argument("--row", type=Path, default=RESULTS / "alpaca_eval" / "rows" / "seed-42_Base.jsonl.gz")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child process: train one mode
    args = parser.parse_args()
    if args.one:
        return train(args.one, args.out / args.one)
    if args.replica or args.eval_dtype or args.across_machines:
        record = json.loads((RESULTS / "precision.json").read_text())
        if args.replica:
            record["quick_replica"] = quick_replica()
        if args.eval_dtype:
            record["evaluation_dtype"] = evaluation_dtype(args.runs)
        if args.across_machines:  # one entry per machine and versions
            remade = across_machines(args.row.resolve())
            record["across_machines"] = [*(run for run in record.get("across_machines", []) if
                                           (run["here"], run["versions_here"]) != (remade["here"], remade["versions_here"])), remade]
        (RESULTS / "precision.json").write_text(json.dumps(record, indent=1) + "\n")
        (RESULTS / "precision.md").write_text(render(record))
        return print(json.dumps(record["across_machines"][-1] if args.across_machines else record["evaluation_dtype"]
                                if args.eval_dtype else {k: record["quick_replica"][k] for k in ("within", "of")}))
    from soda_distill.stats import paired_difference

    modes = args.modes.split(",")
    for mode in modes:
        if not (args.out / mode / "warmup" / "config.json").exists():
            subprocess.run([sys.executable, __file__, "--one", mode, "--out", str(args.out)], check=True)
    runs = {mode: summary(args.out / mode) for mode in modes}
    reference = runs.get("fp32")
    for mode, run in runs.items():
        if reference and mode != "fp32":
            run["minus_fp32"] = paired_difference(run["losses"], reference["losses"])
    default_out = ROOT / "runs" / "precision"
    record = {"command": "python bench/precision.py" + (f" --modes {args.modes}" if args.modes != ",".join(MODES) else "")
                         + (f" --out {args.out}" if args.out.resolve() != default_out else ""),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "versions": versions(), "config": "configs/demo.yaml (warmup stage: 48 prompts, 3 epochs, 18 steps)",
              "modes": runs}
    if (RESULTS / "precision.json").exists():  # the quick replica's effects, measured by --replica, stay
        record.update({k: v for k, v in json.loads((RESULTS / "precision.json").read_text()).items()
                       if k in ("quick_replica", "evaluation_dtype", "across_machines")})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "precision.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(record, RESULTS / "precision.png")
    (RESULTS / "precision.md").write_text(render(record))
    print(json.dumps({m: {k: v for k, v in r.items() if k != "losses"} for m, r in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
