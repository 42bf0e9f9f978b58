"""The GPU check (bench/gpu.sh runs it): every part in a process of its own, under a time limit, each one's outcome
recorded whether it passed or not, so one failure does not cost the others.

    python bench/gpu.py --out DIR [--smoke]

The student has the embedded SmolLM2-135M's shapes and tokenizer with random weights (`.whl/student`, or the
embedded model itself where it is installed): times and memory are the real student's, quality is not measured.
--smoke runs the same parts at toy size (on a CPU, to check this script). Writes DIR/gpu.json, DIR/throughput.json,
DIR/shapes.json (the part `shapes`, bench/gpu_shapes.py: SFT and DPO at 0.5B–3B parameters) and DIR/replica.tar (the
part `replica`: one seed of the AlpacaEval replica on the real student, bench/quality.py's results and rows under
bench/results/, to unpack in the checkout).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/soda-gpu-check")


def student() -> str:
    """A model folder with the embedded student's shapes: its config and tokenizer, weights drawn at random."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = ROOT / ".whl" / "student"
    if not source.exists():
        from soda_distill.models import resolve_model

        return resolve_model("embedded")
    target = WORK / "student"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return str(target)


def dry_check(cmd: list[str]) -> dict:
    """--dry: what a part would run, checked without running it: its accelerate config and soda config (with the
    overrides) load, its methods exist, and a bench script takes its arguments."""
    try:
        if "--config_file" in cmd:
            from accelerate.commands.config.config_args import load_config_from_file

            load_config_from_file(str(ROOT / cmd[cmd.index("--config_file") + 1]))
        if "soda_distill" in cmd:
            from soda_distill.config import load_config
            from soda_distill.registry import methods_named

            rest = cmd[cmd.index("run") + 1:]
            load_config(str(ROOT / rest[0]), [a for a in rest[1:] if "=" in a and not a.startswith("-")])
            methods_named([rest[rest.index("--method") + 1]] if "--method" in rest else [])
        else:
            subprocess.run([*cmd, "--help"], cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    except Exception as e:  # noqa: BLE001 (every failure is this part's outcome)
        return {"ok": False, "returncode": "dry: refused", "output_tail": f"{type(e).__name__}: {e}"[-3000:]}
    return {"ok": True, "returncode": "dry: checked"}


def part(name: str, cmd: list[str], limit_s: float, env: dict | None = None, dry: bool = False) -> dict:
    """Run one part (with dry, only check it); its return code, wall time and, where it failed, the end of its
    output."""
    if dry:
        print(f"== {name} (dry): {' '.join(cmd)}", flush=True)
        return dry_check(cmd)
    if limit_s < 30:
        print(f"== {name}: skipped, the script's time is spent", flush=True)
        return {"ok": False, "returncode": "skipped: out of time"}
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s,
                              env={**os.environ, **(env or {})})
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:  # its captured output comes as bytes, text=True notwithstanding
        code, output = "timeout", b"".join(o for o in (e.stdout, e.stderr) if o).decode(errors="replace")
    record = {"ok": code == 0, "returncode": code, "wall_s": round(time.perf_counter() - start, 1)}
    if code != 0:
        record["output_tail"] = output[-3000:]
    print(json.dumps(record)[:400], flush=True)
    return record


def stages(run: Path) -> dict:
    """Each finished stage's wall time and peak memory, from the run's manifest."""
    manifest = run / "manifest.json"
    if not manifest.exists():
        return {}
    keep = ("wall_s", "peak_rss_mb", "peak_gpu_mb", "steps", "records", "refresh", "teacher_dtype")
    return {name: {k: v for k, v in rec.items() if k in keep}
            for name, rec in json.loads(manifest.read_text())["stages"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="toy sizes: check this script on a CPU")
    parser.add_argument("--dry", action="store_true", help="check every part's command, run none (CI runs this)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all parts (the parts left are skipped)")
    parser.add_argument("--parts", default="", help="comma-separated parts to run, in this order (default: all)")
    args = parser.parse_args()
    import torch

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model = str(WORK / "student") if args.dry else student()
    python, toy = sys.executable, args.smoke
    size = (["data.limit=8", "snapshot.max_new_tokens=16", "gad.max_new_tokens=16", "gad.epochs=0.5"] if toy else [])
    demo = [python, "-m", "soda_distill", "run", "configs/demo.yaml", f"student.model={model}", "check.limit=0", *size]
    small = ["data.limit=16", "warmup.batch_size=4", "distill.batch_size=2", "snapshot.max_new_tokens=32",
            "student.bf16=false" if toy else "student.bf16=true"]
    deadline = time.monotonic() + args.budget
    run_part = functools.partial(part, dry=args.dry)
    left = lambda limit: min(limit, deadline - time.monotonic())  # noqa: E731
    launch = [python, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    trained = [python, "-m", "soda_distill", "run", "configs/demo.yaml", f"student.model={model}", "check.limit=0",
               *small]
    bench = [python, "bench/throughput.py", "--quick", *(["--measure", "sft_soda"] if toy else ["--student", model])]
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    # name: (label, command, seconds at most, environment); one process under accelerate's FSDP v2 and DeepSpeed configs
    plan = {
        "demo_soda": ("demo: SODA", [*demo, "--out", str(WORK / "demo")], 240, None),
        "throughput": ("throughput", bench, 240, {"SODA_BENCH_STUDENT": model}),
        "overhead": ("a step's compute, optimizer and overhead", [python, "bench/step_overhead.py", "--steps",
                     "3" if toy else "11"], 120, {"SODA_BENCH_STUDENT": model}),
        "fsdp": ("FSDP, one GPU", [*launch, "--config_file", "configs/accelerate/fsdp.yaml", *trained[1:],
                                   "--out", str(WORK / "fsdp")], 180, None),
        **{stage: (f"DeepSpeed {stage}, one GPU", [*launch, "--config_file", f"configs/accelerate/{stage}.yaml",
                                                   *trained[1:], "--out", str(WORK / stage)], 180, None)
           for stage in ("zero3", "zero2")},
        "lora": ("LoRA", [*trained, "student.lora.r=16", "warmup.learning_rate=2e-4", "distill.learning_rate=5e-5",
                          "--out", str(WORK / "lora")], 150, None),
        "demo_gad": ("demo: GAD", [*demo, "--method", "gad", "--out", str(WORK / "demo")], 240, None),
        "dial": ("on-policy dial, a refresh every 2 steps", [*trained, "distill.refresh_every=2",
                                                             "pairs.truncated_rejected=open",  # all 16 pairs: 8 steps
                                                             "--out", str(WORK / "dial")], 150, None),
        "opd": ("OPD, the student its own teacher (in bf16)", [*trained, "--method", "opd", f"opd.teacher_model={model}",
                                                              "opd.max_new_tokens=32", "--out", str(WORK / "opd")], 150, None),
        # only when named: it needs bench/gpu_wheels.sh --replica's bundle and the whole budget. A new seed, its own
        # table (a seed's rows come from one kind of machine), stopping itself in time and resumed by the next call
        "replica": ("the AlpacaEval replica, one seed on the real student", [
            python, "bench/quality.py", "--config", "configs/alpaca_eval.yaml", "--tag", "gpu", "--seeds", "45",
            "--methods", "base,warmup,seqkd,soda", "--minutes", f"{max(1.0, (args.budget - 90) / 60):.1f}",
            *(["--quick"] if toy else []), "--set", "snapshot.batch_size=128", "evaluate.batch_size=128"],
            args.budget, None),
        # last: it takes the whole budget (run it alone: --parts shapes); its JSON is written after every measurement
        "shapes": ("SFT and DPO at 0.5B, 1.5B and 3B parameters", [python, "bench/gpu_shapes.py", "--student", model,
                   "--out", str(args.out), *(["--smoke"] if toy else [])], 480, None),
    }
    chosen = args.parts.split(",") if args.parts else [name for name in plan if name != "replica"]
    if unknown := set(chosen) - set(plan):
        parser.error(f"--parts: no part {sorted(unknown)}; the parts are {','.join(plan)}")
    results = {name: {"ok": False, "returncode": "skipped: not in --parts"} for name in plan}
    for name in chosen:
        label, cmd, limit, env = plan[name]
        results[name] = ({"ok": False, "returncode": "skipped: no deepspeed"}
                         if name.startswith("zero") and not (has_deepspeed or args.dry)
                         else run_part(label, cmd, left(limit), env=env))
    results["demo_gad"]["stages"] = stages(WORK / "demo")  # SODA's and GAD's, in one run directory
    for name in ("fsdp", "zero3", "zero2", "lora", "dial", "opd"):
        results[name]["stages"] = stages(WORK / name)
    shapes = args.out / "shapes.json"
    if "shapes" in chosen and shapes.exists() and not args.dry:  # each shape's parameters and figures
        results["shapes"]["shapes"] = {name: {k: v for k, v in shape.items() if k != "measurements"}
                                       for name, shape in json.loads(shapes.read_text())["shapes"].items()}
    replica = ROOT / "bench" / "results" / f"alpaca_eval{'-quick' if toy else ''}-gpu"
    if "replica" in chosen and replica.with_suffix(".json").exists() and not args.dry:
        made = json.loads(replica.with_suffix(".json").read_text())
        results["replica"].update({k: made.get(k) for k in ("this_piece", "evaluation_answers", "evaluation_complete")})
        with tarfile.open(args.out / "replica.tar", "w") as tar:
            for path in [*replica.parent.glob(f"{replica.name}.*"), *([replica] if replica.exists() else [])]:
                tar.add(path, arcname=str(path.relative_to(ROOT)))
    throughput = ROOT / "bench" / "results" / "throughput.json"
    if results["throughput"]["ok"] and not toy and not args.dry:
        results["throughput"]["ratios"] = json.loads(throughput.read_text())["ratios"]
        shutil.copy(throughput, args.out / "throughput.json")
    overhead = ROOT / "bench" / "results" / "step-overhead.json"
    if results["overhead"]["ok"] and not toy and not args.dry:
        results["overhead"]["results"] = json.loads(overhead.read_text())["results"]
        shutil.copy(overhead, args.out / "step-overhead.json")
    try:
        import vllm  # noqa: F401

        results["vllm"] = "installed (not yet measured by this script)"
    except ImportError:
        results["vllm"] = "not installed: its wheel is far over the 64 MiB a device call carries"
    record = {
        "command": "bash bench/gpu.sh" + (" --smoke" if toy else "") + (" --dry" if args.dry else "")
                   + (f" --parts {args.parts}" if args.parts else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores"
                   + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"),
        "versions": {m: version(m) for m in ("torch", "transformers", "trl", "accelerate", "peft",
                                             *(["deepspeed"] if has_deepspeed else []))},
        "student": "embedded SmolLM2-135M" if ".whl" not in model and "soda-gpu-check" not in model
                   else "SmolLM2-135M's shapes and tokenizer, random weights",
        "budget_s": args.budget,
        "parts": results,
    }
    (args.out / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v["ok"] for k, v in results.items() if isinstance(v, dict)}))


if __name__ == "__main__":
    main()
