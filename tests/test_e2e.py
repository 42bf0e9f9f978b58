"""The whole pipeline through the command line on the embedded student, with a handful of examples."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from soda_distill.manifest import RunDir
from soda_distill.registry import METHODS, STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "soda-distill"), "run", str(ROOT / "configs" / "demo.yaml"), "--out", str(out),
           "data.limit=6", "snapshot.max_new_tokens=24", "pairs.truncated_rejected=open", "warmup.max_length=256",
           "pairs.max_length=256",
           "distill.max_length=256", "warmup.batch_size=6", "distill.batch_size=3", "check.limit=3", "check.max_new_tokens=16"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"distilled model: {out / 'distill'}" in done.stdout
    # the before/after it ends with: Base and the distilled model on held-out prompts, a metric and an answer each
    assert "Before/after on 3 held-out prompts" in done.stdout and "  distilled:  " in done.stdout
    check = json.loads((out / "check.json").read_text())
    assert check["count"] == 3 and check["reference_nll"]["Base"] > 0 and check["reference_nll"]["distilled"] > 0
    assert check["reference_nll"]["change"]["prompts"] == 3 and check["example"]["Base"].strip()

    for name in ("config.yaml", "manifest.json", "teacher.jsonl", "snapshot.jsonl", "pairs.jsonl"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["teacher", "snapshot", "pairs", "warmup", "distill"]
    assert all(s["status"] == "done" and s["wall_s"] >= 0 and s["peak_rss_mb"] > 0 for s in manifest["stages"].values())
    assert manifest["soda_distill"]["versions"]["trl"] and manifest["inputs"]
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["limit"] == 6
    for stage in METHODS["soda"].chain:  # the registry lists what each stage leaves, and the run left it
        assert all((out / output).exists() for output in STAGES[stage].outputs), stage
        assert RunDir(out).finished(stage), stage
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs and set(pairs[0]) == {"id", "prompt", "chosen", "rejected", "chosen_truncated", "rejected_truncated"}

    model = AutoModelForCausalLM.from_pretrained(out / "distill")
    tokenizer = AutoTokenizer.from_pretrained(out / "distill")
    enc = tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        new = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
    assert tokenizer.decode(new, skip_special_tokens=True).strip()

    again = subprocess.run(cmd, capture_output=True, text=True)  # everything finished: nothing is redone
    assert again.returncode == 0
    assert json.loads((out / "manifest.json").read_text())["stages"] == manifest["stages"]
    assert json.loads((out / "check.json").read_text()) == check  # same models: read back, not measured again
