"""--method opd: on-policy distillation from an open teacher (TRL's DistillationTrainer), here the embedded
SmolLM2-135M teaching a random two-layer Llama that shares its tokenizer."""

import pytest
import torch

from soda_distill.config import load_config
from soda_distill.errors import SodaError
from soda_distill.manifest import RunDir
from soda_distill.models import load_model, load_tokenizer
from soda_distill.pipeline import run_methods
from soda_distill.records import read_metrics


def reverse_kl(student, teacher, ids: torch.Tensor) -> float:
    """KL(student ‖ teacher) per token on fixed token sequences."""
    with torch.no_grad():
        s, t = (m(ids).logits.float().log_softmax(-1) for m in (student, teacher))
    return (s.exp() * (s - t)).sum(-1).mean().item()


def test_opd_brings_the_student_to_the_teacher(tmp_path, qa_file, tiny_model_dir, embedded_path):
    cfg = load_config(None, [
        f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "student.bf16=false", "warmup.epochs=0.2",
        "opd.teacher_model=embedded", "opd.learning_rate=5e-3", "opd.batch_size=4", "opd.epochs=5",
        "opd.max_new_tokens=16", "opd.max_length=128", "opd.warmup_ratio=0", "opd.lr_scheduler=constant",
    ])
    run = RunDir(tmp_path / "run")
    out = run_methods(cfg, run, ["opd"])["opd"]
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert len(steps) >= 8
    first, last = (sum(m["loss"] for m in part) / len(part) for part in (steps[:3], steps[-3:]))
    assert last < 0.85 * first, (first, last)
    # on text neither trained on, the student's divergence from the teacher fell
    tokenizer = load_tokenizer(embedded_path)
    ids = tokenizer(["The capital of France is Paris, and it lies on the Seine.", "Water boils at 100 degrees."],
                    return_tensors="pt", padding=True)["input_ids"]
    teacher = load_model(embedded_path)
    assert reverse_kl(load_model(str(out)), teacher, ids) < reverse_kl(load_model(str(run.output("warmup"))), teacher, ids)
    # the shared top-k diagnostics, every step: the student's top tokens come to be the teacher's
    overlap = [m["overlap/ratio"] for m in steps]
    assert all(0 <= r <= 1 for r in overlap) and sum(overlap[-3:]) > sum(overlap[:3]), overlap
    info = run.manifest()["stages"]["opd"]
    assert info["overlap_ratio"]["last"] == overlap[-1]
    assert info["prompts"] == len(qa_file.read_text().splitlines()) and info["teacher_model"] == "embedded"


def test_opd_refuses_a_teacher_with_another_tokenizer(tmp_path, qa_file, tiny_model_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<not-the-students>"])
    other = tmp_path / "other-teacher"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    cfg = load_config(None, [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "student.bf16=false",
                             "warmup.epochs=0.2", f"opd.teacher_model={other}"])
    with pytest.raises(SodaError, match=r"its tokenizer is not the student's .*token '<not-the-students>'"):
        run_methods(cfg, RunDir(tmp_path / "run"), ["opd"])


def test_opd_teacher_in_bf16(tmp_path, qa_file, tiny_model_dir):
    """`opd.teacher_bf16`: the teacher's weights in bf16 (half its memory) beside an fp32 student that trains on its distribution."""
    cfg = load_config(None, [
        f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "student.bf16=false", "warmup.epochs=0.2",
        f"opd.teacher_model={tiny_model_dir}", "opd.teacher_bf16=true", "opd.batch_size=4", "opd.epochs=1",
        "opd.max_new_tokens=8", "opd.max_length=128", "opd.learning_rate=1e-3",
    ])
    run = RunDir(tmp_path / "run")
    out = run_methods(cfg, run, ["opd"])["opd"]
    info = run.manifest()["stages"]["opd"]
    assert info["teacher_dtype"] == "bfloat16"
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert steps and all(torch.isfinite(torch.tensor(m["loss"])) and m["loss"] > 0 for m in steps)
    assert next(load_model(str(out)).parameters()).dtype == torch.float32
