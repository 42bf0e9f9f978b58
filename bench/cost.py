"""SODA against GAD on the same student, data and prompts: wall time and peak memory per stage, and how stable
each one's training is — the paper's Figure 1 panels (time, memory, stability) on this machine.

    python bench/cost.py [--quick] [--out DIR]
    python bench/cost.py --sweep [--quick] [--out DIR]      # how the costs grow with rollouts K and answer length L
    python bench/cost.py --sweep --points 8x512 [--checkpointing]   # more points, added to the committed record

Every stage runs as its own `soda-distill` process, one after the other, in one run directory (with --out, stages
finished there earlier are reused, and their recorded figures reported): SODA is snapshot +
pairs + warmup + distill, GAD is warmup + discriminator warmup + adversarial phase (the warmup is shared, and
counted for both). Peak memory is each stage's process RSS on CPU, peak allocated per device on GPU (the manifest's
figures). Writes bench/results/cost[-quick].json and .png.

--sweep measures both methods side by side at every answer length L (SODA's snapshot and GAD's rollouts) and every
number of rollouts per prompt K (GAD's group), on the same 32 prompts, GAD taking 4 prompts (4K rollouts) a step:
SODA once per L, GAD once per (K, L), each point in its own run directory (the teacher, snapshot, pairs and warmup
of its L shared), resumable. `--points 8x512,...` measures only those points and adds them to the committed record
(each point keeps its date and versions). `--checkpointing` measures with gradient checkpointing in every trainer
(SFT, DPO, GAD's generator and discriminator), to its own record: what each method's peak is when activations no
longer set it. Its cost model gives each method a time per generated token (SODA's snapshot, GAD's
rollouts) and per trained token (everything else: SFT, DPO with its reference pass, GAD's generator and
discriminator updates), pooled over the points, with its error on each; and projects both to the published setting
per prompt (GAD: 1 SFT epoch, 2 adversarial epochs of 8 rollouts; SODA: a snapshot, 1 SFT and 1 DPO epoch), answers
as long relative to 1536 tokens as in the longest setting here. Writes bench/results/cost-sweep[-quick].json and .png.
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
from common import DEMO_DATA, versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SODA = ("snapshot", "pairs", "warmup", "distill")
GAD = ("warmup", "gad_warmup", "gad")
# The smallest setting: a handful of prompts and short answers, the same for both methods.
QUICK = ["data.limit=16", "snapshot.max_new_tokens=64", "gad.max_new_tokens=64", "gad.epochs=1.0"]
SWEEP = {"K": (2, 4, 8), "L": (64, 128, 256), "prompts": 32}
SWEEP_QUICK = {"K": (2, 4), "L": (16, 32), "prompts": 8}
CHECKPOINTING = ["warmup.gradient_checkpointing=true", "distill.gradient_checkpointing=true",
                 "gad.gradient_checkpointing=true"]  # GAD's discriminator follows gad's setting
PROMPTS_PER_STEP = 4  # GAD: 4K rollouts a step, whatever K
# The published cost setting (1 SFT epoch, as GAD's warmup), every pair kept: under the demo's quality defaults (3
# epochs, cut q0 answers dropped) a short L would drop most pairs and the shared warmup would triple. The demo's
# data as the committed results measured it, which the sweep's points then narrow.
RECIPE = ["warmup.epochs=1", "pairs.truncated_rejected=open", *DEMO_DATA]


def stage(command: str, out: Path, overrides: list[str]) -> None:
    exe = Path(sys.executable).parent / "soda-distill"
    cmd = [str(exe), command, str(ROOT / "configs" / "demo.yaml"), "--out", str(out), *RECIPE, *overrides]
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


def own_peak(summary: dict, stages: tuple[str, ...], others: tuple[str, ...]) -> float:
    """A method's peak memory over the stages the other method does not run: the shared SFT warmup can set both
    methods' whole peaks, hiding the difference."""
    return max(summary["stages"][s]["peak_memory_mb"] for s in stages if s not in others)


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
    parser.add_argument("--sweep", action="store_true", help="SODA and GAD against rollouts K and answer length L")
    parser.add_argument("--points", type=points_arg, help="with --sweep: only these points, KxL comma-separated "
                        "(8x512,16x256), added to the committed record's other points")
    parser.add_argument("--checkpointing", action="store_true", help="with --sweep: gradient checkpointing in every "
                        "trainer (a record of its own, cost-sweep-checkpointing)")
    parser.add_argument("--out", type=Path, help="run directory to keep (default: a temporary one, removed after; "
                        "with --sweep: runs/cost-sweep[-quick], kept so that it resumes)")
    args = parser.parse_args()
    if (args.points or args.checkpointing) and not args.sweep:
        parser.error("--points and --checkpointing go with --sweep")
    if args.sweep:
        name = ("cost-sweep-quick" if args.quick else "cost-sweep") + ("-checkpointing" if args.checkpointing else "")
        sweep(args.out or ROOT / "runs" / name, args.quick, args.points, args.checkpointing)
    elif args.out:
        measure(args.out, args.quick)
    else:
        with tempfile.TemporaryDirectory(prefix="soda-cost-") as out:
            measure(Path(out), args.quick)


def points_arg(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(k), int(l)) for k, l in (point.split("x") for point in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--points {text!r}: expected KxL,KxL (8x512,16x256)") from None


def machine(manifest: dict) -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {manifest['soda_distill']['device']}"


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
        "machine": machine(manifest),
        "student": config["student"]["model"],
        "prompts": manifest["stages"]["teacher"]["records"],
        "SODA": soda,
        "GAD": gad,
        "ratios": {
            "time_gad_over_soda": round(gad["wall_s"] / soda["wall_s"], 2),
            "memory_soda_over_gad": round(soda["peak_memory_mb"] / gad["peak_memory_mb"], 2),
            "memory_soda_over_gad_own_stages": round(own_peak(soda, SODA, GAD) / own_peak(gad, GAD, SODA), 2),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    name = "cost-quick" if quick else "cost"
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(record, out, RESULTS / f"{name}.png")
    print(json.dumps(record["ratios"], indent=2))


def tokens_seen(metrics: Path) -> int:
    """The input tokens a trainer went through (its cumulative `num_tokens`)."""
    from soda_distill.records import read_metrics

    return int(max((m.get("num_tokens", 0) for m in read_metrics(metrics)), default=0))


def soda_work(run: Path, manifest: dict) -> dict:
    """SODA's generated tokens (the snapshot) and trained tokens (warmup and DPO), with the seconds of each."""
    stages = manifest["stages"]
    return {"generated_tokens": round(stages["snapshot"]["records"] * stages["snapshot"]["mean_tokens"]),
            "generation_s": stages["snapshot"]["wall_s"],
            "trained_tokens": sum(tokens_seen(run / s / "metrics.jsonl") for s in ("warmup", "distill")),
            "training_s": stages["pairs"]["wall_s"] + stages["warmup"]["wall_s"] + stages["distill"]["wall_s"]}


def gad_work(run: Path, manifest: dict, rollouts_per_step: int) -> dict:
    """GAD's generated tokens (rollouts, their time as GAD logs it) and trained tokens (warmup, and the rollouts the
    generator trains on), the rest of its time counted as training (discriminator, reference pass, updates)."""
    from soda_distill.records import read_metrics

    steps = [m for m in read_metrics(run / "gad" / "metrics.jsonl") if "completions/mean_length" in m]
    generation_s = sum(m.get("time/rollouts_s", 0.0) for m in steps)
    stages = manifest["stages"]
    return {"generated_tokens": round(sum(m["completions/mean_length"] * rollouts_per_step for m in steps)),
            "generation_s": round(generation_s, 1),
            "trained_tokens": tokens_seen(run / "warmup" / "metrics.jsonl") + tokens_seen(run / "gad" / "metrics.jsonl"),
            "training_s": round(sum(stages[s]["wall_s"] for s in GAD) - generation_s, 1)}


def cost_model(points: list[dict], method: str) -> dict:
    """Seconds per generated and per trained token, pooled over the points (each total over each token count), and
    how far `rate × tokens` falls from each point's measured time (fixed costs show as error at small points)."""
    rates = {kind: sum(p[method][f"{kind}_s"] for p in points) / max(sum(p[method][f"{kind[:-3]}ed_tokens"] for p in points), 1)
             for kind in ("generation", "training")}
    errors = [abs(rates["generation"] * p[method]["generated_tokens"] + rates["training"] * p[method]["trained_tokens"]
                  - p[method]["wall_s"]) / p[method]["wall_s"] for p in points]
    return {"generation_s_per_token": rates["generation"], "training_s_per_token": rates["training"],
            "max_relative_error": round(max(errors), 3)}


# The published setting (GAD: Ye et al. 2025; SODA's Table 3): answers up to 1536 tokens; GAD one SFT warmup epoch, then
# 2 adversarial epochs of 8 rollouts a prompt, the generator trained on them and the discriminator on them and the
# teacher's answer; SODA one snapshot, 1 SFT warmup epoch and 1 DPO epoch (chosen and rejected).
PUBLISHED = {"max_new_tokens": 1536, "rollouts": 8, "gad_epochs": 2}


def projection(points: list[dict], models: dict, prompt_tokens: float, soda_warmup: float = 1, gad_warmup: float = 1) -> dict:
    """Each method's time per prompt at the published setting from the fitted rates, its answers filling the limit as
    much as in the longest setting measured; per prompt, so the data set's size cancels. Each warmup epoch trains every
    prompt's sequence once; `range` holds the ratio with each method's time off by its fit's largest error."""
    largest = max(points, key=lambda p: (p["L"], p["K"]))
    fill = largest["GAD"]["generated_tokens"] / (largest["GAD"]["rollouts"] * largest["L"])
    answer = PUBLISHED["max_new_tokens"] * fill
    k, epochs, seq = PUBLISHED["rollouts"], PUBLISHED["gad_epochs"], prompt_tokens + answer
    tokens = {"SODA": {"generated": answer, "trained": (soda_warmup + 2) * seq},
              "GAD": {"generated": epochs * k * answer, "trained": gad_warmup * seq + epochs * (2 * k + 1) * seq}}
    seconds = {m: models[m]["generation_s_per_token"] * t["generated"] + models[m]["training_s_per_token"] * t["trained"]
               for m, t in tokens.items()}
    error = {m: models[m]["max_relative_error"] for m in seconds}
    ratio = seconds["GAD"] / seconds["SODA"]
    return {"assumptions": {**PUBLISHED, "soda_warmup_epochs": soda_warmup, "gad_warmup_epochs": gad_warmup,
                            "answer_tokens": round(answer), "prompt_tokens": round(prompt_tokens),
                            "per_prompt_tokens": {m: {k: round(v) for k, v in t.items()} for m, t in tokens.items()}},
            "time_gad_over_soda": round(ratio, 1),
            "range": [round(ratio * (1 - error["GAD"]) / (1 + error["SODA"]), 1),
                      round(ratio * (1 + error["GAD"]) / (1 - error["SODA"]), 1)],
            "paper": {"time_gad_over_soda": 10, "memory_soda_over_gad": 0.73}}


def sweep(out: Path, quick: bool, only: list[tuple[int, int]] | None, checkpointing: bool) -> None:
    """Every (K, L) of the grid, or only the points asked for, added to the committed record's other points."""
    from soda_distill.manifest import copy_stages

    grid = SWEEP_QUICK if quick else SWEEP
    name = ("cost-sweep-quick" if quick else "cost-sweep") + ("-checkpointing" if checkpointing else "")
    wanted = only or [(K, L) for L in grid["L"] for K in grid["K"]]
    path = RESULTS / f"{name}.json"
    earlier = json.loads(path.read_text()) if only and path.exists() else {}
    # a point measured before points were dated gets its record's date
    points = [{"date": earlier["date"], **p} for p in earlier.get("points", []) if (p["K"], p["L"]) not in wanted]
    if points and earlier["machine"] != machine_now():
        raise SystemExit(f"{path}: measured on {earlier['machine']!r}, not this machine ({machine_now()!r}): "
                         "its points and these would not compare; measure the whole grid (no --points)")
    commands = earlier.get("commands", [earlier["command"]] if earlier else [])
    command = " ".join(["python bench/cost.py", *sys.argv[1:]])
    for L in sorted({L for _, L in wanted}):
        common = [f"data.limit={grid['prompts']}", f"snapshot.max_new_tokens={L}", f"gad.max_new_tokens={L}",
                  "gad.epochs=1.0", f"gad.gradient_accumulation_steps={PROMPTS_PER_STEP}",
                  f"gad.discriminator.batch_size={PROMPTS_PER_STEP}", *(CHECKPOINTING if checkpointing else [])]
        base = out / f"L{L}"
        for command_name in ("teacher", *SODA):
            stage(command_name, base, common)
        soda_manifest = json.loads((base / "manifest.json").read_text())
        soda = {**summarize(soda_manifest, SODA), **soda_work(base, soda_manifest)}
        for K in sorted(K for K, at in wanted if at == L):
            run = out / f"L{L}-K{K}"
            if not run.exists():
                copy_stages(base, run, ["teacher", "snapshot", "pairs", "warmup"])
            stage("gad", run, [*common, f"gad.num_generations={K}", f"gad.batch_size={K}"])
            manifest = json.loads((run / "manifest.json").read_text())
            gad = {**summarize(manifest, GAD), **gad_work(run, manifest, K * PROMPTS_PER_STEP),
                   "rollouts": grid["prompts"] * K}
            points.append({"K": K, "L": L, "KL": K * L, "SODA": soda, "GAD": gad,
                           "time_gad_over_soda": round(gad["wall_s"] / soda["wall_s"], 2),
                           "memory_soda_over_gad": round(soda["peak_memory_mb"] / gad["peak_memory_mb"], 2),
                           "memory_soda_over_gad_own_stages": round(own_peak(soda, SODA, GAD) / own_peak(gad, GAD, SODA), 2),
                           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "precision": precision(base),
                           "versions": versions()})
            points.sort(key=lambda p: (p["L"], p["K"]))
            # Written after every point: a sweep stopped for time leaves the points it measured (and resumes)
            write_sweep(points, grid, soda_manifest, name, [*dict.fromkeys([*commands, command])], checkpointing)


def machine_now() -> str:
    """This machine, as `machine` names it from a run's manifest."""
    from soda_distill.manifest import _device

    return machine({"soda_distill": {"device": _device()}})


def precision(run: Path) -> str:
    from soda_distill.models import use_bf16

    return "bf16" if use_bf16(yaml.safe_load((run / "config.yaml").read_text())["student"]["bf16"]) else "fp32"


def write_sweep(points: list[dict], grid: dict, soda_manifest: dict, name: str, commands: list[str],
                checkpointing: bool) -> None:
    from soda_distill.config import WarmupConfig

    record = {
        "command": commands[-1], "commands": commands,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(soda_manifest),
        "gradient_checkpointing": checkpointing,
        "prompts": grid["prompts"], "prompts_per_gad_step": PROMPTS_PER_STEP,
        "grid": {"K": sorted({p["K"] for p in points}), "L": sorted({p["L"] for p in points})},
        "complete": all(any((p["K"], p["L"]) == (K, L) for p in points) for K in grid["K"] for L in grid["L"]),
        "points": points,
    }
    if "precision" in points[0] and len({(p.get("precision"), json.dumps(p.get("versions"))) for p in points}) == 1:
        record.update(precision=points[0]["precision"], versions=points[0]["versions"])  # every point's the same
    if not checkpointing:  # a memory record: checkpointing's recomputation (and uncached rollouts) is no cost model
        models = {m: cost_model(points, m) for m in ("SODA", "GAD")}
        default_warmup = WarmupConfig().epochs
        prompt_tokens = soda_manifest["stages"]["pairs"]["lengths"]["prompt"]["mean"]
        record.update({
            "cost_model": models, "projection": projection(points, models, prompt_tokens),
            # The package's warmup (3 epochs), GAD from the same warmup as `--method gad` trains, or from the published 1
            "projections_default_warmup": {
                "gad_same_warmup": projection(points, models, prompt_tokens, default_warmup, default_warmup),
                "gad_published_warmup": projection(points, models, prompt_tokens, default_warmup, 1)}})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_sweep(record, RESULTS / f"{name}.png")
    print(json.dumps({"ratios": [(p["K"], p["L"], p["time_gad_over_soda"]) for p in points],
                      "projection": record.get("projection", {}).get("time_gad_over_soda")}, indent=1), flush=True)


def plot_sweep(record: dict, path: Path) -> None:
    """Time, ratios and the peak memory of each method's own stages against K·L: SODA one line (its cost does not
    depend on K), GAD and the ratios one line per K."""
    from soda_distill.plots import label_axes, panels, run_color, save_png

    fig, (time_ax, ratio_ax, mem_ax) = panels(3)
    ks = sorted({p["K"] for p in record["points"]})
    soda = sorted({p["L"]: p for p in record["points"]}.values(), key=lambda p: p["L"])  # one per L
    time_ax.plot([p["L"] for p in soda], [p["SODA"]["wall_s"] / 60 for p in soda], "o-", color=run_color(0), label="SODA (any K; x = L)")
    mem_ax.plot([p["L"] for p in soda], [own_peak(p["SODA"], SODA, GAD) / 1024 for p in soda], "o-", color=run_color(0),
                label="SODA: snapshot, pairs, DPO (x = L)")
    for i, k in enumerate(ks, start=1):
        line = sorted((p for p in record["points"] if p["K"] == k), key=lambda p: p["KL"])
        kl = [p["KL"] for p in line]
        time_ax.plot(kl, [p["GAD"]["wall_s"] / 60 for p in line], "o-", color=run_color(i), label=f"GAD, K={k}")
        ratio_ax.plot(kl, [p["time_gad_over_soda"] for p in line], "o-", color=run_color(i), label=f"time GAD / SODA, K={k}")
        ratio_ax.plot(kl, [p["memory_soda_over_gad_own_stages"] for p in line], "s--", color=run_color(i),
                      label=f"memory SODA / GAD (own stages), K={k}")
        mem_ax.plot(kl, [own_peak(p["GAD"], GAD, SODA) / 1024 for p in line], "o-", color=run_color(i),
                    label=f"GAD: discriminator warmup, adversarial, K={k}")
    for ax in (time_ax, ratio_ax, mem_ax):
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    label_axes(time_ax, "wall time, shared warmup included", "rollouts × answer length (K·L)", "minutes")
    projected = f" (published setting, projected: {record['projection']['time_gad_over_soda']}×)" if "projection" in record else ""
    label_axes(ratio_ax, f"ratios{projected}", "K·L", "")
    label_axes(mem_ax, "peak memory, own stages", "K·L", "GiB")
    done = "" if record.get("complete", True) else f" ({len(record['points'])} of {len(record['grid']['K']) * len(record['grid']['L'])} points)"
    fig.suptitle(f"SODA vs GAD against rollouts and length, {record['prompts']} prompts{done} — {record['machine']}")
    save_png(fig, path)


if __name__ == "__main__":
    main()
