"""Does bf16 train as fp32 does? The demo's warmup (configs/demo.yaml: SFT of the embedded student on 48 Dolly
answers, 18 steps) trained from the same seed and data in each precision, its per-step losses side by side.

    python bench/precision.py [--modes fp32,bf16,bf16_grid_masters,autocast] [--out runs/precision]

Modes: `fp32` (student.bf16=false); `bf16`, the package's bf16 path on CPU (bf16 weights, fp32 master weights in
the optimizer); `bf16_grid_masters`, that path as it was before 2026-12-06, its masters copied from the weights
already rounded to bf16; `autocast`, fp32 weights under bf16 autocast (what the package does on a GPU or across
processes). Each mode is a run directory under --out (resumable: a finished one is read, not trained again), each in
a process of its own. Every mode's losses against fp32's, step by step: the mean difference with a paired bootstrap
interval over the steps. Writes bench/results/precision.{json,md,png}.
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
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child process: train one mode
    args = parser.parse_args()
    if args.one:
        return train(args.one, args.out / args.one)
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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "precision.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(record, RESULTS / "precision.png")
    (RESULTS / "precision.md").write_text(render(record))
    print(json.dumps({m: {k: v for k, v in r.items() if k != "losses"} for m, r in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
