"""Stage 4 — warmup: SFT of q0 on the teacher responses, loss on assistant tokens only → q_w.

Run briefly, it is SODA's starting point; run fully (its own config), it is the SeqKD baseline.
The data is TRL's conversational prompt-completion format, so the completion mask (prompt tokens masked, the
assistant's answer and its end-of-turn token trained) comes from TRL itself.
"""

from __future__ import annotations

from pathlib import Path

from trl import SFTConfig, SFTTrainer

from ..config import Config, fingerprint
from ..manifest import RunDir, combine
from ..models import load_model, load_tokenizer, resolve_model, use_bf16
from ..records import read_examples, sha256_file
from ..training import MetricsLog, ResumableOrder, apply_cpu_settings, train_and_save, trainer_arguments


def sft_dataset(teacher_path: Path):
    from datasets import Dataset

    rows = [
        {"prompt": ex.prompt, "completion": [{"role": "assistant", "content": ex.response}]}
        for ex in read_examples(teacher_path, want_response=True)
        if ex.response.strip()
    ]
    return Dataset.from_list(rows)


class ResumableSFTTrainer(ResumableOrder, SFTTrainer):
    """TRL's SFTTrainer, with a training order a resumed run repeats."""


def build_sft_trainer(model, tokenizer, dataset, cfg: Config, output_dir: Path, metrics_path: Path):
    args = SFTConfig(
        **trainer_arguments(cfg.warmup, output_dir / "checkpoints", use_bf16(cfg.student.bf16)),
        completion_only_loss=True,
        packing=False,
    )
    return apply_cpu_settings(ResumableSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[MetricsLog(metrics_path)]
    ))


def run_warmup(cfg: Config, run: RunDir) -> Path:
    teacher_path, out = run.output("teacher"), run.output("warmup")
    fp = combine(fingerprint(cfg.warmup), fingerprint(cfg.student), sha256_file(teacher_path))
    if run.done("warmup", fp):
        return out
    with run.stage("warmup", fp) as info:
        model_path = resolve_model(cfg.student.model, cfg.student.gguf_file)
        tokenizer = load_tokenizer(model_path, cfg.student.trust_remote_code)
        model = load_model(model_path, trust_remote_code=cfg.student.trust_remote_code)
        dataset = sft_dataset(teacher_path)
        trainer = build_sft_trainer(model, tokenizer, dataset, cfg, out, out / "metrics.jsonl")
        info.update(examples=len(dataset), **train_and_save(trainer, out))
    return out
