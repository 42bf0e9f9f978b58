"""SODA against GAD on the same student, data and prompts: wall time and peak memory per stage, and how stable
each one's training is — the paper's Figure 1 panels (time, memory, stability) on this machine.

    python bench/cost.py [--quick] [--out DIR]

Every stage runs as its own `soda-distill` process, one after the other, in one run directory (with --out, stages
finished there earlier are reused, and their recorded figures reported): SODA is snapshot +
pairs + warmup + distill, GAD is warmup + discriminator warmup + adversarial phase (the warmup is shared, and
counted for both). Peak memory is each stage's process RSS on CPU, peak allocated per device on GPU (the manifest's
figures). Writes bench/results/cost[-quick].json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SODA = ("snapshot", "pairs", "warmup", "distill")
GAD = ("warmup", "gad_warmup", "gad")
# The smallest setting: a handful of prompts and short answers, the same for both methods.
QUICK = ["data.limit=16", "snapshot.max_new_tokens=64", "gad.max_new_tokens=64", "gad.epochs=1.0"]


def stage(command: str, out: Path, overrides: list[str]) -> None:
    exe = Path(sys.executable).parent / "soda-distill"
    cmd = [str(exe), command, str(ROOT / "configs" / "demo.yaml"), "--out", str(out), *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})


def peak(rec: dict) -> float:
    return max(rec["peak_gpu_mb"]) if rec.get("peak_gpu_mb") else rec["peak_rss_mb"]


def summarize(manifest: dict, stages: tuple[str, ...]) -> dict:
    recs = {s: manifest["stages"][s] for s in stages}
    return {
        "wall_s": round(sum(r["wall_s"] for r in recs.values()), 1),
        "peak_memory_mb": max(peak(r) for r in recs.values()),
        "stages": {s: {"wall_s": r["wall_s"], "peak_memory_mb": peak(r)} for s, r in recs.items()},
    }


def plot(record: dict, out: Path, path: Path) -> None:
    from soda_distill.plots import label_axes, panels, run_color, save_png
    from soda_distill.records import read_metrics

    fig, (time_ax, mem_ax, dpo_ax, gad_ax) = panels(4)
    methods = ("SODA", "GAD")
    for i, method in enumerate(methods):
        bottom = 0.0
        for s, rec in record[method]["stages"].items():
            time_ax.bar(method, rec["wall_s"] / 60, bottom=bottom, color=run_color(i), edgecolor="white")
            time_ax.text(i, bottom + rec["wall_s"] / 120, s, ha="center", va="center", fontsize=7, color="white")
            bottom += rec["wall_s"] / 60
    label_axes(time_ax, f"wall time (GAD/SODA = {record['ratios']['time_gad_over_soda']}×)", "", "minutes", grid="y")
    mem_ax.bar(methods, [record[m]["peak_memory_mb"] / 1024 for m in methods], color=[run_color(0), run_color(1)])
    r = record["ratios"]
    label_axes(mem_ax, f"peak memory (SODA/GAD = {r['memory_soda_over_gad']};\nown stages {r['memory_soda_over_gad_own_stages']})",
               "", "GiB", grid="y")
    dpo = [m for m in read_metrics(out / "distill" / "metrics.jsonl") if "loss" in m and "rewards/margins" in m]
    dpo_ax.plot([m["step"] for m in dpo], [m["loss"] for m in dpo], color=run_color(0), label="DPO loss")
    dpo_ax.plot([m["step"] for m in dpo], [m["rewards/margins"] for m in dpo], color=run_color(0), ls="--", label="reward margin")
    dpo_ax.legend(fontsize=8)
    label_axes(dpo_ax, "SODA: DPO per step", "step", "")
    gad = [m for m in read_metrics(out / "gad" / "metrics.jsonl") if "reward" in m]
    gad_ax.plot([m["step"] for m in gad], [m["reward"] for m in gad], color=run_color(1), label="generator reward")
    acc = [m for m in gad if "discriminator/accuracy" in m]
    gad_ax.plot([m["step"] for m in acc], [m["discriminator/accuracy"] for m in acc], color=run_color(1), ls="--",
                label="discriminator accuracy")
    gad_ax.legend(fontsize=8)
    label_axes(gad_ax, "GAD: adversarial phase per step", "step", "")
    fig.suptitle(f"SODA vs GAD on {record['student']}, {record['prompts']} prompts — {record['machine']}")
    save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smallest setting (16 prompts, short answers)")
    parser.add_argument("--out", type=Path, help="run directory to keep (default: a temporary one, removed after)")
    args = parser.parse_args()
    if args.out:
        measure(args.out, args.quick)
        return
    with tempfile.TemporaryDirectory(prefix="soda-cost-") as out:
        measure(Path(out), args.quick)


def measure(out: Path, quick: bool) -> None:
    overrides = QUICK if quick else []
    for command in ("teacher", *SODA, "gad"):
        stage(command, out, overrides)
    manifest = json.loads((out / "manifest.json").read_text())
    soda, gad = summarize(manifest, SODA), summarize(manifest, GAD)
    config = yaml.safe_load((out / "config.yaml").read_text())
    record = {
        "command": "python bench/cost.py" + (" --quick" if quick else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {manifest['soda_distill']['device']}",
        "student": config["student"]["model"],
        "prompts": manifest["stages"]["teacher"]["records"],
        "SODA": soda,
        "GAD": gad,
        "ratios": {
            "time_gad_over_soda": round(gad["wall_s"] / soda["wall_s"], 2),
            "memory_soda_over_gad": round(soda["peak_memory_mb"] / gad["peak_memory_mb"], 2),
            # The shared SFT warmup can set both peaks; this compares only the stages where the methods differ.
            "memory_soda_over_gad_own_stages": round(
                max(soda["stages"][s]["peak_memory_mb"] for s in SODA if s not in GAD)
                / max(gad["stages"][s]["peak_memory_mb"] for s in GAD if s not in SODA), 2),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    name = "cost-quick" if quick else "cost"
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(record, out, RESULTS / f"{name}.png")
    print(json.dumps(record["ratios"], indent=2))


if __name__ == "__main__":
    main()
