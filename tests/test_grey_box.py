"""Grey-box teachers: an endpoint's `top_logprobs` kept by the teacher stage, and SFT toward the teacher's top-k
distribution (warmup.teacher_kl). The endpoint is a loopback server answering with the embedded SmolLM2-135M and
reporting its real log-probabilities (tests/logprobs_server.py: `transformers serve` refuses `logprobs`)."""

import json

import pytest
import torch

from logprobs_server import LogprobsServer
from test_teacher import api_overrides

from soda_distill.config import load_config
from soda_distill.manifest import RunDir
from soda_distill.models import load_model, load_tokenizer
from soda_distill.records import read_metrics
from soda_distill.stages.teacher import run_teacher
from soda_distill.stages.warmup import run_warmup, sft_dataset
from soda_distill.teacher_logprobs import TARGET_KEYS, TeacherTargetsCollator, topk_cross_entropy


@pytest.fixture(scope="module")
def logprobs_server(embedded_path):
    server = LogprobsServer(embedded_path)
    yield server
    server.close()


def settings(server, prompts_file, tiny_model_dir, *more):
    return [*api_overrides(server.url.removesuffix("/v1"), "smollm2", prompts_file, key_env=None),
            "teacher.api_key_env=null", "teacher.max_tokens=16", "teacher.top_logprobs=5",
            f"student.model={tiny_model_dir}", "student.bf16=false", "warmup.learning_rate=3e-3", "warmup.batch_size=4",
            "warmup.epochs=3", "warmup.max_length=128", "warmup.warmup_ratio=0", *more]


def student_topk_ce(model_dir, teacher_path, tokenizer) -> float:
    """The model's cross-entropy to the teacher's top-k distributions over every scored answer token."""
    data, _ = sft_dataset(teacher_path, tokenizer, kl_max_length=128)
    model = load_model(str(model_dir))
    batch = TeacherTargetsCollator(lambda rows: {"input_ids": torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(r["input_ids"]) for r in rows], batch_first=True)})([dict(r) for r in data])
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
        return topk_cross_entropy(hidden, model.get_output_embeddings(), *(batch[k] for k in TARGET_KEYS)).item()


def test_the_teacher_stage_keeps_each_answer_tokens_logprobs(tmp_path, logprobs_server, prompts_file, tiny_model_dir):
    run = RunDir(tmp_path / "run")
    path = run_teacher(load_config(None, settings(logprobs_server, prompts_file, tiny_model_dir)), run)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 12 and run.manifest()["stages"]["teacher"]["with_logprobs"] == 12
    for r in records:
        tokens = r["logprobs"]
        assert "".join(t[0] for t in tokens).strip() == r["messages"][-1]["content"].strip()
        # greedy: each answer token is its own top alternative, at its own log-probability (not its neighbour's)
        assert all(len(top) == 5 and lp <= 0 and top[0][0] == token and abs(top[0][1] - lp) < 1e-4
                   for token, lp, top in tokens)


def test_warmup_with_teacher_kl_learns_the_teachers_distribution(tmp_path, logprobs_server, prompts_file, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    result = {}
    for name, weight in (("text", 0.0), ("kl", 3.0)):
        run = RunDir(tmp_path / name)
        cfg = load_config(None, settings(logprobs_server, prompts_file, tiny_model_dir, f"warmup.teacher_kl={weight}"))
        run_teacher(cfg, run)
        out = run_warmup(cfg, run)
        result[name] = student_topk_ce(out, run.output("teacher"), tokenizer)
        if weight:
            info = run.manifest()["stages"]["warmup"]
            assert info["teacher_kl_unaligned"] <= 2, info  # one tokenizer: nearly every answer lines up
            ce = [m["teacher_topk_ce"] for m in read_metrics(out / "metrics.jsonl") if "teacher_topk_ce" in m]
            assert len(ce) >= 6 and sum(ce[-2:]) < sum(ce[:2]), ce
            overlap = [m["overlap/ratio"] for m in read_metrics(out / "metrics.jsonl") if "overlap/ratio" in m]
            # the student's top tokens come to be the teacher's reported ones (0.003 → about 0.1 here)
            assert len(overlap) == len(ce) and all(0 <= r <= 1 for r in overlap) and sum(overlap[-3:]) > sum(overlap[:3])
    assert result["kl"] < result["text"] - 0.1, result


def test_teacher_kl_without_any_teacher_logprobs_is_one_line(qa_file, tiny_model_dir):
    """A teacher file of text alone gives the top-k term nothing to learn: refused, not silently plain SFT."""
    from soda_distill.errors import SodaError

    with pytest.raises(SodaError, match="teacher_kl is set, but no answer has log-probabilities"):
        sft_dataset(qa_file, load_tokenizer(str(tiny_model_dir)), kl_max_length=128)


def test_teacher_targets_sit_at_the_state_before_each_answer_token(tiny_model_dir):
    """Answer token i (at index prompt_length + i of input_ids) is predicted by the state before it; the answer's own
    token joins the teacher's alternatives where it ranked lower; positions the trainer cuts are left out."""
    from soda_distill.teacher_logprobs import teacher_targets, vocabulary_by_text

    tokenizer = load_tokenizer(str(tiny_model_dir))
    vocabulary = vocabulary_by_text(tokenizer)
    answer = tokenizer("The sky is blue", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in answer]
    other = tokenizer.decode([answer[0] + 1])
    logprobs = [[p, -0.5, [[p, -0.5], [other, -1.5]]] for p in pieces]
    logprobs[1][2] = [[other, -0.2]]  # the answer's token outside the reported top
    targets = teacher_targets(tokenizer, vocabulary, 5, answer, logprobs, max_length=64)
    assert targets["kl_positions"] == list(range(4, 4 + len(answer)))
    assert targets["kl_ids"][0] == [answer[0], vocabulary[other]] and targets["kl_logprobs"][0] == [-0.5, -1.5]
    assert targets["kl_ids"][1] == [vocabulary[other], answer[1]] and targets["kl_logprobs"][1] == [-0.2, -0.5]
    assert teacher_targets(tokenizer, vocabulary, 5, answer, logprobs, max_length=7)["kl_positions"] == [4, 5]
    assert teacher_targets(tokenizer, vocabulary, 5, answer, [["x" + pieces[0], -0.5, []], *logprobs[1:]], 64) is None
