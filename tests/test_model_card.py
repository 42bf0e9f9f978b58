"""Every model folder a training stage yields carries a Hub model card that huggingface_hub parses, and no pickle."""

from huggingface_hub import ModelCard

from soda_distill.config import load_config
from soda_distill.manifest import RunDir
from soda_distill.pipeline import run_methods


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
