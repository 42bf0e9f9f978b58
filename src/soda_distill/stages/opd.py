"""Open-teacher (white-box) distillation, `--method opd`: on-policy distillation from a teacher model loaded here.

When the teacher is an open model, its whole next-token distribution is there to learn from, not one answer per
prompt. TRL's DistillationTrainer samples answers from the student (on-policy, as GKD and "on-policy distillation"
do) and trains it on the generalized Jensen–Shannon divergence to the teacher at every token of them: `opd.beta`
0 is forward KL, 1 reverse KL (TRL's default, the on-policy distillation recipe), 0.5 the JSD. It starts from q_w,
as SODA does, on the teacher stage's prompts (their answers are not used), and writes `opd/` like any training stage.

The loss compares the two models token by token, so the teacher must share the student's vocabulary: a teacher
whose tokenizer or output layer differs is refused before anything loads on the trainer.
"""

from __future__ import annotations

from pathlib import Path

from trl import DistillationConfig, DistillationTrainer

from ..config import Config, fingerprint
from ..errors import SodaError
from ..generation import prompt_tokens
from ..manifest import RunDir, combine
from ..models import load_model, load_tokenizer, model_digest, resolve_model, use_bf16
from ..records import read_examples, read_metrics, sha256_file
from ..training import MetricsLog, ResumableOrder, peft_config, train_and_save, trainer_arguments


class OpdTrainer(ResumableOrder, DistillationTrainer):
    """TRL's DistillationTrainer with a training order that a resumed run repeats."""


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
    return OpdTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[MetricsLog(output_dir / "metrics.jsonl")], peft_config=peft_config(cfg.student.lora))


def run_opd(cfg: Config, run: RunDir) -> Path:
    """On-policy distillation from `opd.teacher_model`, starting at this run's q_w."""
    o = cfg.opd
    if not o.teacher_model:
        raise SodaError("opd.teacher_model is not set: the folder of an open teacher model sharing the student's "
                        "tokenizer (a Hugging Face model folder with safetensors weights)")
    teacher_path, start, out = run.output("teacher"), run.output("warmup"), run.output("opd")
    teacher_dir = resolve_model(o.teacher_model)
    if not Path(teacher_dir).is_dir():
        raise SodaError(f"opd.teacher_model {o.teacher_model}: not a model folder here (nothing is downloaded)")
    fp = combine(fingerprint(o), sha256_file(teacher_path), model_digest(start), model_digest(teacher_dir),
                 *([fingerprint(cfg.student.lora)] if cfg.student.lora else []))
    if run.done("opd", fp):
        return out
    with run.stage("opd", fp) as info:
        trust, bf16 = cfg.student.trust_remote_code, use_bf16(cfg.student.bf16)
        tokenizer = load_tokenizer(str(start), trust)
        teacher_tokenizer = load_tokenizer(teacher_dir, o.trust_remote_code)
        student = load_model(str(start), trust_remote_code=trust, quantize=cfg.student.quantize, bf16=bf16)
        teacher = load_model(teacher_dir, trust_remote_code=o.trust_remote_code)
        same_vocabulary(tokenizer, teacher_tokenizer, student, teacher, o.teacher_model)
        teacher.requires_grad_(False)
        dataset, dropped = opd_dataset(teacher_path, tokenizer, o.max_length - o.max_new_tokens)
        trainer = build_opd_trainer(student, teacher, tokenizer, dataset, cfg, out)
        info.update(prompts=len(dataset), dropped_long_prompts=dropped, teacher_model=o.teacher_model,
                    **train_and_save(trainer, out))
        steps = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
        if steps:
            info["loss"] = {"first": steps[0]["loss"], "last": steps[-1]["loss"]}
    return out
