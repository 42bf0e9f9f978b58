"""Stage 4 — warmup: SFT of q0 on the teacher responses, loss on assistant tokens only → q_w.

Run briefly, it is SODA's starting point; run to its best held-out loss, it is the SeqKD baseline (seqkd.py).
The teacher's answers are tokenized as TRL tokenizes a conversational prompt-completion example (chat_tokens.py): the
prompt masked, the answer and its end of turn trained — except that an answer cut at its token limit gets no end of
turn (`warmup.truncated`).
"""

from __future__ import annotations

from pathlib import Path

from trl import SFTConfig, SFTTrainer

from ..chat_tokens import chat_ids
from ..config import Config, WarmupConfig, fingerprint
from ..manifest import RunDir, combine
from ..models import load_model, load_tokenizer, resolve_model, use_bf16
from ..records import read_examples, sha256_file
from ..training import (MetricsLog, ResumableOrder, apply_cpu_settings, peft_config, train_and_save,
                        trainer_arguments)


def sft_dataset(teacher_path: Path, tokenizer, truncated: str = "open"):
    """The teacher's answers tokenized as TRL's SFT tokenizes a prompt-completion conversation, the loss on the
    answer (`completion_mask`); an answer cut at its token limit without its end of turn, or dropped (`truncated`).
    Returns the data set and the counts of cut answers kept open and dropped."""
    from datasets import Dataset

    rows, counts = [], {"truncated_kept_open": 0, "dropped_truncated": 0}
    for ex in read_examples(teacher_path, want_response=True):
        if not ex.response.strip():
            continue
        if ex.truncated and truncated == "drop":
            counts["dropped_truncated"] += 1
            continue
        counts["truncated_kept_open"] += ex.truncated
        prompt_ids, answer_ids = chat_ids(tokenizer, ex.prompt, ex.response, open_end=ex.truncated)
        rows.append({"input_ids": prompt_ids + answer_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(answer_ids)})
    return Dataset.from_list(rows), counts


class ResumableSFTTrainer(ResumableOrder, SFTTrainer):
    """TRL's SFTTrainer, with a training order a resumed run repeats."""


def build_sft_trainer(model, tokenizer, dataset, cfg: Config, output_dir: Path, metrics_path: Path,
                      section: WarmupConfig | None = None, eval_dataset=None, callbacks=(), **arguments):
    """TRL's SFTTrainer on `dataset` with the settings of `section` (default: cfg.warmup); `arguments` add to or
    replace SFTConfig's."""
    args = SFTConfig(**{
        **trainer_arguments(section or cfg.warmup, output_dir / "checkpoints", cfg),
        "completion_only_loss": True,
        "packing": False,
        **arguments,
    })
    return apply_cpu_settings(ResumableSFTTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        callbacks=[MetricsLog(metrics_path), *callbacks], peft_config=peft_config(cfg.student.lora),
    ))


def student_and_answers(cfg: Config, teacher_path: Path, truncated: str):
    """The untouched student q0, its tokenizer, and the teacher's answers as `sft_dataset` makes them (with its counts)."""
    model_path = resolve_model(cfg.student.model, cfg.student.gguf_file)
    tokenizer = load_tokenizer(model_path, cfg.student.trust_remote_code)
    model = load_model(model_path, trust_remote_code=cfg.student.trust_remote_code, quantize=cfg.student.quantize,
                       bf16=use_bf16(cfg.student.bf16))
    return (model, tokenizer, *sft_dataset(teacher_path, tokenizer, truncated))


def run_warmup(cfg: Config, run: RunDir) -> Path:
    teacher_path, out = run.output("teacher"), run.output("warmup")
    fp = combine(fingerprint(cfg.warmup), fingerprint(cfg.student), sha256_file(teacher_path))
    if run.done("warmup", fp):
        return out
    with run.stage("warmup", fp) as info:
        model, tokenizer, dataset, counts = student_and_answers(cfg, teacher_path, cfg.warmup.truncated)
        trainer = build_sft_trainer(model, tokenizer, dataset, cfg, out, out / "metrics.jsonl")
        info.update(examples=len(dataset), **counts, **train_and_save(trainer, out))
    return out
