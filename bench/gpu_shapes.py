"""The GPU check's `shapes` part (bench/gpu.py runs it): SFT and DPO of the student's architecture at about 0.5B,
1.5B and 3B parameters on 2,048-token sequences, soda's trainers against stock TRL set up as its documentation
recommends on a GPU.

    python bench/gpu_shapes.py --student DIR --out DIR [--smoke] [--budget SECONDS]

The student's Llama architecture, vocabulary and tokenizer (DIR: a model folder with its config and tokenizer) in
Qwen2.5's shapes (hidden size, layers, heads, intermediate size), with random weights, in fp32 under bf16 autocast as
both trainers load a model; synthetic chat pairs whose every sequence fills the 2,048 tokens. Each measurement runs in
a process of its own under a time limit, so that running out of memory or failing costs that one alone: 2 untimed
steps, then 4 timed. The goals' size runs first; the largest runs last, and only if time is left for it.

Model FLOPs per token: 6 × parameters (the LM head counted once: its weights are the tied embedding's) + 6 × layers ×
sequence length × attention width (causal attention's two products, forward and backward). MFU: model FLOP/s over
the card's dense bf16 peak (NVIDIA's data sheets), or, where the card is not in the table, over the bf16
matrix-product rate measured here. DPO's tokens are the chosen and the rejected sequences'; the reference model's
forward passes count in neither the FLOPs nor the tokens (stock TRL runs them every step, soda once before training,
untimed). --smoke: a 2-layer, 64-wide model on 64-token sequences, to check this script on a CPU. Writes
DIR/shapes.json after every measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from gpu import WORK, part
from throughput import matmul, peak, soda_trainer, stock_trainer, synthetic_pairs, timed_training

UNTIMED_STEPS, TIMED_STEPS = 2, 4
# Qwen2.5's shapes on the student's vocabulary (49,152 tokens, against Qwen's 151,936: fewer parameters than the
# names say); micro-batches (SFT sequences, DPO pairs of two) that fit 80 GB with soda's defaults (no gradient
# checkpointing); `expected_s`: a guess at one measurement's time (process start, model, steps), its limit 3 times
# that. In the order run: the goals' size (≥ 1.5B) first, the largest last, started only with 4 × expected_s left.
SHAPES = {
    "1.5B": {"like": "Qwen2.5-1.5B", "sft_batch": 4, "dpo_batch": 2, "expected_s": 35,
             "config": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                        "num_key_value_heads": 2, "intermediate_size": 8960}},
    "0.5B": {"like": "Qwen2.5-0.5B", "sft_batch": 8, "dpo_batch": 4, "expected_s": 30,
             "config": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                        "num_key_value_heads": 2, "intermediate_size": 4864}},
    "3B": {"like": "Qwen2.5-3B", "sft_batch": 1, "dpo_batch": 1, "expected_s": 45,
           "config": {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                      "num_key_value_heads": 2, "intermediate_size": 11008}},
}
TOY = {"toy": {"like": "2 layers × 64", "sft_batch": 2, "dpo_batch": 2, "expected_s": 60,
               "config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "intermediate_size": 256}}}
# dense bf16 TFLOP/s by the card's name (the first name it contains)
BF16_PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312}
MEASUREMENTS = ("sft_soda", "sft_stock", "dpo_soda", "dpo_stock")


def sequence_length(smoke: bool) -> int:
    return 64 if smoke else 2048


def stock_settings() -> dict:
    """Stock TRL's settings as its documentation recommends them on a GPU (on a CPU: the smoke test, none of them).
    Padding-free batching and packing are left off: TRL documents them for FlashAttention only, and every sequence
    here fills max_length, so there is no padding for them to remove."""
    import torch
    from transformers.utils import is_liger_kernel_available

    if not torch.cuda.is_available():
        return {}
    return {"bf16": True, "activation_checkpointing": True, "use_liger_kernel": is_liger_kernel_available()}


def train_shape(student: str, shape: dict, measurement: str, smoke: bool) -> dict:
    """One measurement (`sft_soda`, `dpo_stock`, ...) at one shape: tokens/s, model FLOPs per token, peak memory."""
    import copy
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from soda_distill.manifest import PeakMemory
    from soda_distill.models import load_tokenizer

    stage, variant = measurement.split("_")
    length, batch, n_steps = sequence_length(smoke), shape[f"{stage}_batch"], UNTIMED_STEPS + TIMED_STEPS
    config = AutoConfig.from_pretrained(student)
    config.update(shape["config"])
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # as load_model puts it: fp32, on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 **({"attn_implementation": "sdpa"} if variant == "stock" else {}))
    tokenizer = load_tokenizer(student)
    # answers longer than the sequence (cut at max_length) after a short prompt, so that every sequence fills it
    rows = synthetic_pairs(batch * n_steps, answer_tokens=(length * 5 // 4,) * 2, max_prompt_words=length // 8)
    settings = stock_settings() if variant == "stock" else {}
    with PeakMemory() as memory, tempfile.TemporaryDirectory() as out:
        if variant == "soda":
            trainer = soda_trainer(stage, model, tokenizer, rows, batch, Path(out), max_length=length)
        else:  # the model has no folder for TRL to load DPO's reference from: a copy of it, as TRL would load
            reference = copy.deepcopy(model) if stage == "dpo" else None
            trainer = stock_trainer(stage, model, tokenizer, rows, batch, Path(out), max_length=length,
                                    ref_model=reference, **settings)
        timed = timed_training(trainer, n_steps, UNTIMED_STEPS)
    parameters = sum(p.numel() for p in model.parameters())
    attention_width = config.num_attention_heads * config.head_dim
    flops_per_token = 6 * parameters + 6 * config.num_hidden_layers * timed["tokens_per_sequence"] * attention_width
    tokens_per_s = timed["tokens"] / timed["seconds"]
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "model_tflops": round(tokens_per_s * flops_per_token / 1e12, 3),
        "parameters": parameters, "flops_per_token": round(flops_per_token),
        "tokens_per_sequence": round(timed["tokens_per_sequence"], 1), "batch": batch,
        "wall_s_incl_setup": timed["wall_s_incl_setup"], **memory.result,
        "attention": model.config._attn_implementation, **({"trl_settings": settings} if settings else {}),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def card_name() -> str | None:
    """The GPU's name by nvidia-smi (this process leaves CUDA alone: its context would take memory from the
    measurements), or None."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def versions() -> dict:
    found = {}
    for name in ("torch", "transformers", "trl", "accelerate", "liger-kernel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def figures(measured: dict, peak_tflops: float | None) -> dict:
    """A shape's figures: soda's MFU, and soda ÷ stock for tokens/s and peak memory (None where one failed); each
    finished measurement gets its MFU."""
    done = {name: m for name, m in measured.items() if m.get("ok")}
    for m in done.values():
        m["mfu"] = round(m["tokens_per_s"] * m["flops_per_token"] / (peak_tflops * 1e12), 4) if peak_tflops else None
    ratio = lambda stage, of: (round(of(done[f"{stage}_soda"]) / of(done[f"{stage}_stock"]), 2)  # noqa: E731
                               if {f"{stage}_soda", f"{stage}_stock"} <= set(done) else None)
    return {
        **{f"{stage}_mfu": done.get(f"{stage}_soda", {}).get("mfu") for stage in ("sft", "dpo")},
        **{f"{stage}_speedup": ratio(stage, lambda m: m["tokens_per_s"]) for stage in ("sft", "dpo")},
        **{f"{stage}_memory_ratio": ratio(stage, peak) for stage in ("sft", "dpo")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="a model folder: the architecture's config and tokenizer")
    parser.add_argument("--out", type=Path, help="where shapes.json goes")
    parser.add_argument("--smoke", action="store_true", help="a toy shape on short sequences: check this on a CPU")
    parser.add_argument("--budget", type=float, default=450, help="seconds for every measurement (then it stops)")
    parser.add_argument("--measure", choices=("ceiling", *MEASUREMENTS), help=argparse.SUPPRESS)  # in a child
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = TOY if args.smoke else SHAPES
    if args.measure:
        result = (matmul("bfloat16", quick=True) if args.measure == "ceiling"
                  else train_shape(args.student, shapes[args.shape], args.measure, args.smoke))
        args.result.write_text(json.dumps(result))
        return
    if args.out is None:
        parser.error("--out is required")
    deadline = time.monotonic() + args.budget
    (args.out / "shapes.json").unlink(missing_ok=True)  # gpu.py reads it: none rather than an earlier run's
    work = WORK / "shapes"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def run(label: str, measure: str, limit: float, shape: str = "") -> dict:
        result = work / f"{shape}-{measure}.json"
        cmd = [sys.executable, __file__, "--student", args.student, "--measure", measure, "--shape", shape,
               "--result", str(result), *(["--smoke"] if args.smoke else [])]
        record = part(label, cmd, min(limit, deadline - time.monotonic()))
        return {**record, **json.loads(result.read_text())} if record["ok"] else record

    card = card_name()
    known = next((tflops for name, tflops in BF16_PEAK_TFLOPS.items() if card and name in card), None)
    ceiling = None if known else run("bf16 matrix-product ceiling", "ceiling", 60)
    peak_tflops = known or (ceiling["gflops"] / 1000 if ceiling and ceiling["ok"] else None)
    record = {
        "command": "python bench/gpu_shapes.py" + (" --smoke" if args.smoke else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "card": card or "no GPU",
        "peak_bf16_tflops": peak_tflops,
        "peak_from": "the card's data sheet (dense bf16)" if known else "the bf16 matrix-product rate measured here",
        **({"ceiling": ceiling} if ceiling else {}),
        "versions": versions(),
        "sequence_length": sequence_length(args.smoke),
        "steps": {"untimed": UNTIMED_STEPS, "timed": TIMED_STEPS},
        "model_flops_per_token": "6 × parameters + 6 × layers × sequence length × attention width",
        "soda": "the package's trainers as its warmup and distill stages build them, with their defaults",
        "stock": "TRL's trainers with its defaults; on a GPU: bf16 autocast, attn_implementation=sdpa, gradient "
                 "checkpointing, Liger kernels where liger_kernel is installed, no padding-free or packing "
                 "(documented for FlashAttention only; no padding here to remove)",
        "shapes": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save = lambda: (args.out / "shapes.json").write_text(json.dumps(record, indent=2) + "\n")  # noqa: E731
    save()
    for name, shape in shapes.items():
        measured = {}
        entry = record["shapes"][name] = {
            "like": shape["like"], "config": {**shape["config"], **{k: shape[k] for k in ("sft_batch", "dpo_batch")}},
            "parameters": None, **figures(measured, peak_tflops), "measurements": measured}
        if deadline - time.monotonic() < 4 * shape["expected_s"]:
            print(f"== {name}: skipped, too little time left", flush=True)
            entry["measurements"] = "skipped: too little time left"
            continue
        for measurement in MEASUREMENTS:
            measured[measurement] = run(f"{name} {measurement}", measurement, 3 * shape["expected_s"], name)
            entry["parameters"] = next((m["parameters"] for m in measured.values() if m.get("ok")), None)
            entry.update(figures(measured, peak_tflops))
            save()
    save()
    print(json.dumps({name: {k: v for k, v in s.items() if k not in ("config", "measurements")}
                      for name, s in record["shapes"].items()}))


if __name__ == "__main__":
    main()
