"""Experiment trackers: with `trackers.report_to: [tensorboard]` the trainers' curves and soda's own figures land in
TensorBoard event files that TensorBoard's reader loads; a tracker that is unknown or not installed is one clear line."""

import importlib.util

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from soda_distill.config import load_config
from soda_distill.errors import SodaError
from soda_distill.evaluation.evaluate import prepare_evaluation, run_evaluate
from soda_distill.pipeline import prepare, run_stage
from soda_distill.tracking import tracker_arguments


def scalars(folder):
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_training_curves_and_the_stage_figures(tmp_path, qa_file, tiny_model_dir):
    cfg = load_config(None, [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=8",
                             "pairs.truncated_rejected=open",
                             "warmup.max_length=128", "warmup.epochs=2", "warmup.batch_size=4", "warmup.learning_rate=1e-3",
                             "trackers.report_to=[tensorboard]"])
    run = prepare(cfg, tmp_path / "run")
    for stage in ("pairs", "warmup"):  # teacher, snapshot, pairs; warmup
        run_stage(stage, cfg, run)
    curves = scalars(run.path / "tensorboard" / "warmup")
    assert len(curves["train/loss"]) == 6 and curves["train/loss"][-1] < curves["train/loss"][0]  # 12 answers, 2 epochs
    snapshot = scalars(run.path / "tensorboard" / "snapshot")
    assert snapshot["records"] == [12.0] and snapshot["wall_s"][0] > 0
    record = run.manifest()["stages"]["snapshot"]  # a stage's cost at another size: its time per 1,000 prompts
    assert record["wall_s_per_1k_prompts"] == pytest.approx(record["wall_s"] * 1000 / 12, abs=0.5)  # wall_s is rounded
    assert snapshot["wall_s_per_1k_prompts"] == [pytest.approx(record["wall_s_per_1k_prompts"])]
    assert scalars(run.path / "tensorboard" / "pairs")["kept"] == [run.manifest()["stages"]["pairs"]["kept"]]

    cfg.evaluate.runs, cfg.evaluate.benchmarks, cfg.evaluate.limit, cfg.evaluate.max_new_tokens = [str(run.path)], ["dolly"], 2, 8
    evaldir = prepare_evaluation(cfg, tmp_path / "eval")
    results = run_evaluate(cfg, evaldir)
    table = scalars(evaldir.path / "tensorboard" / "evaluate")
    base = results["rows"][0]["cells"]["Dolly"]
    assert table["run/Base/Dolly/rouge_l"] == [pytest.approx(base["rouge_l"])]
    assert table["run/Warmup (q_w)/Dolly/paired/vs Base/reference_nll/difference"] == \
        [pytest.approx(results["rows"][1]["cells"]["Dolly"]["paired"]["vs Base"]["reference_nll"]["difference"])]


def test_a_tracker_unknown_or_not_installed_is_one_line(tmp_path):
    with pytest.raises(SodaError, match="trackers.report_to: 'tensorbord' is not a tracker transformers knows"):
        load_config(None, ["trackers.report_to=[tensorbord]"])
    if importlib.util.find_spec("clearml") is None:
        cfg = load_config(None, ["trackers.report_to=[clearml]"])
        with pytest.raises(SodaError, match=r"trackers.report_to: clearml is not installed \(pip install clearml\)"):
            tracker_arguments(cfg, tmp_path / "warmup")


def test_mlflow_gets_the_training_curves_and_the_stage_figures(tmp_path, qa_file, tiny_model_dir, monkeypatch):
    """Any other tracker through transformers' own callback: MLflow's local store holds the warmup's loss curve and
    each stage's manifest figures under the run names RUNDIR/STAGE."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local folder, no database: MLflow 3's documented opt-in
    cfg = load_config(None, [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=8",
                             "pairs.truncated_rejected=open",
                             "warmup.max_length=128", "warmup.epochs=2", "warmup.batch_size=4", "warmup.learning_rate=1e-3",
                             "trackers.report_to=[mlflow]"])
    run = prepare(cfg, tmp_path / "run")
    for stage in ("pairs", "warmup"):
        run_stage(stage, cfg, run)
    client = mlflow.MlflowClient((tmp_path / "mlruns").as_uri())
    runs = {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert {"run/snapshot", "run/pairs", "run/warmup"} <= set(runs)
    assert runs["run/snapshot"].data.metrics["records"] == 12 and runs["run/snapshot"].data.metrics["wall_s"] > 0
    assert runs["run/pairs"].data.metrics["kept"] == run.manifest()["stages"]["pairs"]["kept"]
    losses = [m.value for m in client.get_metric_history(runs["run/warmup"].info.run_id, "loss")]
    assert len(losses) == 6 and losses[-1] < losses[0]
