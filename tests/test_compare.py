"""`soda-distill compare` end to end on the tiny model: every method trained per seed, evaluated with paired and
across-seed intervals, reported; a second call redoes nothing."""

import json

from test_gad import gad_overrides

from soda_distill.cli import main


def test_compare_trains_evaluates_and_reports_every_method_per_seed(tmp_path, qa_file, tiny_model_dir, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--out", str(out), *gad_overrides(qa_file, tiny_model_dir), "compare.seeds=[1,2]",
            "seqkd.max_length=128", "seqkd.batch_size=4", "seqkd.epochs=1", "seqkd.heldout=0.25",
            "pairs.max_length=128", "distill.max_length=128", "distill.batch_size=4", "distill.learning_rate=1e-4",
            f"evaluate.benchmarks=[{qa_file}]", "evaluate.limit=4", "evaluate.max_new_tokens=4", "evaluate.batch_size=4"]
    assert main(args) == 0
    assert "Across runs" in capsys.readouterr().out
    manifests = {s: json.loads((out / f"seed-{s}" / "manifest.json").read_text())["stages"] for s in (1, 2)}
    for stages in manifests.values():
        assert set(stages) == {"teacher", "snapshot", "pairs", "warmup", "seqkd", "distill", "gad_warmup", "gad"}
    # each seed samples its own q0 answers, so its pairs differ
    assert (out / "seed-1" / "snapshot.jsonl").read_text() != (out / "seed-2" / "snapshot.jsonl").read_text()

    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert [(r["model"], r["method"]) for r in results["rows"]] == [
        (f"seed-{s}", m) for s in (1, 2) for m in ("Base", "SeqKD", "SODA", "GAD")]  # the listed methods only
    soda = results["rows"][2]["cells"]["qa"]
    assert set(soda["paired"]) == {"vs Base", "vs SeqKD"} and soda["paired"]["vs SeqKD"]["rouge_l"]["prompts"] == 4
    assert set(results["rows"][3]["cells"]["qa"]["paired"]) == {"vs Base", "vs SeqKD", "vs SODA"}  # GAD
    across = {e["method"]: e for e in results["across_runs"]}
    assert list(across) == ["SeqKD", "SODA", "GAD"]
    assert set(across["GAD"]["cells"]["qa"]) == {"vs Base", "vs SeqKD", "vs SODA"}
    nll = across["SODA"]["cells"]["qa"]["vs SeqKD"]["reference_nll"]
    assert across["SODA"]["runs"] == ["seed-1", "seed-2"] and nll["seeds"] == 2 and len(nll["per_seed"]) == 2
    assert nll["ci95"][0] <= nll["difference"] <= nll["ci95"][1]
    assert nll["ci95_seeds"][0] <= nll["difference"] <= nll["ci95_seeds"][1]
    seeds = f"{nll['per_seed'][1]:+.3f}; seeds [{nll['ci95_seeds'][0]:+.3f}, {nll['ci95_seeds'][1]:+.3f}])"
    assert "Across runs" in (out / "evaluation" / "results.md").read_text()
    assert seeds in (out / "evaluation" / "results.md").read_text()
    report = (out / "report" / "report.md").read_text()
    assert "seed-1" in report and "seed-2" in report and (out / "report" / "report.html").stat().st_size > 0

    assert main(args) == 0  # everything finished: nothing is trained again
    assert {s: json.loads((out / f"seed-{s}" / "manifest.json").read_text())["stages"] for s in (1, 2)} == manifests
