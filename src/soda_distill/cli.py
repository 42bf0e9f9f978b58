"""`soda-distill` — the pipeline's stages as subcommands, each with its own options (`soda-distill COMMAND --help`).

    soda-distill run [CONFIG] [--method M[,M...]] [--out DIR] [--dry-run] [section.key=value ...]
                                                   (M: warmup seqkd soda gad opd; default soda)
    soda-distill STAGE [CONFIG] [--out DIR] [--dry-run] [section.key=value ...]
                                                   (STAGE: teacher snapshot pairs warmup seqkd distill gad_warmup gad
                                                    opd; runs the unfinished stages it needs first)
    soda-distill compare [CONFIG] --out DIR [--dry-run] [section.key=value ...]
                                                   (train compare.methods per compare.seeds, evaluate, report:
                                                    your own Table 1)
    soda-distill evaluate [CONFIG.yaml] [RUNDIR ...] [--out EVALDIR] [--dry-run] [section.key=value ...]
    soda-distill analyze RUNDIR [RUNDIR ...] [--out DIR] [section.key=value ...]
    soda-distill report RUNDIR [RUNDIR ...] [--out DIR]
    soda-distill push RUNDIR --repo ORG/NAME [--method M] [--private] [--with-pairs] [--to-dir DIR]
    soda-distill keys [CONFIG] [--section S] [section.key=value ...]     (every key, its value and its help)

Arguments are told apart by their shape: `section.key=value` is a setting, anything else a file or directory (for
evaluate, the config is the one ending in .yaml). Without CONFIG, a stage starts from DIR/config.yaml (the resolved
config an earlier command wrote there), or from the defaults when there is none; settings apply on top.
`--dry-run` prints what would run and what an endpoint would be sent, at most at what cost, and runs nothing.
`soda-distill gad` is GAD's final stage, so it runs the GAD method's chain, reusing whatever of it the run directory
has finished. Commands import what they use when they run: `report` needs no torch, `evaluate` no trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from . import distributed
from .config import config_keys, load_config
from .errors import SodaError, write_error
from .registry import DEFAULT_METHODS, METHODS, STAGES, methods_named


# `section.key=value` (a key may hold any text after its section: evaluate.models.GPT/Teacher=...): told apart from
# a path by its shape alone, never by what is on disk
_OVERRIDE = re.compile(r"[A-Za-z_][\w-]*(\.[^=]*)?=")
CONFIG_SUFFIXES = (".yaml", ".yml")


def _overrides(values: list[str]) -> tuple[list[str], list[str]]:
    """(the `section.key=value` overrides, the other arguments)."""
    return [v for v in values if _OVERRIDE.match(v)], [v for v in values if not _OVERRIDE.match(v)]


def _config_and_overrides(values: list[str]) -> tuple[str | None, list[str]]:
    overrides, others = _overrides(values)
    if len(others) > 1:
        raise SodaError(f"{others[1]}: one CONFIG file at most, then section.key=value overrides")
    return (others[0] if others else None), overrides


def _summary(run) -> str:
    m = run.manifest()
    lines = [f"{'stage':<10}{'wall s':>9}{'peak MB':>10}  notes"]
    for name, rec in m["stages"].items():
        notes = {k: v for k, v in rec.items() if k in ("records", "kept", "dropped", "steps", "train_loss", "reward_margin", "reward_accuracy")}
        lines.append(f"{name:<10}{rec['wall_s']:>9.1f}{rec.get('peak_rss_mb', 0):>10.0f}  {json.dumps(notes)}")
    return "\n".join(lines)


def _evaluate(args) -> None:
    """CONFIG is the argument ending in .yaml (or .yml), RUNDIRs the others, overrides the `key=value` ones."""
    from .evaluation.evaluate import plan_evaluation, prepare_evaluation, render_markdown, run_evaluate

    overrides, others = _overrides(args.args)
    configs = [a for a in others if a.endswith(CONFIG_SUFFIXES)]
    runs = [a for a in others if a not in configs]
    if len(configs) > 1:
        raise SodaError(f"{configs[1]}: one CONFIG file at most")
    out = args.out or (str(Path(runs[0]) / "eval") if len(runs) == 1 else None)
    if out is None:
        raise SodaError("give --out EVALDIR (where the results go; its config.yaml, if any, is the starting point)")
    config_path = configs[0] if configs else None
    if config_path is None and (Path(out) / "config.yaml").exists():
        config_path = str(Path(out) / "config.yaml")
    cfg = load_config(config_path, overrides)
    cfg.evaluate.runs += runs
    if args.dry_run:
        print("\n".join(plan_evaluation(cfg, out)))
        return
    evaldir = prepare_evaluation(cfg, out)
    print(render_markdown(run_evaluate(cfg, evaldir)))
    print(f"results: {evaldir.file('results.json')}, {evaldir.file('results.md')}, {evaldir.file('results.png')}")


def _directories(args, default: str) -> tuple[list[str], list[str], str]:
    """Run directories, key=value overrides, and the output directory: --out, else `default` inside the only run."""
    overrides, dirs = _overrides(args.args)
    if not dirs:
        raise SodaError("give one or more run directories")
    if missing := [d for d in dirs if not Path(d).is_dir()]:
        raise SodaError(f"{missing[0]}: no such directory (a run directory was expected)")
    if args.out is None and len(dirs) > 1:
        raise SodaError("give --out DIR for several run directories")
    return dirs, overrides, args.out or str(Path(dirs[0]) / default)


def _analyze(args) -> None:
    """Settings start from the first run's config.yaml; key=value overrides (analyze.*, student.bf16) apply on top."""
    from .evaluation.analyze import analyze_runs

    runs, overrides, out = _directories(args, "analysis")
    config = Path(runs[0]) / "config.yaml"
    result = analyze_runs(load_config(config if config.is_file() else None, overrides), runs, out)
    for name, m in result["models"].items():
        kurtosis = "undefined" if m["final_layer_kurtosis"] is None else f"{m['final_layer_kurtosis']:.2f}"
        print(f"{name:<24} final layer: entropy {m['final_layer_entropy']:.3f} nats, kurtosis {kurtosis}")
    print(f"analysis: {Path(out) / 'analysis.json'}, {Path(out) / 'cka.png'}, {Path(out) / 'activation_stats.png'}")


def _report(args) -> None:
    from .report import write_report

    dirs, overrides, out = _directories(args, "report")
    if overrides:
        raise SodaError(f"report takes no settings, got {overrides[0]}")
    html = write_report(dirs, out)
    print(f"report: {html}, {html.with_suffix('.md')}")


def _compare(args) -> None:
    from .compare import plan_compare, run_compare
    from .evaluation.table import render_markdown

    config_path, overrides = _config_and_overrides(args.args)
    cfg = load_config(config_path, overrides)
    if args.dry_run:
        print("\n".join(plan_compare(cfg, args.out)))
        return
    results = run_compare(cfg, args.out)
    if not distributed.is_main():
        return
    print(render_markdown(results))
    print(f"results: {Path(args.out) / 'evaluation' / 'results.md'}; report: {Path(args.out) / 'report' / 'report.html'}")


def _push(args) -> None:
    from .push import push

    if not (args.repo or args.to_dir):
        raise SodaError("push takes --repo ORG/NAME (or --to-dir DIR)")
    for made in push(args.rundir, args.repo, args.method, args.private, args.with_pairs, args.to_dir):
        print(f"pushed: {made}" if args.to_dir is None else f"staged: {made}")


def _keys(args) -> None:
    """Each key of the config (of the sections named), its value after CONFIG and the settings, and its help."""
    import textwrap

    config_path, overrides = _config_and_overrides(args.args)
    cfg = load_config(config_path, overrides)
    sections = args.section or []
    if unknown := [s for s in sections if not hasattr(cfg, s)]:
        raise SodaError(f"--section {unknown[0]}: no such section (sections: {', '.join(vars(cfg))})")
    for key, value, help_text, operational in config_keys(cfg):
        if sections and key.split(".")[0] not in sections:
            continue
        print(f"{key} = {json.dumps(value)}" + ("  (operational)" if operational else ""))
        print(textwrap.fill(help_text, width=100, initial_indent="    ", subsequent_indent="    "))


def _train(args) -> None:
    """`run` (methods) and each stage's command: CONFIG, else the resolved config an earlier command left in --out."""
    config_path, overrides = _config_and_overrides(args.args)
    if config_path is None:
        if not args.out:
            raise SodaError("give a CONFIG file, or --out DIR (its config.yaml, if any, is the starting point)")
        saved = Path(args.out) / "config.yaml"
        config_path = str(saved) if saved.exists() else None
    cfg = load_config(config_path, overrides)
    out = args.out or cfg.out or str(Path("runs") / Path(config_path).stem)
    methods = methods_named([m for arg in args.method or DEFAULT_METHODS for m in arg.split(",") if m]) \
        if args.command == "run" else []
    stages = [m.stage for m in methods if m.stage] if args.command == "run" else [args.command]
    from .pipeline import plan, prepare, run_methods, run_stage

    if args.dry_run:
        print("\n".join(plan(cfg, out, stages)))
        return
    run = prepare(cfg, out, stages)
    if args.command != "run":
        out = run_stage(args.command, cfg, run)
        if distributed.is_main():
            print(f"{args.command}: {out}")
        return
    models = run_methods(cfg, run, [m.name for m in methods])
    if not distributed.is_main():
        return
    print(_summary(run))
    for name, model in models.items():
        print(f"{'distilled' if name == 'soda' else METHODS[name].label} model: {model}")
    print(f"run summary:     {run.manifest_path}")
    if "soda" in models and cfg.check.limit:
        from .evaluation.check import before_after, render

        print(render(before_after(cfg, run, models["soda"])))


DRY_RUN = "print what would run, and the requests an endpoint would be sent with their cost at most; run nothing"


def _add_train(parser: argparse.ArgumentParser, stage: bool) -> None:
    parser.add_argument("args", nargs="*", metavar="ARG", help="CONFIG (a YAML file), then section.key=value settings "
                                                              "over it")
    if not stage:
        parser.add_argument("--method", action="append", metavar="M[,M...]",
                            help=f"the methods to train ({', '.join(m for m in METHODS if METHODS[m].stage)}; default "
                                 f"{','.join(DEFAULT_METHODS)}); stages they share run once")
    parser.add_argument("--out", help="the run directory (default: the config's `out`, else runs/<config name>)")
    parser.add_argument("--dry-run", action="store_true", help=DRY_RUN)


def _add_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="ARG", help="CONFIG (a YAML file), then section.key=value settings "
                                                              "over it")
    parser.add_argument("--out", required=True, help="where a run directory per seed, the evaluation and the report go")
    parser.add_argument("--dry-run", action="store_true", help=DRY_RUN)


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="ARG", help="CONFIG (a file whose name ends in .yaml), RUNDIRs, "
                                                              "section.key=value settings")
    parser.add_argument("--out", help="the results directory (default: RUNDIR/eval for one run); its config.yaml, if "
                                      "any, is the starting point")
    parser.add_argument("--dry-run", action="store_true", help="print the rows, the benchmarks and the requests the "
                                                               "reference model and the judge would be sent; run nothing")


def _add_runs(parser: argparse.ArgumentParser, settings: bool, default: str) -> None:
    parser.add_argument("args", nargs="*", metavar="RUNDIR",
                        help="run directories (an evaluation directory too, for report)"
                             + ("; then settings over the first run's config" if settings else ""))
    parser.add_argument("--out", help=f"where it writes (default: RUNDIR/{default} for one run)")


def _add_keys(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="ARG", help="CONFIG (a YAML file), then section.key=value settings "
                                                              "over it: the values shown are theirs")
    parser.add_argument("--section", action="append", help="only this section's keys (repeatable)")


def _add_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rundir", metavar="RUNDIR")
    parser.add_argument("--repo", help="the Hub repository, ORG/NAME (the pairs go to ORG/NAME-pairs)")
    parser.add_argument("--method", choices=[m for m in METHODS if METHODS[m].stage],
                        help="the method whose model to push (default: the run's SODA model)")
    parser.add_argument("--private", action="store_true", help="make the repositories private")
    parser.add_argument("--with-pairs", action="store_true", help="the preference pairs too, as a data set")
    parser.add_argument("--to-dir", help="write what would be uploaded to this folder instead")


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `soda-distill` command line and each command's own parser (docs/reference/cli.md is rendered from them)."""
    stages = "\n".join(f"  {s.name:<11} {s.does}" for s in STAGES.values())
    methods = "\n".join(f"  {m.name:<11} {m.label}: " + (" -> ".join(m.chain) if m.chain else "the untouched student")
                        for m in METHODS.values())
    parser = argparse.ArgumentParser(prog="soda-distill", description="Semi On-policy Distillation with Alignment",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"stages:\n{stages}\n\nmethods (run --method):\n{methods}\n\n"
                                            "`soda-distill COMMAND --help` gives a command's own options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = {
        "run": ("train methods (their stages, each once; finished ones skipped)", lambda p: _add_train(p, False)),
        **{s.name: (f"stage: {s.does}", lambda p: _add_train(p, True))
           for s in STAGES.values()},
        "compare": ("train compare.methods per compare.seeds, evaluate, report: your own Table 1", _add_compare),
        "evaluate": ("Table 1: ROUGE-L, reference NLL, preference margin, lengths, the judge", _add_evaluate),
        "analyze": ("layer-wise CKA, activation entropy and kurtosis", lambda p: _add_runs(p, True, "analysis")),
        "report": ("one self-contained HTML page of runs and evaluations", lambda p: _add_runs(p, False, "report")),
        "push": ("a run's model (and its pairs) to the Hugging Face Hub", _add_push),
        "keys": ("every config key: its value (the defaults, or a config's) and what it does", _add_keys),
    }
    parsers = {}
    for name, (summary, add) in commands.items():
        described = summary + (" (after the unfinished stages it needs)" if name in STAGES else "")
        parsers[name] = sub.add_parser(name, help=summary, description=described)
        add(parsers[name])
    return parser, parsers


def parse_args(argv: list[str]) -> argparse.Namespace:
    """A command's options and its positional arguments may come in any order (`evaluate RUN --out X key=value`)."""
    parser, commands = build_parsers()
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # --help, or the error that names the commands
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    try:
        distributed.start()
        if args.command in ("evaluate", "analyze", "report", "push", "keys") and not distributed.is_main():
            return 0  # launched as several processes, these run on the main one
        handler = {"evaluate": _evaluate, "analyze": _analyze, "report": _report, "compare": _compare,
                   "push": _push, "keys": _keys}.get(args.command, _train)
        handler(args)
    except SodaError as e:
        print(f"soda-distill: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a failed write outside a stage (config.yaml, an evaluation); a stage's is a SodaError
        if (error := write_error(e)) is None:
            raise
        print(f"soda-distill: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soda-distill: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
