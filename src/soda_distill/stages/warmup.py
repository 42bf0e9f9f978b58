"""Stage 4 — warmup: SFT of q0 on the teacher responses, loss on assistant tokens only → q_w.

Run for `warmup.epochs` (by default 3, SeqKD's cap), it is SODA's starting point; run to its best held-out loss, it is
the SeqKD baseline (seqkd.py).
The teacher's answers are tokenized as TRL tokenizes a conversational prompt-completion example (chat_tokens.py): the
prompt masked, the answer and its end of turn trained — except that an answer cut at its token limit gets no end of
turn (`warmup.truncated`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trl import SFTConfig, SFTTrainer

from ..chat_tokens import chat_ids
from ..config import Config, WarmupConfig
from ..errors import SodaError
from ..manifest import RunDir, StageResult
from ..models import load_model, load_tokenizer, resolve_model, use_bf16
from ..pipeline import execute
from ..records import read_examples, read_jsonl
from ..teacher_logprobs import TeacherKLTrainer, TeacherTargetsCollator, teacher_targets, vocabulary_by_text
from ..cpu import apply_cpu_settings
from ..training import MetricsLog, ResumableOrder, StepLog, TrainResult, peft_config, train_and_save, trainer_arguments


@dataclass
class WarmupResult(StageResult):
    examples: int
    truncated_kept_open: int  # answers cut at their limit, trained without an end of turn (sft_dataset's counts)
    dropped_truncated: int
    training: TrainResult
    teacher_kl_unaligned: int | None = None  # with a grey-box teacher: answers without its targets


def sft_dataset(teacher_path: Path, tokenizer, truncated: str = "open", kl_max_length: int | None = None):
    """The teacher's answers tokenized as TRL's SFT tokenizes a prompt-completion conversation, the loss on the
    answer (`completion_mask`); an answer cut at its token limit without its end of turn, or dropped (`truncated`).
    `kl_max_length`: each row also gets the teacher's top-k targets of its answer's tokens (teacher_logprobs.py),
    empty where the teacher scored none or its tokens are not the student's. Returns the data set and the counts of
    cut answers kept open and dropped (and of answers without targets)."""
    from datasets import Dataset

    rows, counts = [], {"truncated_kept_open": 0, "dropped_truncated": 0}
    if kl_max_length:
        scored = {record.get("id"): record.get("logprobs") for _, record in read_jsonl(teacher_path)}
        vocabulary, counts["teacher_kl_unaligned"] = vocabulary_by_text(tokenizer), 0
    for ex in read_examples(teacher_path, want_response=True):
        if not ex.response.strip():
            continue
        if ex.truncated and truncated == "drop":
            counts["dropped_truncated"] += 1
            continue
        counts["truncated_kept_open"] += ex.truncated
        prompt_ids, answer_ids = chat_ids(tokenizer, ex.prompt, ex.response, open_end=ex.truncated)
        rows.append({"input_ids": prompt_ids + answer_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(answer_ids)})
        if kl_max_length:
            targets = scored.get(ex.id) and teacher_targets(tokenizer, vocabulary, len(prompt_ids), answer_ids,
                                                            scored[ex.id], kl_max_length)
            counts["teacher_kl_unaligned"] += not targets
            rows[-1].update(targets or {"kl_positions": [], "kl_ids": [], "kl_logprobs": []})
    if kl_max_length and rows and counts["teacher_kl_unaligned"] == len(rows):
        raise SodaError(f"{teacher_path}: teacher_kl is set, but no answer has log-probabilities whose tokens are the "
                        f"student's (teacher.top_logprobs unset, or another tokenizer): set teacher_kl to 0 or "
                        f"collect the answers with teacher.top_logprobs")
    return Dataset.from_list(rows), counts


class ResumableSFTTrainer(StepLog, ResumableOrder, TeacherKLTrainer, SFTTrainer):
    """TRL's SFTTrainer, with a training order a resumed run repeats (and a grey-box teacher's top-k term)."""


def build_sft_trainer(model, tokenizer, dataset, cfg: Config, output_dir: Path, metrics_path: Path,
                      section: WarmupConfig | None = None, eval_dataset=None, callbacks=(), **arguments):
    """TRL's SFTTrainer on `dataset` with the settings of `section` (default: cfg.warmup); `arguments` add to or
    replace SFTConfig's."""
    section = section or cfg.warmup
    targets = "kl_positions" in dataset.column_names
    args = SFTConfig(**{
        **trainer_arguments(section, output_dir / "checkpoints", cfg),
        "completion_only_loss": True,
        "packing": False,
        **({"remove_unused_columns": False} if targets else {}),  # the teacher's targets reach the collator
        **arguments,
    })
    trainer = apply_cpu_settings(ResumableSFTTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
        callbacks=[MetricsLog(metrics_path), *callbacks], peft_config=peft_config(cfg.student.lora),
    ))
    if targets:
        trainer.data_collator, trainer.teacher_kl = TeacherTargetsCollator(trainer.data_collator), section.teacher_kl
    return trainer


def student_and_answers(cfg: Config, teacher_path: Path, section: WarmupConfig):
    """The untouched student q0, its tokenizer, and the teacher's answers as `sft_dataset` makes them for `section`
    (with its counts)."""
    model_path = resolve_model(cfg.student.model, cfg.student.gguf_file)
    tokenizer = load_tokenizer(model_path, cfg.student.trust_remote_code)
    model = load_model(model_path, trust_remote_code=cfg.student.trust_remote_code, quantize=cfg.student.quantize,
                       bf16=use_bf16(cfg.student.bf16))
    kl_max_length = section.max_length if section.teacher_kl else None
    dataset, counts = sft_dataset(teacher_path, tokenizer, section.truncated, kl_max_length)
    if not len(dataset):
        raise SodaError(f"{teacher_path}: no teacher answer to train on (every one empty, or cut and "
                        f"{section.section}.truncated is drop)")
    return model, tokenizer, dataset, counts


def warmup_body(cfg: Config, run: RunDir, inputs: dict[str, Path]) -> WarmupResult:
    """Train q_w and save it in `warmup/`."""
    out = run.output("warmup")
    model, tokenizer, dataset, counts = student_and_answers(cfg, inputs["teacher"], cfg.warmup)
    trainer = build_sft_trainer(model, tokenizer, dataset, cfg, out, out / "metrics.jsonl")
    return WarmupResult(examples=len(dataset), **counts, training=train_and_save(trainer, out))


def run_warmup(cfg: Config, run: RunDir) -> Path:
    """The warmup stage (pipeline.execute): q_w, unless finished."""
    return execute("warmup", cfg, run)
