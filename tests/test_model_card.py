"""Every model folder a training stage yields carries a Hub model card that huggingface_hub parses, and no pickle."""

from huggingface_hub import ModelCard

from soda_distill.config import load_config
from soda_distill.manifest import RunDir
from soda_distill.pipeline import prepare, run_methods


def test_model_folders_have_a_parsable_card_and_no_training_args(tmp_path, qa_file, tiny_model_dir):
    cfg = load_config(None, [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=8",
                             "pairs.truncated_rejected=open",
                             "warmup.max_length=128", "distill.max_length=128", "distill.beta=0.25"])
    run = RunDir(tmp_path / "run")
    run_methods(cfg, run, ["soda"])
    for stage, label in (("warmup", "Warmup (q_w)"), ("distill", "SODA")):
        folder = run.output(stage)
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "transformers" and "soda-distill" in card.data.tags and stage in card.data.tags
        assert card.data.base_model is None  # a local folder is no Hub id
        assert card.text.startswith(f"\n# {label}:") and "answers from the file qa.jsonl" in card.text
        assert "- Teacher answers: 12" in card.text
        assert not list(folder.rglob("training_args.bin"))
    assert "beta: 0.25" in ModelCard.load(run.output("distill") / "README.md").text


def test_an_evaluated_model_card_carries_the_figures_and_its_data_set(tmp_path, qa_file, tiny_model_dir):
    """After `evaluate`, each trained model's card holds that evaluation's figures as the Hub's model-index (Base, not
    a folder of ours, is left alone); a shipped teacher file names the Hub data set it comes from."""
    from soda_distill.evaluation.evaluate import prepare_evaluation, run_evaluate
    from soda_distill.model_card import training_datasets

    cfg = load_config(None, [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "warmup.max_length=128",
                             f"evaluate.benchmarks=[{qa_file}]", "evaluate.limit=3", "evaluate.max_new_tokens=4",
                             "student.bf16=false"])
    run = prepare(cfg, tmp_path / "run")
    run_methods(cfg, run, ["warmup"])
    cfg.evaluate.runs = [str(run.path)]
    results = run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "eval"))
    card = ModelCard.load(run.output("warmup") / "README.md")
    figures = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    cell = results["rows"][1]["cells"]["qa"]
    assert figures == {("qa", "rouge"): cell["rouge_l"], ("qa", "nll"): cell["reference_nll"]}
    assert card.data.model_name == "run Warmup (q_w)" and "model-index" in (run.output("warmup") / "README.md").read_text()
    assert not (tiny_model_dir / "README.md").exists() or "model-index" not in (tiny_model_dir / "README.md").read_text()
    assert training_datasets(load_config(None, ["teacher.file=builtin:dolly_train"])) == ["databricks/databricks-dolly-15k"]
    assert training_datasets(load_config(None, ["data.prompts=hub:org/prompts:train"])) == ["org/prompts"]
    assert training_datasets(cfg) == [] and card.data.datasets is None
