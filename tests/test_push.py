"""`soda-distill push`: a run's model (card, safetensors, tokenizer; no checkpoints, no pickle) and its pairs as a
data set, staged to a folder, or uploaded with huggingface_hub — its two calls stubbed here, the network being the
one thing this machine lacks; a failed upload is one line."""

import json

import httpx2 as httpx  # huggingface_hub 2 is built on it
import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

from soda_distill.cli import main
from soda_distill.config import load_config
from soda_distill.pipeline import prepare, run_methods


@pytest.fixture(scope="module")
def soda_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("push")
    qa = tmp / "qa.jsonl"
    qa.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                   {"role": "assistant", "content": f"Answer {i}."}]}) + "\n" for i in range(8)))
    cfg = load_config(None, [f"teacher.file={qa}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=8",
                             "pairs.truncated_rejected=open",
                             "warmup.max_length=128", "distill.max_length=128"])
    run = prepare(cfg, tmp / "run")
    run_methods(cfg, run, ["soda"])
    return run


def test_the_staged_upload_is_the_model_with_its_card_and_the_pairs(soda_run, tmp_path, capsys):
    assert main(["push", str(soda_run.path), "--with-pairs", "--to-dir", str(tmp_path / "up")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"staged: {tmp_path / 'up' / 'model'}", f"staged: {tmp_path / 'up' / 'pairs'}"]
    model = tmp_path / "up" / "model"
    assert ModelCard.load(model / "README.md").text.startswith("\n# SODA:")  # the default: SODA
    assert (model / "model.safetensors").stat().st_size == (soda_run.output("distill") / "model.safetensors").stat().st_size
    assert (model / "tokenizer.json").is_file() and not list(model.rglob("checkpoints")) and not list(model.rglob("*.bin"))
    pairs = tmp_path / "up" / "pairs"
    assert (pairs / "pairs.jsonl").read_bytes() == soda_run.output("pairs").read_bytes()
    assert "TRL's conversational `prompt`/`chosen`/`rejected`" in (pairs / "README.md").read_text()
    assert main(["push", str(soda_run.path), "--method", "warmup", "--to-dir", str(tmp_path / "w")]) == 0
    assert ModelCard.load(tmp_path / "w" / "model" / "README.md").text.startswith("\n# Warmup (q_w):")


def test_push_creates_the_repositories_and_uploads_the_folders(soda_run, monkeypatch):
    calls = []

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
        calls.append(("create", repo_id, repo_type, private))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, repo_type, folder_path, commit_message):
        files = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
        calls.append(("upload", repo_id, repo_type, files))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert main(["push", str(soda_run.path), "--repo", "me/tiny-soda", "--private", "--with-pairs"]) == 0
    assert [c[:4] if c[0] == "create" else c[:3] for c in calls] == [
        ("create", "me/tiny-soda", "model", True), ("upload", "me/tiny-soda", "model"),
        ("create", "me/tiny-soda-pairs", "dataset", True), ("upload", "me/tiny-soda-pairs", "dataset")]
    assert "model.safetensors" in calls[1][3] and "README.md" in calls[1][3] and calls[3][3] == ["README.md", "pairs.jsonl"]
    assert not list(soda_run.path.glob(".push-*"))  # the staging links are gone


def test_a_failed_push_or_a_missing_model_is_one_line(soda_run, monkeypatch, capsys):
    def refuse(self, repo_id, **kwargs):
        url = "https://huggingface.co/api/repos/create"
        raise HfHubHTTPError(f"401 Client Error: Unauthorized for url: {url}",
                             response=httpx.Response(401, request=httpx.Request("POST", url)))

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    assert main(["push", str(soda_run.path), "--repo", "me/x"]) == 2
    assert capsys.readouterr().err == "soda-distill: error: push to me/x: HfHubHTTPError: 401 Client Error: Unauthorized " \
                                      "for url: https://huggingface.co/api/repos/create\n"
    assert main(["push", str(soda_run.path), "--repo", "me/my model"]) == 2
    assert capsys.readouterr().err.startswith("soda-distill: error: --repo me/my model: Repo id must use alphanumeric")
    assert main(["push", str(soda_run.path), "--repo", "me/x.", "--with-pairs"]) == 2  # me/x.-pairs alone would pass
    assert capsys.readouterr().err.startswith("soda-distill: error: --repo me/x.: Repo id")
    assert main(["push", str(soda_run.path), "--method", "gad", "--repo", "me/x"]) == 2
    assert capsys.readouterr().err == f"soda-distill: error: {soda_run.path}: GAD has not finished here (finished: warmup, soda)\n"
