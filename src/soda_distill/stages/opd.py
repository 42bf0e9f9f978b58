"""Open-teacher (white-box) distillation, `--method opd`: on-policy distillation from a teacher model loaded here.

When the teacher is an open model, its whole next-token distribution is there to learn from, not one answer per
prompt. TRL's DistillationTrainer samples answers from the student (on-policy, as GKD and "on-policy distillation"
do) and trains it on the generalized Jensen–Shannon divergence to the teacher at every token of them: `opd.beta`
0 is forward KL, 1 reverse KL (TRL's default, the on-policy distillation recipe), 0.5 the JSD. It starts from q_w,
as SODA does, on the teacher stage's prompts (their answers are not used), and writes `opd/` like any training stage.

The loss compares the two models token by token, so the teacher must share the student's vocabulary: a teacher
whose tokenizer or output layer differs is refused before anything loads on the trainer. With both distributions at
hand, each logging step also records how far they agree on a shared top-k token set (token_overlap.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from trl import DistillationConfig, DistillationTrainer

from ..config import Config
from ..errors import SodaError
from ..generation import prompt_tokens
from ..keys import KeyParts
from ..manifest import RunDir, StageResult
from ..models import load_model, load_tokenizer, resolve_model, transformers_model, use_bf16
from ..pipeline import execute
from ..records import read_examples, read_metrics
from ..token_overlap import overlap_stats, sampled_states, state_logits
from ..training import (MetricsLog, ResumableOrder, StepLog, TrainResult, ends, peft_config, train_and_save,
                        trainer_arguments)


@dataclass
class OpdResult(StageResult):
    prompts: int
    dropped_long_prompts: int
    teacher_model: str  # opd.teacher_model, as set
    teacher_dtype: str
    training: TrainResult
    loss: dict | None = None  # {first, last} logged step
    overlap_ratio: dict | None = None  # the token-overlap diagnostics (token_overlap.py), where logged
    overlap_teacher_mass_shared: dict | None = None


def _teacher(cfg: Config) -> tuple[str, bool]:
    """The teacher model's folder, and whether it is loaded in bf16 (by default as the student is: the teacher is
    usually the larger model)."""
    o = cfg.opd
    if not o.teacher_model:
        raise SodaError("opd.teacher_model is not set: the folder of an open teacher model sharing the student's "
                        "tokenizer (a Hugging Face model folder with safetensors weights)")
    teacher_dir = resolve_model(o.teacher_model)
    if not Path(teacher_dir).is_dir():
        raise SodaError(f"opd.teacher_model {o.teacher_model}: not a model folder here (nothing is downloaded)")
    return teacher_dir, use_bf16(cfg.student.bf16) if o.teacher_bf16 is None else o.teacher_bf16


def opd_key(cfg: Config) -> KeyParts:
    """The teacher model (its digest), the LoRA settings where set, and the teacher's bf16: a stage begun with an
    fp32 teacher stays so."""
    teacher_dir, teacher_bf16 = _teacher(cfg)
    return KeyParts([Path(teacher_dir), cfg.student.lora, "teacher in bf16" if teacher_bf16 else None])


class OpdTrainer(StepLog, ResumableOrder, DistillationTrainer):
    """TRL's DistillationTrainer with a training order that a resumed run repeats, logging the token-overlap
    diagnostics (token_overlap.py) of `overlap_states` sampled states at each logging step."""

    overlap_k, overlap_states, overlap_step = 0, 0, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step  # the same for every micro-batch of a step: measured at the first of them
        if self.overlap_k and model.training and step % self.args.logging_steps == 0 and step != self.overlap_step:
            self.overlap_step = step
            for key, value in self.token_overlap(inputs).items():
                self.record(key, value)
        return result

    @torch.no_grad()
    def token_overlap(self, inputs) -> dict[str, float]:
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        generator = torch.Generator().manual_seed(self.args.seed + self.state.global_step)
        states = sampled_states(inputs["completion_mask"].cpu(), inputs["prompt_ids"].size(1), self.overlap_states,
                                generator).to(input_ids.device)
        models = [transformers_model(self.accelerator.unwrap_model(m)) for m in (self.model, self.teacher_model)]
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            student, teacher = (state_logits(m, input_ids, attention_mask, states) for m in models)
        return overlap_stats(student, teacher, self.overlap_k)


def same_vocabulary(student_tokenizer, teacher_tokenizer, student, teacher, teacher_path: str) -> None:
    """Refuse a teacher whose tokens are not the student's: token-level divergences need one vocabulary."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[0]
        raise SodaError(f"opd.teacher_model {teacher_path}: its tokenizer is not the student's ({len(t_vocab)} tokens "
                        f"against {len(s_vocab)}; first difference: token {differing[0]!r}): token-level distillation "
                        "needs one vocabulary. With another tokenizer, distill from the teacher's answers (SODA, SeqKD)")
    s_out, t_out = (m.get_output_embeddings().weight.shape[0] for m in (student, teacher))
    if s_out != t_out:
        raise SodaError(f"opd.teacher_model {teacher_path}: its output layer has {t_out} rows and the student's "
                        f"{s_out}: token-level distillation needs the same output vocabulary")


def opd_dataset(teacher_path: Path, tokenizer, max_prompt_tokens: int):
    """The teacher stage's prompts as TRL's conversational `prompt` column; a prompt with no room left for an
    answer is left out. Returns the data set and how many were left out."""
    from datasets import Dataset

    prompts = [ex.prompt for ex in read_examples(teacher_path)]
    kept = [p for p, n in zip(prompts, prompt_tokens(tokenizer, prompts)) if n <= max_prompt_tokens]
    if not kept:
        raise SodaError(f"{teacher_path}: no prompt fits opd.max_length − opd.max_new_tokens ({max_prompt_tokens} tokens)")
    return Dataset.from_list([{"prompt": p} for p in kept]), len(prompts) - len(kept)


def build_opd_trainer(student, teacher, tokenizer, dataset, cfg: Config, output_dir: Path):
    o = cfg.opd
    common = trainer_arguments(o, output_dir / "checkpoints", cfg)
    for key in ("max_length", "train_sampling_strategy"):  # answers are bounded by max_completion_length; TRL samples
        del common[key]
    args = DistillationConfig(**common, beta=o.beta, temperature=o.temperature, max_completion_length=o.max_new_tokens)
    trainer = OpdTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[MetricsLog(output_dir / "metrics.jsonl")],
                         peft_config=peft_config(cfg.student.lora))
    trainer.overlap_k, trainer.overlap_states = o.overlap_k, o.overlap_states
    return trainer


def opd_body(cfg: Config, run: RunDir, inputs: dict[str, Path]) -> OpdResult:
    """On-policy distillation from `opd.teacher_model`, starting at this run's q_w, saved in `opd/`."""
    o = cfg.opd
    teacher_path, start, out = inputs["teacher"], inputs["warmup"], run.output("opd")
    teacher_dir, teacher_bf16 = _teacher(cfg)
    trust = cfg.student.trust_remote_code
    tokenizer = load_tokenizer(str(start), trust)
    teacher_tokenizer = load_tokenizer(teacher_dir, o.trust_remote_code)
    student = load_model(str(start), trust_remote_code=trust, quantize=cfg.student.quantize,
                         bf16=use_bf16(cfg.student.bf16))
    teacher = load_model(teacher_dir, torch.bfloat16 if teacher_bf16 else torch.float32, o.trust_remote_code)
    same_vocabulary(tokenizer, teacher_tokenizer, student, teacher, o.teacher_model)
    teacher.requires_grad_(False)
    dataset, dropped = opd_dataset(teacher_path, tokenizer, o.max_length - o.max_new_tokens)
    trainer = build_opd_trainer(student, teacher, tokenizer, dataset, cfg, out)
    training = train_and_save(trainer, out)
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    logged = lambda key: ends(steps, key) if steps and key in steps[0] else None
    return OpdResult(prompts=len(dataset), dropped_long_prompts=dropped, teacher_model=o.teacher_model,
                     teacher_dtype=str(teacher.dtype).removeprefix("torch."), training=training, loss=logged("loss"),
                     overlap_ratio=logged("overlap/ratio"),
                     overlap_teacher_mass_shared=logged("overlap/teacher_mass_shared"))


def run_opd(cfg: Config, run: RunDir) -> Path:
    """The opd stage (pipeline.execute): its model, unless finished."""
    return execute("opd", cfg, run)
