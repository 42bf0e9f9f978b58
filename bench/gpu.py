"""The GPU check (bench/gpu.sh runs it): every part in a process of its own, under a time limit, each one's outcome
recorded whether it passed or not, so one failure does not cost the others.

    python bench/gpu.py --out DIR [--smoke]

The student has the embedded SmolLM2-135M's shapes and tokenizer with random weights (`.whl/student`, or the
embedded model itself where it is installed): times and memory are the real student's, quality is not measured.
--smoke runs the same parts at toy size (on a CPU, to check this script). Writes DIR/gpu.json and DIR/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
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


def part(name: str, cmd: list[str], limit_s: int, env: dict | None = None) -> dict:
    """Run one part; its return code, wall time and, where it failed, the end of its output."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s,
                              env={**os.environ, **(env or {})})
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, output = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
    record = {"ok": code == 0, "returncode": code, "wall_s": round(time.perf_counter() - start, 1)}
    if code != 0:
        record["output_tail"] = output[-3000:] if isinstance(output, str) else str(output)[-3000:]
    print(json.dumps(record)[:400], flush=True)
    return record


def stages(run: Path) -> dict:
    """Each finished stage's wall time and peak memory, from the run's manifest."""
    manifest = run / "manifest.json"
    if not manifest.exists():
        return {}
    keep = ("wall_s", "peak_rss_mb", "peak_gpu_mb", "steps", "records")
    return {name: {k: v for k, v in rec.items() if k in keep}
            for name, rec in json.loads(manifest.read_text())["stages"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="toy sizes: check this script on a CPU")
    args = parser.parse_args()
    import torch

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model = student()
    python, toy = sys.executable, args.smoke
    size = (["data.limit=8", "snapshot.max_new_tokens=16", "gad.max_new_tokens=16", "gad.epochs=0.5"] if toy else [])
    demo = [python, "-m", "soda_distill", "run", "configs/demo.yaml", f"student.model={model}", "check.limit=0", *size]
    fsdp = ["data.limit=16", "warmup.batch_size=4", "distill.batch_size=2", "snapshot.max_new_tokens=32",
            "student.bf16=false" if toy else "student.bf16=true"]
    results = {
        "demo_soda": part("demo: SODA", [*demo, "--out", str(WORK / "demo")], 240),
        "demo_gad": part("demo: GAD", [*demo, "--method", "gad", "--out", str(WORK / "demo")], 240),
        "throughput": part("throughput", [python, "bench/throughput.py", "--quick", "--student", model] if not toy
                           else [python, "bench/throughput.py", "--quick", "--measure", "sft_soda"], 240,
                           env={"SODA_BENCH_STUDENT": model}),
        # one process under accelerate's FSDP v2 config (several where the machine has several GPUs)
        "fsdp": part("FSDP, one GPU", [python, "-m", "accelerate.commands.launch", "--config_file",
                                       "configs/accelerate/fsdp.yaml", "--num_processes", "1", "-m", "soda_distill",
                                       "run", "configs/demo.yaml", "--out", str(WORK / "fsdp"),
                                       f"student.model={model}", "check.limit=0", *fsdp], 180),
    }
    results["demo_gad"]["stages"] = stages(WORK / "demo")  # SODA's and GAD's, in one run directory
    results["fsdp"]["stages"] = stages(WORK / "fsdp")
    throughput = ROOT / "bench" / "results" / "throughput.json"
    if results["throughput"]["ok"] and not toy:
        results["throughput"]["ratios"] = json.loads(throughput.read_text())["ratios"]
        shutil.copy(throughput, args.out / "throughput.json")
    try:
        import vllm  # noqa: F401

        results["vllm"] = "installed (not yet measured by this script)"
    except ImportError:
        results["vllm"] = "not installed: its wheel is far over the 64 MiB a device call carries"
    record = {
        "command": "bash bench/gpu.sh" + (" --smoke" if toy else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores"
                   + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"),
        "versions": {"torch": torch.__version__, **{m: __import__(m).__version__ for m in ("transformers", "trl", "accelerate")}},
        "student": "embedded SmolLM2-135M" if ".whl" not in model and "soda-gpu-check" not in model
                   else "SmolLM2-135M's shapes and tokenizer, random weights",
        "deepspeed": "not run: not installed there (ZeRO configs are in configs/accelerate/)",
        "parts": results,
    }
    (args.out / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v["ok"] for k, v in results.items() if isinstance(v, dict)}))


if __name__ == "__main__":
    main()
