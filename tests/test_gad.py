import math
import shutil
import sys

import pytest
import torch
from conftest import QA, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback, set_seed

from soda_distill.config import load_config
from soda_distill.errors import SodaError
from soda_distill.manifest import RunDir
from soda_distill.models import load_tokenizer
from soda_distill.pipeline import run_methods, run_stage
from soda_distill.records import read_metrics
from soda_distill.registry import METHODS, STAGES
from soda_distill.stages import gad

run_gad = lambda cfg, run: run_methods(cfg, run, ["gad"])["gad"]

# 12 prompts, 2 a step (4 rollouts, 2 per prompt): 6 steps an epoch
STEP = 1 / 6 - 0.01


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("gad-data") / "qa.jsonl", QA)


def gad_overrides(qa, tiny_model_dir, *extra) -> list[str]:
    return [
        f"teacher.file={qa}", f"student.model={tiny_model_dir}", "student.bf16=false", "snapshot.max_new_tokens=12",
        "pairs.truncated_rejected=open",
        "snapshot.temperature=1.0", "warmup.max_length=128", "warmup.batch_size=12",
        "gad.num_generations=2", "gad.batch_size=4", "gad.gradient_accumulation_steps=1", "gad.max_new_tokens=8",
        "gad.max_length=128", "gad.gradient_checkpointing=false", "gad.discriminator.batch_size=2",
        "gad.learning_rate=1e-4", "gad.discriminator.learning_rate=1e-4", "gad.discriminator.only_steps=0",
        f"gad.discriminator.warmup_epochs={STEP}", f"gad.epochs={STEP}", *extra,
    ]


def gad_config(qa, tiny_model_dir, *extra):
    return load_config(None, gad_overrides(qa, tiny_model_dir, *extra))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, qa, tiny_model_dir) -> RunDir:
    """A run directory whose stages before GAD (teacher, snapshot, pairs, warmup) are done, to copy per test."""
    run = RunDir(tmp_path_factory.mktemp("gad-prepared") / "run")
    for stage in ("teacher", "snapshot", "pairs", "warmup"):
        run_stage(stage, gad_config(qa, tiny_model_dir), run)
    return run


@pytest.fixture
def run(tmp_path, prepared) -> RunDir:
    return RunDir(shutil.copytree(prepared.path, tmp_path / "run"))  # copy2 keeps the mtimes model digests read


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def changed(before, after) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(before, after, strict=True))


def test_discriminator_scores_at_the_last_real_token(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case transformers' own pooling gets wrong
    torch.manual_seed(0)
    model = gad.load_discriminator(str(tiny_model_dir), tokenizer).eval()
    prompt = gad.prompt_ids(tokenizer, [{"role": "user", "content": "Name a planet."}])
    sequences = [prompt + gad.response_ids(tokenizer, "Mars.", 16), prompt + gad.response_ids(tokenizer, "It is Venus.", 3)]
    assert sequences[0][-1] == tokenizer.eos_token_id and sequences[1][-1] != tokenizer.eos_token_id  # 2nd was cut
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in sequences], batch_first=True,
                                          padding_value=tokenizer.pad_token_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in sequences], batch_first=True)
    with torch.no_grad():
        ours = gad.discriminator_scores(model, ids, mask)
        alone = [model.score(model.base_model(torch.tensor([s])).last_hidden_state[0, -1]).item() for s in sequences]
        theirs = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert ours.tolist() == pytest.approx(alone, abs=1e-5)  # each sequence's own last token, padding or not
    assert theirs[1].item() == pytest.approx(alone[1], abs=1e-5)  # agrees where the sequence does not end in pad ...
    assert abs(theirs[0].item() - alone[0]) > 1e-4  # ... and reads one token early where it does


def pair_accuracy(model, dataset) -> float:
    """How often the discriminator scores the teacher's response above q0's, over all pairs."""
    wins = 0
    with torch.no_grad():
        for row in dataset:
            scores = [gad.discriminator_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
                      for ids in (row["chosen_ids"], row["rejected_ids"])]
            wins += int(scores[0] > scores[1])
    return wins / len(dataset)


def test_discriminator_warmup_learns_to_rank_teacher_above_student(run, qa, tiny_model_dir):
    cfg = gad_config(qa, tiny_model_dir, "gad.discriminator.warmup_epochs=3")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    dataset, _ = gad.bradley_terry_dataset(run.file("pairs.jsonl"), tokenizer, cfg.gad)
    set_seed(cfg.gad.seed)  # the head the warmup starts from
    before = pair_accuracy(gad.load_discriminator(str(tiny_model_dir), tokenizer).eval(), dataset)
    out = gad.run_discriminator_warmup(cfg, run)
    after = pair_accuracy(AutoModelForSequenceClassification.from_pretrained(out).eval(), dataset)
    assert before <= 0.5 and after == 1.0
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "accuracy" in m]
    assert len(steps) == 18
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    assert mean(steps[-6:], "accuracy") > mean(steps[:6], "accuracy")
    assert mean(steps[-6:], "loss") < 0.7 * mean(steps[:6], "loss")
    info = run.manifest()["stages"]["gad_warmup"]
    assert info["steps"] == 18 and info["pairs"] == 12 and info["peak_rss_mb"] > 0


@pytest.mark.parametrize("bf16", ["false", "true"])  # true: both networks in bf16 with fp32 master weights
def test_one_adversarial_step_trains_both_networks(run, qa, tiny_model_dir, bf16, tmp_path):
    cfg = gad_config(qa, tiny_model_dir, f"student.bf16={bf16}")
    if bf16 == "true":  # the prepared run's snapshot was generated in fp32: this one starts from nothing
        run = RunDir(tmp_path / "bf16")
    generator = run_gad(cfg, run)
    start, d_start = run.file("warmup"), run.file("gad") / "discriminator_warmup"
    assert changed(params(AutoModelForCausalLM.from_pretrained(start)), params(AutoModelForCausalLM.from_pretrained(generator)))
    d_after = AutoModelForSequenceClassification.from_pretrained(run.file("gad") / "discriminator")
    assert changed(params(AutoModelForSequenceClassification.from_pretrained(d_start)), params(d_after))
    [step] = read_metrics(run.file("gad") / "metrics.jsonl")[:-1]  # the last line is the run's summary
    assert step["step"] == 1 and step["kl"] == 0.0  # the generator's first step starts at the reference
    assert step["grad_norm"] > 0  # in bf16, the masters' gradients: the bf16 weights hold none
    assert math.isfinite(step["reward"])  # the discriminator's raw score of the generator's rollouts
    assert step["discriminator/loss"] > 0 and 0 <= step["discriminator/accuracy"] <= 1
    # where the step's time went: its rollouts and the discriminator within the whole of its micro-steps
    assert 0 < step["time/rollouts_s"] and 0 < step["time/discriminator_s"]
    assert step["time/rollouts_s"] + step["time/discriminator_s"] < step["time/step_s"]
    info = run.manifest()["stages"]
    assert {"teacher", "snapshot", "pairs", "warmup", "gad_warmup", "gad"} <= set(info)
    assert info["gad"]["steps"] == 1 and info["gad"]["discriminator_updates"] == 1 and info["gad"]["prompts"] == 12


def test_discriminator_trains_alone_for_the_first_steps(run, qa, tiny_model_dir):
    cfg = gad_config(qa, tiny_model_dir, "gad.discriminator.only_steps=1")
    generator = run_gad(cfg, run)
    assert not changed(params(AutoModelForCausalLM.from_pretrained(run.file("warmup"))),
                       params(AutoModelForCausalLM.from_pretrained(generator)))
    assert changed(params(AutoModelForSequenceClassification.from_pretrained(run.file("gad") / "discriminator_warmup")),
                   params(AutoModelForSequenceClassification.from_pretrained(run.file("gad") / "discriminator")))
    [step] = read_metrics(run.file("gad") / "metrics.jsonl")[:-1]
    assert "discriminator/accuracy" in step and "kl" not in step  # rollouts scored, no generator loss computed


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt  # what a kill between checkpoints looks like to the next run


def test_gad_resumes_both_networks_from_the_last_checkpoint(run, qa, tiny_model_dir, monkeypatch):
    cfg = gad_config(qa, tiny_model_dir, f"gad.epochs={3 * STEP}", "gad.save_steps=1")
    build = gad.build_gad_trainer

    def crashing(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(Crash())
        return trainer

    monkeypatch.setattr(gad, "build_gad_trainer", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_gad(cfg, run)
    assert "gad" not in run.manifest()["stages"] and "gad_warmup" in run.manifest()["stages"]
    assert (run.file("gad") / "checkpoints" / "checkpoint-1" / gad.DISCRIMINATOR_STATE).exists()
    monkeypatch.setattr(gad, "build_gad_trainer", build)
    run_gad(cfg, run)
    info = run.manifest()["stages"]["gad"]
    assert info["resumed_from_step"] == 1 and info["steps"] == 3
    assert info["discriminator_updates"] == 3  # 1 restored from the checkpoint + 2 after it
    steps = [m["step"] for m in read_metrics(run.file("gad") / "metrics.jsonl") if "reward" in m]
    assert steps == [1, 2, 3]  # step 2 of the crashed attempt was replaced, not duplicated
    assert not (run.file("gad") / "checkpoints").exists()


def test_run_method_gad_reuses_the_shared_stages(run, qa, tiny_model_dir, capsys):
    """`run --method gad` after SODA's stages trains only GAD's; every row of the run then shows in evaluate and
    analyze, GAD's included, and each stage left what the registry lists."""
    from soda_distill.cli import main
    from soda_distill.evaluation.analyze import run_models
    from soda_distill.evaluation.evaluate import table_rows

    before = run.manifest()["stages"]
    assert main(["run", "--method", "gad", "--out", str(run.path), *gad_overrides(qa, tiny_model_dir)]) == 0
    assert f"GAD model: {run.file('gad') / 'generator'}" in capsys.readouterr().out
    after = run.manifest()["stages"]
    assert list(after) == [*before, "gad_warmup", "gad"]
    assert all(after[stage] == before[stage] for stage in before)  # teacher, snapshot, pairs, warmup: not redone
    for stage in METHODS["gad"].chain:
        assert all((run.path / output).exists() for output in STAGES[stage].outputs), stage
    cfg = load_config(None, [f"evaluate.runs=[{run.path}]"])
    assert [(r.method, r.model) for r in table_rows(cfg)][1:] == [
        ("Warmup (q_w)", str(run.file("warmup"))), ("GAD", str(run.file("gad") / "generator"))]
    assert list(run_models([run.path])) == ["Base", "Warmup", "GAD"]


@pytest.mark.parametrize("override, message", [
    ("gad.num_generations=3", "multiple of gad.num_generations"),
    ("gad.num_generations=1", "at least 2"),
    ("gad.discriminator.batch_size=3", "must divide the prompts per step"),
    ("gad.max_new_tokens=200", "must be below gad.max_length"),
])
def test_bad_batch_settings_fail_when_the_config_loads(qa, tiny_model_dir, override, message):
    with pytest.raises(SodaError, match=message):
        gad_config(qa, tiny_model_dir, override)


def test_cli_refuses_bad_settings_without_touching_the_run(tmp_path, capsys):
    from soda_distill.cli import main

    assert main(["gad", "--out", str(tmp_path / "run"), "gad.num_generations=3"]) == 2
    assert "multiple of gad.num_generations" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_vllm_rollouts_are_trls_settings_and_refused_in_one_line_without_vllm(monkeypatch, tmp_path):
    import importlib.util
    import types

    from trl import GRPOConfig

    with pytest.raises(SodaError, match="gad.vllm: 'fast' is not a mode"):
        load_config(None, ["gad.vllm=fast"])
    g = load_config(None, ["gad.vllm=server", "gad.vllm_server_base_url=http://127.0.0.1:8001"]).gad
    assert gad.vllm_arguments(load_config(None, []).gad) == {}
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(SodaError, match="needs vLLM installed"):
            gad.vllm_arguments(g)
        monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # installed, as far as the check sees
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, **gad.vllm_arguments(g))  # TRL takes them as they are
    assert (args.use_vllm, args.vllm_mode, args.vllm_server_base_url) == (True, "server", "http://127.0.0.1:8001")


def test_rollouts_are_drawn_by_the_packages_sampler_not_torch_multinomial(run, qa, tiny_model_dir, monkeypatch):
    """generate's sampling goes through torch.multinomial, whose CPU kernel took a quarter of a decode step; GAD's
    rollouts go through generation.CategoricalSampler instead (the same distribution, tested in test_generation.py),
    and still differ within a prompt's group."""
    from soda_distill.generation import CategoricalSampler

    def refuse(*args, **kwargs):
        raise AssertionError("torch.multinomial was called")

    calls, sample = [], CategoricalSampler.__call__
    monkeypatch.setattr(torch, "multinomial", refuse)
    monkeypatch.setattr(CategoricalSampler, "__call__", lambda self, ids, scores: calls.append(ids.shape) or sample(self, ids, scores))
    run_gad(gad_config(qa, tiny_model_dir, "gad.temperature=1.0"), run)
    assert calls and calls[0][0] == 4  # one rollout batch: 2 prompts × 2 generations
    [step] = read_metrics(run.file("gad") / "metrics.jsonl")[:-1]
    assert step["reward_std"] > 0  # the group's rollouts were not all the same
