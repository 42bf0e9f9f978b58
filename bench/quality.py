"""Does it distill? The small-scale replica of the paper's Table 1 on this machine: `soda-distill compare
configs/quality.yaml` — the embedded SmolLM2-135M from the 400 shipped Dolly answers; Base, SeqKD, SODA and GAD on
Dolly held-out, SelfInst and Vicuna, with paired bootstrap intervals (and across seeds, with several).

    python bench/quality.py [--quick] [--minutes M] [--seeds 42,43,44] [--methods base,warmup,soda] [--with-committed]
                            [--variant NAME KEY=VALUE ...] [--variant-method soda|warmup|seqkd] [--out DIR]
    python bench/quality.py --methods base,warmup,seqkd,soda --variant rpo 'distill.loss_type=[sigmoid, sft]'
    python bench/quality.py --methods base,warmup,soda --variant other_q0 pairs.rejected_source=other_q0   # Table 2
    python bench/quality.py --methods seqkd,opd --with-committed --set opd.teacher_model=runs/quality/seed-42/seqkd
    python bench/quality.py --methods none --with-committed --variant w3 warmup.epochs=3   # Base's answers as committed
    python bench/quality.py --quick --tag fp32 --set student.bf16=false   # a second table beside the first: fp32

The replica takes hours here, so it runs in pieces: each call works for at most --minutes (default 60) and is then
stopped (every stage and the evaluation resume where they were), and the results say which parts are done:
each seed's and variant's finished stages with their seconds (and a DPO's `refresh` and `selection` figures: what
the on-policy dial cost, which band selection kept), and the evaluation's table once it is complete. With --methods
the table covers those methods (a later call with more adds rows; answers already generated are reused). Run
directories do not outlive a session here, so each complete table also commits every row's answers and per-prompt
figures (bench/results/quality/rows/); a later session's `--with-committed` puts them beside the rows it trains
(another seed, GAD, an ablation), paired on the same prompts. A --variant is SODA trained again with other settings in
runs/quality-NAME/ (from the seed's own q_w and q0 answers where this session has them), its row `SODA (NAME)`
compared with every other on the same prompts — and paired with the variants named before it in the command (for
the on-policy dial: `--variant norefresh --variant refresh4 distill.refresh_every=4`, SODA retrained beside it from
the same q_w): Table 2's rejection sources, RPO, a sweep point. A variant starts from the stages it shares with the
seed's run or with a variant named before it, whichever shares more: those whose config sections (the registry's
`reads`) are the same in both; its q_w is a row `Warmup (q_w, NAME)` where no earlier run had it. With
--variant-method warmup a variant is the warmup alone, its row `Warmup (q_w, NAME)` (bench/greybox.sh: the grey-box
teacher's KL term). --quick is the regression check, the whole comparison on 24 prompts, short answers and 10 prompts
per benchmark, in about 20 minutes. --tag TAG keeps a table apart from the others (its runs, results and rows named
NAME-TAG): the same replica in another precision, say.
Writes bench/results/quality[-quick][-TAG].json (+ .md and .png once the evaluation is complete).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import machine, versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = ROOT / "configs" / "quality.yaml"
QUICK = ["data.limit=24", "snapshot.max_new_tokens=96", "seqkd.epochs=2", "gad.max_new_tokens=64", "gad.epochs=0.67",
         "evaluate.limit=10", "evaluate.max_new_tokens=96"]


# the package as a module: also where it is not installed, only on PYTHONPATH (a GPU machine: bench/gpu.sh)
SODA_DISTILL = [sys.executable, "-m", "soda_distill"]
KEPT = ("wall_s", "resumed_from_step", "pieces", "pieces_uncounted", "refresh", "selection")  # of a stage's record


def progress(out: Path, runs_by_label: dict[str, Path]) -> dict:
    """What is done: each run's finished stages (their seconds, of every piece where the stage was resumed after a
    stop, and what the on-policy dial and pair selection cost or kept), and how many answers the evaluation has generated."""
    from soda_distill.manifest import read_manifest
    from soda_distill.registry import STAGES, finished

    runs = {}
    for label, path in runs_by_label.items():
        stages = read_manifest(path)["stages"]
        done = [name for name in STAGES if finished(path, stages, name)]
        runs[label] = {name: {"done": name in done, **({k: v for k, v in stages[name].items() if k in KEPT}
                                                       if name in done else {})}
                       for name in STAGES} if path.exists() else "not started"
    generations = out / "evaluation" / "generations.jsonl"
    return {"runs": runs, "evaluation_answers": sum(1 for _ in generations.open()) if generations.exists() else 0,
            "evaluation_complete": (out / "evaluation" / "results.json").exists()
            and (out / "report" / "report.html").exists()}


def carry_over(path: Path, record: dict) -> dict:
    """`record` with what the results file at `path` says of the committed rows it carries over: the runs this call
    did not touch (their stages' seconds), and the earlier commands that made the rows (`earlier_commands`). A piece
    that leaves its table unfinished changes nothing of the file's but its `in_progress`: the record."""
    if not path.exists():
        return record
    earlier = json.loads(path.read_text())
    if not record["evaluation_complete"]:
        return {**{k: v for k, v in earlier.items() if k != "in_progress"}, "in_progress": record}
    done = lambda run: isinstance(run, dict) and any(stage.get("done") for stage in run.values())
    runs = {**{label: run for label, run in earlier.get("runs", {}).items() if done(run)},
            **{label: run for label, run in record["runs"].items() if done(run) or label not in earlier.get("runs", {})}}
    commands = [*earlier.get("earlier_commands", []), {"date": earlier["date"], "command": earlier["command"]}]
    commands = [c for c in commands if c["command"] != record["command"]]
    return {**record, "runs": runs, "earlier_commands": list({c["command"]: c for c in commands}.values())}


def run_for(cmd: list[str], seconds: float) -> int:
    """Run `cmd` for at most `seconds`, then stop it (every stage resumes where it was); its exit code."""
    print("$ soda-distill", " ".join(cmd[len(SODA_DISTILL):]), flush=True)
    # SIGINT as Python expects it: a shell starting this in the background (`cmd &`) leaves it ignored, and then the
    # stop at the end of a piece would not reach the command.
    process = subprocess.Popen(cmd, env={**os.environ, "TQDM_DISABLE": "1"}, start_new_session=True, cwd=ROOT,  # the
                               # configs' relative data paths are the checkout's
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        return process.wait(timeout=seconds)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # time is up, or Ctrl-C: stop it, and the next call resumes
        os.killpg(process.pid, signal.SIGINT)
        try:
            return process.wait(timeout=120)
        except subprocess.TimeoutExpired:  # every stage resumes after a kill too
            os.killpg(process.pid, signal.SIGKILL)
            return process.wait()


def rows_record(rows: Path, name: str) -> dict:
    """rows/index.json (label -> its file) or rows/provenance.json (label -> the machine, precision and versions that
    made it); empty before the first row."""
    return json.loads((rows / name).read_text()) if (rows / name).exists() else {}


def keep_rows(evaldir: Path, evaluation: dict, rows: Path, made: set[str], made_with: dict,
              same_base: dict[str, str]) -> None:
    """Each row's answers and per-prompt figures, every benchmark in one gzipped JSONL file (the benchmarks' ids are
    distinct; a sixth of the size: every checkout carries them, a GPU machine's too), rows/index.json naming each
    file's row: what `--with-committed` adds to a later table; and for the rows this call made (`made`),
    rows/provenance.json: the machine, precision and versions they were trained and evaluated with (a Base taken from
    another seed's, `same_base`, its source's, and which row that was)."""
    from soda_distill.evaluation.evaluate import slug
    from soda_distill.records import atomic_write_text

    rows.mkdir(parents=True, exist_ok=True)
    index, made_by = rows_record(rows, "index.json"), rows_record(rows, "provenance.json")
    for row in evaluation["rows"]:
        label = f"{row['model']}/{row['method']}"
        records = [(evaldir / "responses" / slug(label) / f"{slug(b['name'])}.jsonl").read_text() for b in evaluation["benchmarks"]]
        atomic_write_text(rows / f"{slug(label)}.jsonl.gz", "".join(records))
        (rows / f"{slug(label)}.jsonl").unlink(missing_ok=True)  # as rows were kept before 2026-12-07
        index[label] = f"{slug(label)}.jsonl.gz"
        if label in made:
            made_by[label] = made_with
        elif label in same_base:
            made_by[label] = {**made_by.get(same_base[label], {}), "answers_of": same_base[label]}
    (rows / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    (rows / "provenance.json").write_text(json.dumps(made_by, indent=1, sort_keys=True) + "\n")


def committed_rows(rows: Path, leave_out: set[str], made_with: dict[str, str]) -> dict[str, str]:
    """The committed rows (label -> file) for `--with-committed`, but those this call makes, and those trained in
    another precision or scored in another dtype than this call's (`made_with`): no comparison mixes precisions. A row
    that does not name its NLL's dtype was scored in its training precision's."""
    index, made_by = rows_record(rows, "index.json"), rows_record(rows, "provenance.json")

    def row_made_with(label: str) -> dict[str, str]:
        row = {"precision": made_with["precision"], **made_by.get(label, {})}
        return {"precision": row["precision"],
                "nll_dtype": row.get("nll_dtype", "bfloat16" if row["precision"] == "bf16" else "float32")}

    other = sorted(label for label in index if row_made_with(label) != made_with)
    if other:
        print(f"left out, trained or scored otherwise than {made_with} (evaluate.nll_dtype=student scores as rows "
              f"did before 2026-12-06): {', '.join(other)}", flush=True)
    kept = [label for label in index if label not in leave_out and label not in other]
    return {label: str(rows / index[label]) for label in sorted(kept)}  # evaluate orders the table


def shared_bases(committed: dict[str, str], seeds: list[int], made: set[str], made_on: dict[str, str],
                 here: str) -> dict[str, str]:
    """Base rows for the seeds of this call that neither make nor have one: a committed seed's Base made on this kind
    of machine (`made_on`: label -> machine), label -> that label. Base is the untouched student answering the same
    held-out prompts greedily, so no seed plays a part in it (one `compare` over several seeds asks it once for all);
    but another kind of machine answers otherwise (bf16 on AMX or on AVX512 rounds differently)."""
    bases = [label for label in committed if label.endswith("/Base") and made_on.get(label) == here]
    return {f"seed-{seed}/Base": bases[0] for seed in seeds
            if bases and f"seed-{seed}/Base" not in made and f"seed-{seed}/Base" not in committed}


def shared_with(source: Path, settings: list[str], stage: str, config: Path = CONFIG) -> list[str]:
    """What a variant with these settings can take from the run `source`: of teacher, snapshot, pairs and warmup,
    those its `stage` needs whose config sections (the registry's `reads`) are the same in both runs, and all they need
    likewise."""
    import dataclasses

    from soda_distill.config import fingerprint, load_config
    from soda_distill.manifest import read_manifest
    from soda_distill.pipeline import resolve_paths
    from soda_distill.registry import chain, finished, shared_stages

    if not (source / "config.yaml").exists():
        return []
    mine, theirs = (resolve_paths(load_config(c, o)) for c, o in ((config, settings), (source / "config.yaml", [])))
    differ = [f"{f.name}." for f in dataclasses.fields(mine) if dataclasses.is_dataclass(getattr(mine, f.name))
              and fingerprint(getattr(mine, f.name)) != fingerprint(getattr(theirs, f.name))]
    stages = read_manifest(source)["stages"]
    return [s for s in shared_stages(differ) if s in chain([stage]) and finished(source, stages, s)]


def new_model(run: Path, stage: str, earlier: list[Path]) -> bool:
    """Whether `stage` finished in `run` with another fingerprint than in each `earlier` run (the same: its model is
    theirs, copied or trained again). Reads the manifests only: creates no run directory."""
    from soda_distill.manifest import read_manifest
    from soda_distill.registry import finished

    mine = read_manifest(run)["stages"]
    return (finished(run, mine, stage) and all(read_manifest(path)["stages"].get(stage, {}).get("fingerprint")
                                               != mine[stage]["fingerprint"] for path in earlier))


def reuse_stages(sources: list[Path], path: Path, settings: list[str], stage: str, config: Path = CONFIG) -> None:
    """Start a variant in `path` from whichever of `sources` shares the most finished stages with it (the later of
    equals: a variant named before it, say one with the same teacher)."""
    from soda_distill.manifest import copy_stages

    options = [(shared_with(source, settings, stage, config), source) for source in sources]
    shared, source = max(reversed(options), key=lambda option: len(option[0]))  # max keeps the first of equals
    if shared:
        print(f"{path}: {', '.join(shared)} from {source}", flush=True)
        copy_stages(source, path, shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the regression check: ~20 minutes")
    parser.add_argument("--minutes", type=float, default=60, help="stop after this long (it resumes next time)")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds (the aim: 42,43,44)")
    parser.add_argument("--methods", help="comma-separated methods, a subset of the config's compare.methods: the "
                        "evaluation covers those trained so far, so a part of the table is ready before the whole; "
                        "`none` with --with-committed: the committed rows and the variants only")
    parser.add_argument("--with-committed", action="store_true",
                        help="add the rows whose answers and figures are committed (bench/results/quality/rows/) and "
                             "that this call does not make: the table grows across sessions without their models")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                        help="SODA (or --variant-method) again with these settings (from the stages of the seed's "
                             "run it shares), its row `SODA (NAME)` (`Warmup (q_w, NAME)`, ...) paired with the others: an "
                             "ablation or sweep point")
    parser.add_argument("--variant-method", default="soda", choices=["soda", "warmup", "seqkd"],
                        help="the method each --variant trains (default soda): `warmup` for a variant of the SFT "
                             "alone, its row `Warmup (q_w, NAME)` (a grey-box teacher's KL term), `seqkd` likewise")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings for the compared methods' stages, such as OPD's teacher "
                             "(--methods seqkd,opd --set opd.teacher_model=runs/quality/seed-42/seqkd)")
    parser.add_argument("--reuse-from", type=Path, metavar="DIR",
                        help="the runs a --variant takes its shared stages from (default --out; the variants named "
                             "before it are tried too): another command's variant's runs, to share its warmup")
    parser.add_argument("--tag", help="a table of its own: runs, results and rows named NAME-TAG")
    parser.add_argument("--out", type=Path, help="where the runs are kept (default runs/NAME[-quick][-TAG])")
    parser.add_argument("--config", type=Path, default=CONFIG,
                        help="the replica's config (default configs/quality.yaml, NAME quality; configs/alpaca_eval.yaml: "
                             "the AlpacaEval replica, NAME alpaca_eval, its data made by bench/alpaca_eval_data.py)")
    args = parser.parse_args()
    config = args.config.resolve()
    name = ("quality" if config == CONFIG else config.stem) + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    out = args.out or ROOT / "runs" / name
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [*(QUICK if args.quick else [])]
    cmd = [*SODA_DISTILL, "compare", str(config), "--out", str(out), f"compare.seeds=[{','.join(map(str, seeds))}]",
           *settings, *([f"compare.methods=[{'' if args.methods == 'none' else args.methods}]"] if args.methods else []),
           *args.set]
    rows = RESULTS / name / "rows"
    from soda_distill.config import load_config
    from soda_distill.evaluation.nll import scoring_dtype
    from soda_distill.models import use_bf16
    from soda_distill.registry import METHODS

    resolved = load_config(config, [*settings, *args.set])
    precision = "bf16" if use_bf16(resolved.student.bf16) else "fp32"
    made_with = {"precision": precision, "nll_dtype": str(scoring_dtype(resolved)).removeprefix("torch.")}
    methods = ([] if args.methods == "none" else args.methods.split(",")) if args.methods else load_config(config).compare.methods
    made = {f"seed-{seed}/{METHODS[m].column}" for seed in seeds for m in methods}  # the rows this call makes
    extra = committed_rows(rows, made, made_with) if args.with_committed else {}  # more rows: the committed ones
    made_on = {label: row.get("machine") for label, row in rows_record(rows, "provenance.json").items()}
    same_base = shared_bases(extra, seeds, made, made_on, machine())
    extra.update({label: extra[source] for label, source in same_base.items()})
    if same_base:
        print(f"Base's answers as committed, for: {', '.join(f'{k} (= {v})' for k, v in same_base.items())}", flush=True)
    variants, variant_rows, own_warmups = [], {}, {}  # (its seed's runs, its runs, its settings, its command), its
    # table rows, and a SODA variant's runs with those before it (its q_w may be new)
    from soda_distill.compare import SEEDED
    from soda_distill.registry import STAGES, shared_stages

    method = METHODS[args.variant_method]

    def variant_label(variant: str, m=method) -> str:  # `SODA (refresh4)`, `Warmup (q_w, greybox)`
        return f"{m.label} ({', '.join(filter(None, [m.detail, variant]))})"

    for variant, *overrides in args.variant or []:
        for seed in seeds:
            path = out.parent / f"{out.name}-{variant}" / f"seed-{seed}"
            variant_settings = [*settings, *(f"{section}.seed={seed}" for section in SEEDED), "check.limit=0", *overrides]
            source = (args.reuse_from or out) / f"seed-{seed}"
            if method.name == "soda" and "warmup" not in shared_stages(overrides):  # its q_w, what its DPO started
                # from: a row unless an earlier run had it (another variant with the same warmup settings)
                earlier = [out / f"seed-{seed}", source, *(v[1] for v in variants if v[0] == source)]
                own_warmups[f"seed-{seed}/{variant_label(variant, METHODS['warmup'])}"] = path, earlier
            variants.append((source, path, variant_settings,
                             [*SODA_DISTILL, "run", str(config), "--method", method.name, "--out", str(path), *variant_settings]))
            variant_rows[f"seed-{seed}/{variant_label(variant)}"] = str(path / STAGES[method.stage].model)

    def compare_with(rows: dict) -> list[str]:
        return [*cmd, "evaluate.models={" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in rows.items())
                + "}"] if rows else cmd

    # The seeds' own runs first, so that a variant starts from their stages (q0's answers, q_w), then the variants,
    # then the comparison again with the variants' rows (the answers already generated are reused).
    steps = [(None, compare_with(extra))] if variants else []
    # each from the seed's run or a variant before it, whichever shares the most stages with it
    steps += [(([source, *(v[1] for v in variants[:i] if v[0] == source)], path, variant_settings), command)
              for i, (source, path, variant_settings, command) in enumerate(variants)]
    # and each variant paired with those named before it (the dial's k = 4 against k = never, selection against random)
    names = [variant_label(variant) for variant, *_ in args.variant or []]
    paired = {name: names[:i] for i, name in enumerate(names) if i}

    def final_comparison() -> list[str]:  # with every row; a variant's q_w once trained, and unlike those before it
        trained = {label: str(path / "warmup") for label, (path, earlier) in own_warmups.items()
                   if new_model(path, "warmup", earlier)}
        return (compare_with({**extra, **variant_rows, **trained})
                + ([f"evaluate.paired_with={json.dumps(paired)}"] if paired else []))

    steps.append((None, final_comparison))
    start = time.monotonic()
    for shared, command in steps:
        left = args.minutes * 60 - (time.monotonic() - start)
        if shared and left > 0:
            sources, path, variant_settings = shared
            if not path.exists():
                reuse_stages(sources, path, variant_settings, method.stage, config)
        code = run_for(command() if callable(command) else command, left) if left > 0 else 130
        if code:
            break
    final = final_comparison()
    record = {
        "command": "python bench/quality.py" + (f" --config {config.relative_to(ROOT)}" if config != CONFIG else "")
                   + (" --quick" if args.quick else "") + (f" --tag {args.tag}" if args.tag else "") + f" --seeds {args.seeds}"
                   + (f" --methods {args.methods}" if args.methods else "") + (" --with-committed" if args.with_committed else "")
                   + (f" --variant-method {method.name}" if method.name != "soda" else "")
                   + "".join(f" --variant {' '.join(v)}" for v in args.variant or [])
                   + (f" --reuse-from {args.reuse_from}" if args.reuse_from else "")
                   + (f" --set {' '.join(args.set)}" if args.set else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "precision": precision, "versions": versions(),
        "config": str(config.relative_to(ROOT)), "overrides": [o.replace(f"{ROOT}/", "") for o in final[len(SODA_DISTILL) + 4:]],  # the same on every machine
        "variants": [" ".join(c[len(SODA_DISTILL) + 5:]).replace(f"{ROOT}/", "") for *_, c in variants],
        "this_piece": {"minutes": round((time.monotonic() - start) / 60, 1), "exit_code": code},
        **progress(out, {**{f"seed-{seed}": out / f"seed-{seed}" for seed in seeds},
                         **{f"{path.name} ({path.parent.name.removeprefix(out.name + '-')})": path
                            for _, path, *_ in variants}}),
    }
    # An evaluation from an earlier step or call is on disk before this one's last comparison: complete only if it ran
    record["evaluation_complete"] &= code == 0
    results = out / "evaluation" / "results.json"
    if record["evaluation_complete"]:
        evaluation = json.loads(results.read_text())
        record["results"] = {k: evaluation[k] for k in ("settings", "benchmarks", "rows", "across_runs")}
        RESULTS.mkdir(exist_ok=True)
        for suffix in ("md", "png"):
            shutil.copyfile(out / "evaluation" / f"results.{suffix}", RESULTS / f"{name}.{suffix}")
        keep_rows(out / "evaluation", evaluation, rows, made | set(variant_rows) | set(own_warmups),
                  {"machine": record["machine"], **made_with, "versions": record["versions"], "date": record["date"]},
                  same_base)
    (RESULTS / f"{name}.json").write_text(json.dumps(carry_over(RESULTS / f"{name}.json", record), indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("this_piece", "evaluation_answers", "evaluation_complete")}, indent=1))


if __name__ == "__main__":
    main()
