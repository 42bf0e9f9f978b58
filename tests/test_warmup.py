import json

import pytest
import torch
from conftest import ANSWERS, QUESTIONS
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from soda_distill.config import load_config
from soda_distill.errors import SodaError
from soda_distill.manifest import RunDir
from soda_distill.models import load_model, load_tokenizer
from soda_distill.records import read_metrics
from soda_distill.stages import warmup
from soda_distill.stages.teacher import run_teacher


def warmup_config(qa_file, tiny_model_dir, *extra):
    return load_config(None, [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "warmup.learning_rate=3e-3",
                              "warmup.batch_size=4", "warmup.epochs=6", "warmup.warmup_ratio=0", "warmup.max_length=128", *extra])


def test_loss_mask_covers_exactly_the_assistant_tokens(tmp_path, qa_file, tiny_model_dir):
    cfg = warmup_config(qa_file, tiny_model_dir)
    run = RunDir(tmp_path / "run")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    trainer = warmup.build_sft_trainer(load_model(str(tiny_model_dir)), tokenizer, warmup.sft_dataset(run_teacher(cfg, run), tokenizer)[0],
                                       cfg, run.file("warmup"), run.file("warmup") / "metrics.jsonl")
    assert trainer.model._soda_cpu_lm_head  # trains through lm_head.py, which scores exactly these labels
    for i in range(3):
        batch = trainer.data_collator([trainer.train_dataset[i]])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        prompt = [{"role": "user", "content": QUESTIONS[i]}]
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        answer_ids = tokenizer(ANSWERS[i] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert ids == prompt_ids + answer_ids
        trained = [t for t, lab in zip(ids, labels) if lab != -100]
        assert trained == answer_ids  # the answer and its end-of-turn, nothing of the prompt or the system turn
        assert all(lab == -100 for lab in labels[: len(prompt_ids)])


def test_warmup_trains_saves_and_loss_drops(tmp_path, qa_file, tiny_model_dir):
    cfg = warmup_config(qa_file, tiny_model_dir)
    run = RunDir(tmp_path / "run")
    run_teacher(cfg, run)
    out = warmup.run_warmup(cfg, run)
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    losses = [m["loss"] for m in steps]
    assert len(losses) == 18
    assert all(m["grad_norm"] > 0 for m in steps)  # bf16 weights: the trainer clips the masters' gradients
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()))
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert not (out / "checkpoints").exists()
    info = run.manifest()["stages"]["warmup"]
    assert info["steps"] == 18 and info["examples"] == 12 and info["peak_rss_mb"] > 0


def test_bf16_warmup_saves_its_fp32_masters(tmp_path, qa_file, tiny_model_dir):
    """With bf16 weights and fp32 masters, the saved model is the masters: updates far below bf16's resolution at
    these weights survive the hand-off to DPO instead of rounding away."""
    from safetensors.torch import load_file

    cfg = warmup_config(qa_file, tiny_model_dir, "student.bf16=true", "warmup.learning_rate=1e-5", "warmup.epochs=1")
    run = RunDir(tmp_path / "run")
    run_teacher(cfg, run)
    saved = load_file(warmup.run_warmup(cfg, run) / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert {w.dtype for w in saved.values()} == {torch.float32}
    moved = [(saved[k] - start[k]).abs() for k in start if k in saved and start[k].dim() == 2]
    assert max(float(d.max()) for d in moved) < 1e-3  # sub-ulp steps: bf16's spacing here is ~1e-4
    changed = sum(int((d > 0).sum()) for d in moved) / sum(d.numel() for d in moved)
    assert changed > 0.5, changed  # the masters moved nearly every weight; bf16 weights alone would keep ~none


def test_a_cut_teacher_answer_is_trained_without_an_end_of_turn(tmp_path, tiny_model_dir):
    from conftest import write_jsonl

    from soda_distill.chat_tokens import end_of_turn

    teacher = write_jsonl(tmp_path / "t.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A full answer."}]},
        {"id": "b", "messages": [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "An answer that was"}],
         "finish_reason": "length"}])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    suffix = list(end_of_turn(tokenizer))
    data, counts = warmup.sft_dataset(teacher, tokenizer)
    assert counts == {"truncated_kept_open": 1, "dropped_truncated": 0}
    full, cut = data
    assert full["input_ids"][-len(suffix):] == suffix and cut["input_ids"][-len(suffix):] != suffix
    assert tokenizer.decode([t for t, m in zip(cut["input_ids"], cut["completion_mask"]) if m]) == "An answer that was"
    data, counts = warmup.sft_dataset(teacher, tokenizer, "drop")
    assert len(data) == 1 and counts["dropped_truncated"] == 1
    # nothing left to train on is one line naming the file and the key, not an error inside TRL
    only_cut = write_jsonl(tmp_path / "cut.jsonl", [{**json.loads(teacher.read_text().splitlines()[1]), "id": "c"}])
    cfg = load_config(None, [f"teacher.file={only_cut}", f"student.model={tiny_model_dir}", "seqkd.truncated=drop"])
    with pytest.raises(SodaError, match=f"{only_cut}: no teacher answer to train on .* seqkd.truncated is drop"):
        warmup.student_and_answers(cfg, only_cut, cfg.seqkd)


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt  # what a kill between checkpoints looks like to the next run


def test_warmup_resumes_from_its_last_checkpoint(tmp_path, qa_file, tiny_model_dir, monkeypatch):
    cfg = warmup_config(qa_file, tiny_model_dir, "warmup.save_steps=4")
    run = RunDir(tmp_path / "run")
    run_teacher(cfg, run)
    build = warmup.build_sft_trainer

    def crashing(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(Crash())
        return trainer

    monkeypatch.setattr(warmup, "build_sft_trainer", crashing)
    with pytest.raises(KeyboardInterrupt):
        warmup.run_warmup(cfg, run)
    assert "warmup" not in run.manifest()["stages"]
    monkeypatch.setattr(warmup, "build_sft_trainer", build)
    warmup.run_warmup(cfg, run)
    info = run.manifest()["stages"]["warmup"]
    assert info["resumed_from_step"] == 4 and info["steps"] == 18
    steps = [m["step"] for m in read_metrics(run.file("warmup") / "metrics.jsonl") if "loss" in m]
    assert steps == list(range(1, 19))  # steps 5.. of the crashed attempt were replaced, not duplicated


def test_seqkd_keeps_the_step_of_least_heldout_loss(tmp_path, tiny_model_dir):
    """Training answers that are all one phrase: the held-out loss (on other answers) falls, then rises as the model
    learns nothing but that phrase; SeqKD stops there and keeps the best step's model."""
    from conftest import write_jsonl

    from soda_distill.stages import seqkd

    held = seqkd.heldout_indices(12, 0.25, 42)
    teacher = write_jsonl(tmp_path / "t.jsonl", [
        {"id": f"q{i}", "messages": [{"role": "user", "content": q},
                                     {"role": "assistant", "content": a if i in held else "Yes indeed, " * 8}]}
        for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))])
    # bf16 on: the best step's fp32 masters are what is saved (train_and_save), not its bf16 weights
    cfg = load_config(None, [f"teacher.file={teacher}", f"student.model={tiny_model_dir}", "student.bf16=true",
                             "seqkd.learning_rate=3e-2",
                             "seqkd.batch_size=3", "seqkd.epochs=10", "seqkd.heldout=0.25", "seqkd.evals_per_epoch=1",
                             "seqkd.patience=2", "seqkd.warmup_ratio=0", "seqkd.lr_scheduler=constant", "seqkd.max_length=128"])
    run = RunDir(tmp_path / "run")
    run_teacher(cfg, run)
    out = seqkd.run_seqkd(cfg, run)
    info = run.manifest()["stages"]["seqkd"]
    curve = info["heldout_loss"]
    best = min(curve, key=lambda m: m["loss"])
    assert info["examples"] == 9 and info["heldout"] == 3 and info["eval_every_steps"] == 3
    assert [m["step"] for m in curve] == list(range(3, 3 * len(curve) + 1, 3))
    assert len(curve) < 10 and curve[-1]["loss"] > best["loss"]  # stopped early, once the held-out loss rose
    assert info["best_step"] == best["step"] and info["best_eval_loss"] == pytest.approx(best["loss"], abs=1e-4)
    assert not (out / "checkpoints").exists()
    # the saved model is the best one: its held-out loss is the best measurement's, not the last one's
    tokenizer = load_tokenizer(str(out))
    _, heldout = seqkd.heldout_split(warmup.sft_dataset(run.output("teacher"), tokenizer)[0], 0.25, cfg.seqkd.seed)
    trainer = warmup.build_sft_trainer(load_model(str(out)), tokenizer, heldout, cfg, tmp_path / "check",
                                       tmp_path / "check.jsonl", section=cfg.seqkd, eval_dataset=heldout,
                                       per_device_eval_batch_size=3)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(best["loss"], rel=0.01)
