"""`soda-distill` — the pipeline's stages as subcommands.

    soda-distill run CONFIG [--method M[,M...]] [--out DIR] [section.key=value ...]   (M: warmup seqkd soda gad opd; default soda)
    soda-distill STAGE [CONFIG] --out DIR [section.key=value ...]   (STAGE: teacher snapshot pairs warmup seqkd distill
                                                                     gad_warmup gad opd; runs unfinished stages it needs)
    soda-distill compare CONFIG --out DIR [section.key=value ...]   (train compare.methods per compare.seeds,
                                                                   evaluate, report: your own Table 1)
    soda-distill evaluate [CONFIG] [RUNDIR ...] [--out EVALDIR] [section.key=value ...]
    soda-distill analyze RUNDIR [RUNDIR ...] [--out DIR] [section.key=value ...]
    soda-distill report RUNDIR [RUNDIR ...] [--out DIR]
    soda-distill push RUNDIR --repo ORG/NAME [--method M] [--private] [--with-pairs] [--to-dir DIR]

Without CONFIG, a stage starts from DIR/config.yaml (the resolved config an earlier command wrote there), or
from the defaults when there is none; key=value overrides apply on top. `soda-distill gad` is GAD's final stage,
so it runs the GAD method's chain, reusing whatever of it the run directory has finished.
Commands import what they use when they run: `report` needs no torch, `evaluate` no trainer.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from . import distributed
from .config import load_config
from .errors import SodaError
from .registry import DEFAULT_METHODS, METHODS, STAGES, methods_named


# A full disk, a quota, a read-only or forbidden directory: the run stops in one line and resumes once it is fixed.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _split(rest: list[str]) -> tuple[str | None, list[str]]:
    if rest and ("=" not in rest[0] or Path(rest[0]).is_file()):
        return rest[0], rest[1:]
    return None, rest


def _summary(run) -> str:
    m = run.manifest()
    lines = [f"{'stage':<10}{'wall s':>9}{'peak MB':>10}  notes"]
    for name, rec in m["stages"].items():
        notes = {k: v for k, v in rec.items() if k in ("records", "kept", "dropped", "steps", "train_loss", "reward_margin", "reward_accuracy")}
        lines.append(f"{name:<10}{rec['wall_s']:>9.1f}{rec.get('peak_rss_mb', 0):>10.0f}  {json.dumps(notes)}")
    return "\n".join(lines)


def _evaluate(rest: list[str], out: str | None) -> None:
    """Arguments are told apart by what they are: a file is the config, a directory a run, the rest key=value."""
    from .evaluation.evaluate import prepare_evaluation, render_markdown, run_evaluate

    config_path = next((r for r in rest if Path(r).is_file()), None)
    runs = [r for r in rest if Path(r).is_dir()]
    overrides = [r for r in rest if r != config_path and r not in runs]
    if any("=" not in r for r in overrides):
        raise SodaError(f"{next(r for r in overrides if '=' not in r)}: not a config file, a run directory or key=value")
    if out is None and len(runs) == 1:
        out = str(Path(runs[0]) / "eval")
    if out is None:
        raise SodaError("give --out EVALDIR (where the results go; its config.yaml, if any, is the starting point)")
    if config_path is None and (Path(out) / "config.yaml").exists():
        config_path = str(Path(out) / "config.yaml")
    cfg = load_config(config_path, overrides)
    cfg.evaluate.runs += runs
    evaldir = prepare_evaluation(cfg, out)
    print(render_markdown(run_evaluate(cfg, evaldir)))
    print(f"results: {evaldir.file('results.json')}, {evaldir.file('results.md')}, {evaldir.file('results.png')}")


def _directories(rest: list[str], out: str | None, default: str) -> tuple[list[str], list[str], str]:
    """Directories, key=value overrides, and the output directory: `out`, else `default` inside the only directory."""
    dirs = [r for r in rest if Path(r).is_dir()]
    overrides = [r for r in rest if r not in dirs]
    if not dirs:
        raise SodaError("give one or more run directories")
    if any("=" not in r for r in overrides):
        raise SodaError(f"{next(r for r in overrides if '=' not in r)}: not a directory or key=value")
    if out is None and len(dirs) > 1:
        raise SodaError("give --out DIR for several run directories")
    return dirs, overrides, out or str(Path(dirs[0]) / default)


def _analyze(rest: list[str], out: str | None) -> None:
    """Settings start from the first run's config.yaml; key=value overrides (analyze.*, student.bf16) apply on top."""
    from .evaluation.analyze import analyze_runs

    runs, overrides, out = _directories(rest, out, "analysis")
    config = Path(runs[0]) / "config.yaml"
    result = analyze_runs(load_config(config if config.is_file() else None, overrides), runs, out)
    for name, m in result["models"].items():
        kurtosis = "undefined" if m["final_layer_kurtosis"] is None else f"{m['final_layer_kurtosis']:.2f}"
        print(f"{name:<24} final layer: entropy {m['final_layer_entropy']:.3f} nats, kurtosis {kurtosis}")
    print(f"analysis: {Path(out) / 'analysis.json'}, {Path(out) / 'cka.png'}, {Path(out) / 'activation_stats.png'}")


def _report(rest: list[str], out: str | None) -> None:
    from .report import write_report

    dirs, overrides, out = _directories(rest, out, "report")
    if overrides:
        raise SodaError(f"report takes no settings, got {overrides[0]}")
    html = write_report(dirs, out)
    print(f"report: {html}, {html.with_suffix('.md')}")


def _compare(rest: list[str], out: str | None) -> None:
    from .compare import run_compare
    from .evaluation.table import render_markdown

    config_path, overrides = _split(rest)
    if out is None:
        raise SodaError("give --out DIR (a run directory per seed, the evaluation and the report go there)")
    results = run_compare(load_config(config_path, overrides), out)
    if not distributed.is_main():
        return
    print(render_markdown(results))
    print(f"results: {Path(out) / 'evaluation' / 'results.md'}; report: {Path(out) / 'report' / 'report.html'}")


def _push(args) -> None:
    from .push import push

    if len(args.rest) != 1 or not (args.repo or args.to_dir):
        raise SodaError("push takes one RUNDIR and --repo ORG/NAME (or --to-dir DIR)")
    methods = [m for arg in args.method or [] for m in arg.split(",") if m]
    if len(methods) > 1:
        raise SodaError("push takes one --method")
    for made in push(args.rest[0], args.repo, methods[0] if methods else None, args.private, args.with_pairs, args.to_dir):
        print(f"pushed: {made}" if args.to_dir is None else f"staged: {made}")


def build_parser() -> argparse.ArgumentParser:
    """The `soda-distill` command line (docs/reference/cli.md is rendered from it)."""
    stages = "\n".join(f"  {s.name:<11} {s.does}" for s in STAGES.values())
    methods = "\n".join(f"  {m.name:<11} {m.label}: " + (" -> ".join(m.chain) if m.chain else "the untouched student")
                         for m in METHODS.values())
    parser = argparse.ArgumentParser(prog="soda-distill", description="Semi On-policy Distillation with Alignment",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"stages:\n{stages}\n\nmethods (--method):\n{methods}")
    parser.add_argument("command", choices=["run", *STAGES, "compare", "evaluate", "analyze", "report", "push"],
                        help="train methods, run one stage, compare methods end to end, evaluate, analyze "
                             "representations, write a report, or push a model to the Hub")
    parser.add_argument("rest", nargs="*", metavar="[CONFIG] [key=value ...]")
    parser.add_argument("--method", action="append", metavar="M[,M...]",
                        help=f"for run: the methods to train ({', '.join(m for m in METHODS if METHODS[m].stage)}; "
                             f"default {','.join(DEFAULT_METHODS)}); stages they share run once")
    parser.add_argument("--out", help="run directory (default: config's `out`, else runs/<config name>); "
                                      "for compare, where its runs, evaluation and report go; "
                                      "for evaluate, the results directory (default: RUNDIR/eval for one run); "
                                      "for analyze and report, where they write (default: RUNDIR/analysis, "
                                      "RUNDIR/report for one run)")
    parser.add_argument("--repo", help="for push: the Hub repository, ORG/NAME (the pairs go to ORG/NAME-pairs)")
    parser.add_argument("--private", action="store_true", help="for push: make the repositories private")
    parser.add_argument("--with-pairs", action="store_true", help="for push: the preference pairs too, as a data set")
    parser.add_argument("--to-dir", help="for push: write what would be uploaded to this folder instead")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the requests an endpoint stage would send and their cost at most, and stop there")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    try:
        if args.dry_run:
            from . import endpoint

            endpoint.DRY_RUN = True
        distributed.start()
        if args.command in ("evaluate", "analyze", "report", "push") and not distributed.is_main():
            return 0  # launched as several processes, these run on the main one
        if args.command == "evaluate":
            _evaluate(args.rest, args.out)
            return 0
        if args.command == "push":
            _push(args)
            return 0
        if args.command in ("compare", "analyze", "report"):
            {"compare": _compare, "analyze": _analyze, "report": _report}[args.command](args.rest, args.out)
            return 0
        methods = methods_named([m for arg in args.method or DEFAULT_METHODS for m in arg.split(",") if m])
        if args.method and args.command != "run":
            raise SodaError("--method is for `soda-distill run` and `push`")
        config_path, overrides = _split(args.rest)
        if config_path is None:
            if not args.out:
                raise SodaError("give a CONFIG file, or --out DIR (its config.yaml, if any, is the starting point)")
            saved = Path(args.out) / "config.yaml"
            config_path = str(saved) if saved.exists() else None
        cfg = load_config(config_path, overrides)
        out = args.out or cfg.out or str(Path("runs") / Path(config_path).stem)
        from .pipeline import prepare, run_methods, run_stage

        run = prepare(cfg, out)
        if args.command == "run":
            models = run_methods(cfg, run, [m.name for m in methods])
            if not distributed.is_main():
                return 0
            print(_summary(run))
            for name, model in models.items():
                print(f"{'distilled' if name == 'soda' else METHODS[name].label} model: {model}")
            print(f"run summary:     {run.manifest_path}")
            if "soda" in models and cfg.check.limit:
                from .evaluation.check import before_after, render

                print(render(before_after(cfg, run, models["soda"])))
        else:
            out = run_stage(args.command, cfg, run)
            if distributed.is_main():
                print(f"{args.command}: {out}")
    except SodaError as e:
        from .endpoint import DryRun

        if isinstance(e, DryRun):
            print(f"soda-distill: {e}", file=sys.stderr)
            return 0
        print(f"soda-distill: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        print(f"soda-distill: error: cannot write {e.filename or 'a file'}: {e.strerror}; everything written before is "
              "intact: free space (or make the directory writable) and run the same command again to resume",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soda-distill: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
