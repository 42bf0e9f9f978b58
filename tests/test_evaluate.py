import json
import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import ANSWERS, QA, write_jsonl

from soda_distill.cli import main
from soda_distill.config import load_config, save_config
from soda_distill.errors import InputError, SodaError
from soda_distill.evaluation.evaluate import prepare_evaluation, run_evaluate, table_rows
from soda_distill.evaluation.metrics import normalize_answer, offline_metrics, repetition, rouge_l
from soda_distill.records import atomic_write_text
from soda_distill.stats import paired_difference, seeded_paired_difference


def test_rouge_l_on_known_strings():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100)
    assert rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(100 * 5 / 6)  # LCS 5 of 6 each way
    assert rouge_l("the cat sat on the mat", "dogs bark loudly") == 0
    assert rouge_l("he runs quickly", "he running quickly") == pytest.approx(100)  # Porter stemming, as MiniLLM
    assert rouge_l("", "anything") == 0 and rouge_l("!!", "?") == 0  # no tokens on one side


def test_rouge_l_equals_rouge_scores_own_score():
    """The longest common subsequence by rapidfuzz, on rouge-score's tokens: the same F1 as rouge-score's own table,
    on long answers (the AlpacaEval references' words) and short ones, repeated words included."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rng = random.Random(0)
    words = [w for a in ANSWERS for w in a.split()] + ["the", "runs", "running", "Paris,", "2", "x"] * 3
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 400))) for _ in range(40)]
    for reference, prediction in zip(texts, reversed(texts)):
        assert rouge_l(reference, prediction) == pytest.approx(100 * scorer.score(reference, prediction)["rougeL"].fmeasure,
                                                               abs=1e-9)


def test_offline_metrics():
    responses = [{"text": t, "finish_reason": f, "num_tokens": n} for t, f, n in
                 [("The Pacific!", "stop", 3), ("It is red, I think.", "length", 6), ("Long answer here", "stop", 3)]]
    m = offline_metrics(["Pacific", "Red.", "A reference of more than five words here."], responses, exact_match_max_words=5)
    assert normalize_answer("The  Pacific!") == "pacific"
    assert m["exact_match"] == {"score": 50.0, "prompts": 2}  # the long reference is not scored for exact match
    assert m["length"]["words"]["max"] == 5 and m["length"]["tokens"]["mean"] == 4.0 and m["length"]["truncated"] == 1
    assert 0 < m["rouge_l"] < 100 and m["cut"] == 33.33 and m["repetition"] == 0.0
    assert offline_metrics([None], responses[:1], 5)["rouge_l"] is None  # no reference, no ROUGE-L


def tiny_run(path, model_dir, stage, mtime):
    """A run directory whose student is the tiny model and whose `stage` finished with a copy of it (a new file
    time makes it another model to the generation cache, as a trained one would be)."""
    save_config(load_config(None, [f"student.model={model_dir}", "student.bf16=false"]), path / "config.yaml")
    shutil.copytree(model_dir, path / stage)
    os.utime(path / stage / "model.safetensors", (mtime, mtime))
    (path / "manifest.json").write_text(json.dumps({"stages": {stage: {"status": "done"}}, "inputs": {}}))
    return path


def test_results_table_from_two_runs_offline(tmp_path, tiny_model_dir, qa_file, capsys):
    a = tiny_run(tmp_path / "a", tiny_model_dir, "warmup", mtime=1)
    b = tiny_run(tmp_path / "b", tiny_model_dir, "distill", mtime=2)
    out = tmp_path / "eval"
    args = ["evaluate", str(a), str(b), "--out", str(out), f"evaluate.benchmarks=[{qa_file}]", "evaluate.limit=4",
            "evaluate.max_new_tokens=4", "evaluate.batch_size=4", "student.bf16=false"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["method"]) for r in results["rows"]] == [("a", "Base"), ("a", "Warmup (q_w)"), ("b", "Base"), ("b", "SODA")]
    cell = results["rows"][3]["cells"]["qa"]
    assert cell["prompts"] == 4 and cell["rouge_l"] is not None and cell["judge"] is None and results["judge"] is None
    assert results["settings"] == {"preset": None, "prompt_format": "chat", "decoding": "greedy", "max_new_tokens": 4,
                                   "backend": "transformers", "limit": 4, "exact_match_max_words": 5,
                                   "sampling": {"decoding": "greedy", "temperature": 0.0, "top_p": 1.0, "top_k": None,
                                                "repetition_penalty": 1.0, "max_new_tokens": 4, "seed": 0,
                                                "model_generation_config": "ignored"}}
    # the base model is shared by both runs: generated once; 3 distinct models × 4 prompts
    assert json.loads((out / "manifest.json").read_text())["stages"]["evaluate"]["generated"] == 12
    # every trained row against its own run's Base on the same prompts; these copies of one model answer alike
    paired = cell["paired"]
    assert list(paired) == ["vs Base"] and list(results["rows"][1]["cells"]["qa"]["paired"]) == ["vs Base"]
    assert paired["vs Base"]["rouge_l"] == {"difference": 0.0, "ci95": [0.0, 0.0], "prompts": 4, "length_controlled": {
        "difference": 0.0, "ci95": [0.0, 0.0], "per_doubling": 0.0}}
    assert paired["vs Base"]["reference_nll"]["difference"] == 0.0 and paired["vs Base"]["judge"] is None
    assert cell["reference_nll"] > 0 and len(cell["rouge_l_ci95"]) == 2
    responses = [json.loads(line) for line in (out / "responses" / "b_SODA" / "qa.jsonl").read_text().splitlines()]
    assert all(r["reference_nll"] > 0 and r["rouge_l"] is not None for r in responses)
    markdown = (out / "results.md").read_text()
    assert "| Model | Method | qa |" in markdown and "| a | Base |" in markdown and "|  | SODA |" in markdown
    assert "### Paired differences" in markdown and "| b | SODA | vs Base | +0.00 [+0.00, +0.00]; LC +0.00 [+0.00, +0.00] |" in markdown
    assert markdown in capsys.readouterr().out
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    responses = (out / "responses/b_SODA/qa.jsonl").read_text().splitlines()
    assert len(responses) == 4 and json.loads(responses[0])["messages"][-1]["role"] == "assistant"
    # again, from the saved config alone, in the Alpaca layout: new prompts, so new generations, nothing else redone
    assert main(["evaluate", "--out", str(out), "evaluate.prompt_format=alpaca"]) == 0
    assert json.loads((out / "manifest.json").read_text())["stages"]["evaluate"]["generated"] == 12
    assert main(["evaluate", "--out", str(out), "evaluate.prompt_format=alpaca"]) == 0
    assert json.loads((out / "manifest.json").read_text())["stages"]["evaluate"]["generated"] == 0


def test_rows_evaluated_once_join_a_later_table_from_their_response_files(tmp_path, tiny_model_dir, qa_file):
    """A row's responses file (answers, NLLs, finish reasons) stands in for its model: a table made in another
    session, or on another machine, from those files has the same figures and pairs, and generates nothing."""
    a = tiny_run(tmp_path / "a", tiny_model_dir, "distill", mtime=3)
    settings = [f"evaluate.benchmarks=[{qa_file}]", "evaluate.limit=4", "evaluate.max_new_tokens=4", "student.bf16=false"]
    assert main(["evaluate", str(a), "--out", str(tmp_path / "first"), *settings]) == 0
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    files = {f"a/{row}": str(tmp_path / "first" / "responses" / f"a_{row}" / "qa.jsonl") for row in ("Base", "SODA")}
    gzipped = {name: tmp_path / f"{name.replace('/', '_')}.jsonl.gz" for name in files}  # as bench/quality.py keeps rows
    for name, path in gzipped.items():
        atomic_write_text(path, Path(files[name]).read_text())
    cfg = load_config(None, settings + [f"evaluate.models.{name}={path}" for name, path in gzipped.items()])
    again = run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "again"))
    for before, after in zip(first["rows"], again["rows"], strict=True):
        b, c = before["cells"]["qa"], after["cells"]["qa"]
        for key in ("rouge_l", "reference_nll", "preference_margin", "preference_accuracy", "length", "paired"):
            assert c[key] == b[key], key
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["stages"]["evaluate"]["generated"] == 0
    # two seeds of the same rows: their differences across seeds, drawn below the bars as a forest
    seeds = {f"{seed}/{name.split('/')[1]}": path for seed in ("s1", "s2") for name, path in files.items()}
    cfg = load_config(None, settings + [f"evaluate.models.{name}={path}" for name, path in seeds.items()])
    across = run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "seeds"))["across_runs"]
    assert [(e["method"], e["runs"]) for e in across] == [("SODA", ["s1", "s2"])]
    height = lambda evaldir: int.from_bytes((evaldir / "results.png").read_bytes()[20:24], "big")  # the PNG's IHDR
    assert height(tmp_path / "seeds") > height(tmp_path / "again")
    # the same prompts with other references (AlpacaEval's second reference set): ROUGE-L against those, and no
    # reference NLL, which was scored against the first references
    other = write_jsonl(tmp_path / "qa2.jsonl", [{**r, "messages": [r["messages"][0], {"role": "assistant", "content": a}]}
                                                 for r, a in zip(QA, reversed(ANSWERS))])
    cfg = load_config(None, [f"evaluate.benchmarks=[{qa_file},{other}]", *settings[1:]]
                      + [f"evaluate.models.{name}={path}" for name, path in {**files, "a/Teacher": qa_file}.items()])
    both = run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "both"))
    for before, after in zip(first["rows"], both["rows"]):
        assert after["cells"]["qa"]["reference_nll"] == before["cells"]["qa"]["reference_nll"] is not None
        assert after["cells"]["qa2"]["reference_nll"] is None and after["cells"]["qa2"]["preference_margin"] is None
    teacher = both["rows"][-1]["cells"]
    assert teacher["qa"]["rouge_l"] == 100.0 > teacher["qa2"]["rouge_l"]
    # on the second references alone (bench/second_reference.py) the table leaves out what no row has
    cfg = load_config(None, [f"evaluate.benchmarks=[{other}]", *settings[1:]]
                      + [f"evaluate.models.{name}={path}" for name, path in files.items()])
    run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "second"))
    table = (tmp_path / "second" / "results.md").read_text()
    assert "### ROUGE-L" in table and "Reference NLL" not in table and "preference margin" not in table
    # a variant's rows (bench/quality.py's `--variant v`) are paired with each other too: SODA (v) against its own q_w
    variant = {"a/Warmup (q_w, v)": files["a/Base"], "a/SODA (v)": files["a/SODA"]}
    cfg = load_config(None, settings + [f"evaluate.models.{name}={path}" for name, path in variant.items()])
    rows = {r["method"]: r["cells"]["qa"]["paired"] for r in run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "v"))["rows"]}
    assert "vs Warmup (q_w, v)" in rows["SODA (v)"] and "vs SODA (v)" not in rows["Warmup (q_w, v)"]
    assert rows["SODA (v)"]["vs Warmup (q_w, v)"]["rouge_l"] == first["rows"][1]["cells"]["qa"]["paired"]["vs Base"]["rouge_l"]
    # two variants are not paired with each other unless evaluate.paired_with asks; then as any baseline is
    two = {"a/SODA (v)": files["a/Base"], "a/SODA (w)": files["a/SODA"]}
    for asked in ({}, {"SODA (w)": ["SODA (v)"]}):
        cfg = load_config(None, settings + [f"evaluate.models.{name}={path}" for name, path in two.items()]
                          + [f"evaluate.paired_with={json.dumps(asked)}"])
        rows = {r["method"]: r["cells"]["qa"]["paired"] for r in run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "w"))["rows"]}
        assert rows["SODA (v)"] == {} and list(rows["SODA (w)"]) == (["vs SODA (v)"] if asked else [])
    assert rows["SODA (w)"]["vs SODA (v)"] == first["rows"][1]["cells"]["qa"]["paired"]["vs Base"]
    cfg = load_config(None, settings + [f"evaluate.models.{name}={path}" for name, path in two.items()]
                      + ['evaluate.paired_with={"SODA (w)": ["SODA (x)"]}'])
    with pytest.raises(SodaError, match=r"evaluate.paired_with: no row is 'SODA \(x\)' \(the rows: SODA \(v\), SODA \(w\)\)"):
        run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "typo"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(line.replace('"reference_nll": ', '"reference_nll": "x", "was": ') + "\n"
                           for line in Path(files["a/SODA"]).read_text().splitlines()))
    cfg = load_config(None, settings + [f"evaluate.models.a/SODA={bad}"])
    with pytest.raises(InputError, match=r"bad.jsonl, field 'reference_nll': record 'q0': expected a number, got 'x'"):
        run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "bad"))


def test_table_rows_are_grouped_by_model_in_natural_order_methods_as_the_registry_lists(tmp_path):
    """A later seed's rows (compare's own runs come before `evaluate.models`) still follow the earlier seeds', and a
    variant sits beside its method, whatever order the rows were named in."""
    named = ["seed-10/SODA", "seed-10/Base", "seed-9/SODA (v)", "seed-9/GAD", "seed-9/SODA", "seed-9/Teacher",
             "seed-9/Warmup (q_w, v)", "seed-9/Base"]
    cfg = load_config(None, [f"evaluate.models.{name}={tmp_path / 'any.jsonl'}" for name in named])
    assert [r.label for r in table_rows(cfg)] == [
        "seed-9/Base", "seed-9/Warmup (q_w, v)", "seed-9/SODA (v)", "seed-9/SODA", "seed-9/GAD", "seed-9/Teacher",
        "seed-10/Base", "seed-10/SODA"]


def test_response_file_must_cover_a_benchmark_it_answers(tmp_path, qa_file):
    records = [json.loads(line) for line in qa_file.read_text().splitlines()]
    partial = write_jsonl(tmp_path / "partial.jsonl", records[:3])
    cfg = load_config(None, [f"evaluate.benchmarks=[{qa_file}]", f"evaluate.models.Teacher={partial}"])
    with pytest.raises(InputError, match=r"partial.jsonl, field 'id': answers 3 of the 12 qa prompts \(missing: q3, q4"):
        run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "eval"))


def test_a_prompt_too_long_for_a_model_is_an_error_naming_its_line(tmp_path, qa_file, tiny_model_dir):
    """Not a skip: a benchmark's score must be over all of its prompts."""
    bench = write_jsonl(tmp_path / "bench.jsonl", [json.loads(line) for line in qa_file.read_text().splitlines()[:2]]
                        + [{"id": "long", "prompt": "word " * 1100}])  # the tiny model's context: 1024 tokens
    cfg = load_config(None, [f"evaluate.benchmarks=[{bench}]", f"evaluate.models.Tiny/Base={tiny_model_dir}",
                             "evaluate.max_new_tokens=8"])
    with pytest.raises(InputError, match=r"bench.jsonl, line 3, field 'messages': the prompt is \d+ tokens: with "
                                         r"evaluate.max_new_tokens \(8\) it does not fit Tiny/Base's context of 1024 tokens"):
        run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "eval"))


def test_reference_nll_is_the_mean_cross_entropy_of_the_answer_tokens(tiny_model_dir):
    """One forward pass per prompt, the logits of the answer positions only, against the full-logits computation."""
    import torch

    from soda_distill.chat_tokens import chat_ids
    from soda_distill.evaluation.nll import reference_nll
    from soda_distill.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = [[{"role": "user", "content": "Name a color."}], [{"role": "user", "content": "Say hi."}]]
    got = reference_nll(model, tokenizer, prompts, ["Red, like a fire truck.", None])
    prompt_ids, answer_ids = chat_ids(tokenizer, prompts[0], "Red, like a fire truck.")
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0]
    logp = logits.log_softmax(-1)[len(prompt_ids) - 1 : -1].gather(1, torch.tensor(answer_ids)[:, None])
    assert got[1] is None and got[0] == pytest.approx(float(-logp.mean()), rel=1e-5)


def test_held_out_preference_margin_against_q0s_own_answers(tmp_path, embedded_path, qa_file):
    """The embedded student answers for real: each row scores its run's Base answers (q0's) against the references;
    a copy of Base has exactly Base's margins, so its paired difference is 0."""
    run = tiny_run(tmp_path / "r", Path(embedded_path), "distill", mtime=3)
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--out", str(out), f"evaluate.benchmarks=[{qa_file}]", "evaluate.limit=3",
                 "evaluate.max_new_tokens=12", "student.bf16=false"]) == 0
    results = json.loads((out / "results.json").read_text())
    base, soda = (row["cells"]["qa"] for row in results["rows"])
    assert base["preference_margin"] is not None and base["preference_margin"] == soda["preference_margin"]
    assert {k: v for k, v in soda["paired"]["vs Base"]["preference_margin"].items() if k != "length_controlled"} == {
        "difference": 0.0, "ci95": [0.0, 0.0], "prompts": 3}
    rows = [json.loads(line) for line in (out / "responses" / "r_Base" / "qa.jsonl").read_text().splitlines()]
    assert all(r["q0_answer_nll"] > 0 and r["reference_nll"] > 0 for r in rows)
    # the accuracy: the share of prompts whose reference is more likely per token than q0's greedy answer
    ranked = [100.0 * (r["q0_answer_nll"] > r["reference_nll"]) for r in rows]
    assert base["preference_accuracy"] == round(sum(ranked) / 3, 2) == soda["preference_accuracy"]
    assert soda["paired"]["vs Base"]["preference_accuracy"]["difference"] == 0.0
    assert "Held-out preference margin" in (out / "results.md").read_text()
    assert "Held-out preference accuracy" in (out / "results.md").read_text()
    # a run's trained row beside its Base from a file (bench/quality.py --methods warmup --with-committed): q0's
    # answers are the file's, so the margins are the same
    cfg = load_config(None, [f"evaluate.benchmarks=[{qa_file}]", "evaluate.limit=3", "evaluate.max_new_tokens=12",
                             "student.bf16=false", f"evaluate.runs=[{run}]", "evaluate.methods=[soda]",
                             f"evaluate.models.r/Base={out / 'responses' / 'r_Base' / 'qa.jsonl'}"])
    mixed = run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "mixed"))
    assert [r["method"] for r in mixed["rows"]] == ["Base", "SODA"]  # Base first, though named after
    assert mixed["rows"][1]["cells"]["qa"]["preference_margin"] == soda["preference_margin"]


def test_paired_differences_at_equal_length(tmp_path, qa_file):
    """Each paired difference is also given at equal answer length: fitted against the log ratio of the two rows'
    answers' words, prompt by prompt, as stats.paired_difference does from those answers."""
    rng = random.Random(0)
    pad = "and that is the whole answer to the question"
    texts = {"Base": [a for a in ANSWERS], "SODA": [a + (" " + pad) * rng.randint(0, 3) for a in ANSWERS]}
    files = {}
    for method, answers in texts.items():
        files[f"x/{method}"] = str(write_jsonl(tmp_path / f"{method}.jsonl", [
            {"id": q["id"], "messages": q["messages"][:1] + [{"role": "assistant", "content": t}]} for q, t in zip(QA, answers)]))
    cfg = load_config(None, [f"evaluate.benchmarks=[{qa_file}]", "student.bf16=false"]
                      + [f"evaluate.models.{name}={path}" for name, path in files.items()])
    results = run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "eval"))
    got = results["rows"][1]["cells"]["qa"]["paired"]["vs Base"]["rouge_l"]
    scores = {m: [rouge_l(a, t) for a, t in zip(ANSWERS, texts[m])] for m in texts}
    words = {m: [len(t.split()) for t in texts[m]] for m in texts}
    expected = paired_difference(scores["SODA"], scores["Base"], lengths=(words["SODA"], words["Base"]))
    assert got == expected and got["difference"] < -10  # padding costs ROUGE-L ...
    assert got["length_controlled"]["per_doubling"] < -10  # ... and the fit puts it on the length ratio
    assert f"LC {got['length_controlled']['difference']:+.2f}" in (tmp_path / "eval" / "results.md").read_text()


def test_answers_from_files_without_ids_match_their_prompts(tmp_path):
    """A benchmark and a response file whose records have no `id`: each answer is matched by its prompt, its figures
    (finish reason) with it."""
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"messages": q["messages"]} for q in QA[:4]])
    cut = {i: ("length" if i % 2 else "stop") for i in range(4)}
    answers = write_jsonl(tmp_path / "answers.jsonl", [  # in another order than the benchmark's
        {"messages": QA[i]["messages"][:1] + [{"role": "assistant", "content": f"answer {i}"}], "finish_reason": cut[i]}
        for i in reversed(range(4))])
    cfg = load_config(None, [f"evaluate.benchmarks=[{bench}]", "student.bf16=false", f"evaluate.models.x/A={answers}"])
    cell = run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "eval"))["rows"][0]["cells"]["bench"]
    assert cell["cut"] == 50.0, cell
    written = [json.loads(line) for line in (tmp_path / "eval" / "responses" / "x_A" / "bench.jsonl").read_text().splitlines()]
    assert [(r["messages"][0]["content"], r["messages"][-1]["content"], r["finish_reason"]) for r in written] == [
        (QA[i]["messages"][0]["content"], f"answer {i}", cut[i]) for i in range(4)]


def test_the_across_runs_table_gives_both_intervals_raw_and_at_equal_length():
    """Each pooled difference with its bootstrap interval, the seeds' own differences and their t interval, and the
    same at equal length; results written before the t interval get it from their seeds' differences."""
    from soda_distill.evaluation.table import across_runs_tables

    rng = random.Random(6)
    base, base_len = [rng.gauss(30, 5) for _ in range(60)], [rng.randint(20, 200) for _ in range(60)]
    lengths = [max(1, round(n * rng.uniform(0.5, 2.0))) for n in base_len]
    runs = [[b + 1 + shift + rng.gauss(0, 1) for b in base] for shift in (-0.3, 0.0, 0.4)]
    d = seeded_paired_difference(runs, [base] * 3, lengths=([lengths] * 3, [base_len] * 3))
    results = lambda d: {"benchmarks": [{"name": "b"}], "across_runs": [
        {"method": "SODA", "runs": ["seed-1", "seed-2", "seed-3"], "cells": {"b": {"vs SeqKD": {"rouge_l": d}}}}]}
    f = lambda v: f"{v:+.2f}"
    lc = d["length_controlled"]
    cell = (f"{f(d['difference'])} [{f(d['ci95'][0])}, {f(d['ci95'][1])}] ({', '.join(map(f, d['per_seed']))}; seeds "
            f"[{f(d['ci95_seeds'][0])}, {f(d['ci95_seeds'][1])}]); LC {f(lc['difference'])} [{f(lc['ci95'][0])}, "
            f"{f(lc['ci95'][1])}] (seeds [{f(lc['ci95_seeds'][0])}, {f(lc['ci95_seeds'][1])}])")
    assert f"| SODA | vs SeqKD | 3 | {cell} |" in across_runs_tables(results(d))
    older = {k: v for k, v in d.items() if k not in ("ci95_seeds", "length_controlled")}
    assert f"seeds [{f(d['ci95_seeds'][0])}, {f(d['ci95_seeds'][1])}])" in across_runs_tables(results(older))


def test_repetition_and_cut_answers(tmp_path, qa_file):
    """A row stuck in loops and cut at the token limit shows it in its repetition (seq-rep-4) and cut-answer share,
    with intervals, and in its paired differences against Base on the same prompts."""
    assert repetition("a b c d a b c d") == 20.0 and repetition("one two three") == 0.0  # 5 4-grams, 1 repeated
    loop = " ".join(["the answer is the answer"] * 30)
    rows = {"Base": [(a, "stop") for a in ANSWERS], "SODA": [*[(loop, "length")] * 6, *((a, "stop") for a in ANSWERS[6:])]}
    files = {f"x/{method}": str(write_jsonl(tmp_path / f"{method}.jsonl", [
        {"id": q["id"], "messages": q["messages"][:1] + [{"role": "assistant", "content": t}], "finish_reason": f}
        for q, (t, f) in zip(QA, answers)])) for method, answers in rows.items()}
    cfg = load_config(None, [f"evaluate.benchmarks=[{qa_file}]", "student.bf16=false"]
                      + [f"evaluate.models.{name}={path}" for name, path in files.items()])
    results = run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "eval"))
    base, soda = (r["cells"]["qa"] for r in results["rows"])
    looping = [repetition(loop)] * 6 + [repetition(a) for a in ANSWERS[6:]]
    assert repetition(loop) > 90 and soda["repetition"] == round(sum(looping) / len(QA), 2) and base["repetition"] == 0.0
    assert soda["cut"] == 50.0 and base["cut"] == 0.0 and len(soda["cut_ci95"]) == 2
    difference = soda["paired"]["vs Base"]
    assert difference["cut"]["difference"] == pytest.approx(soda["cut"], abs=0.01) and difference["repetition"]["ci95"][0] > 0
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert "### Repetition (seq-rep-4" in markdown and "### Answers cut at the token limit" in markdown
    assert "**repetition, seq-rep-4" in markdown


def test_reference_nll_is_scored_in_float32_where_the_student_runs_in_bf16(tmp_path, tiny_model_dir, qa_file):
    """bf16 scoring shrinks fine-tuning effects (docs/results/precision.md): by default the NLLs are the fp32 model's
    while the answers stay the student's bf16 ones; `evaluate.nll_dtype=student` scores in bf16 as before."""
    import torch

    from soda_distill.evaluation.nll import reference_nll
    from soda_distill.models import bf16_supported, load_model, load_tokenizer

    if not bf16_supported():
        pytest.skip("no bf16 on this CPU: the student runs in fp32 either way")
    items = [json.loads(line) for line in qa_file.read_text().splitlines()[:3]]
    prompts = [it["messages"][:-1] for it in items]
    references = [it["messages"][-1]["content"] for it in items]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    expected = {dtype: reference_nll(load_model(str(tiny_model_dir), dtype), tokenizer, prompts, references)
                for dtype in (torch.float32, torch.bfloat16)}
    assert expected[torch.float32] != pytest.approx(expected[torch.bfloat16], rel=1e-6)
    answers = {}
    for setting, dtype in (("float32", torch.float32), ("student", torch.bfloat16)):
        cfg = load_config(None, [f"evaluate.benchmarks=[{qa_file}]", "evaluate.limit=3", "evaluate.max_new_tokens=6",
                                 f"evaluate.models.Tiny/Base={tiny_model_dir}", "student.bf16=true",
                                 f"evaluate.nll_dtype={setting}"])
        run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / setting))
        records = [json.loads(line) for line in (tmp_path / setting / "responses" / "Tiny_Base" / "qa.jsonl").read_text().splitlines()]
        assert [r["reference_nll"] for r in records] == pytest.approx(expected[dtype], rel=1e-5)
        answers[setting] = [r["messages"][-1]["content"] for r in records]
    assert answers["float32"] == answers["student"]  # the answers are the bf16 student's in both
    with pytest.raises(SodaError, match=r"evaluate.nll_dtype: expected \"float32\" or \"student\", got 'bf16'"):
        load_config(None, ["evaluate.nll_dtype=bf16"])
