"""`soda-distill push RUNDIR --repo ORG/NAME`: one trained model of a run directory to the Hugging Face Hub with
`huggingface_hub` — its safetensors, tokenizer and model card (and, with LoRA, `adapter/`) — and, when asked, the
run's preference pairs as a data set repository beside it (ORG/NAME-pairs). The token comes from the environment
(HF_TOKEN, or `huggingface-cli login`'s), never from a file of ours. `--to-dir DIR` writes exactly what would be
uploaded there instead: to look at first, or to upload with other tools.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import SodaError
from .manifest import RunDir
from .registry import METHODS

PAIRS_CARD = """---
tags: [soda-distill, preference, distillation]
---

# Preference pairs from soda-distill

TRL's conversational `prompt`/`chosen`/`rejected` format: `chosen` is the teacher's answer, `rejected` the
untouched student's own answer to the same prompt (SODA's semi on-policy pairs). {count} pairs; the pairs stage's
record (what it dropped and why) is in the run's manifest.
"""


def model_to_push(run: RunDir, method: str | None) -> tuple[str, Path]:
    """The method's model folder (default: SODA where it finished, else the last finished in registry order)."""
    trained = {m.name: folder for m, folder in run.trained_models()}
    if not trained:
        raise SodaError(f"{run.path}: no trained model has finished here")
    if method is None:
        method = "soda" if "soda" in trained else list(trained)[-1]
    if method not in trained:
        known = METHODS[method].label if method in METHODS else method
        raise SodaError(f"{run.path}: {known} has not finished here (finished: {', '.join(trained)})")
    return method, trained[method]


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def stage_upload(run: RunDir, method: str | None, with_pairs: bool, to: Path, link: bool = False) -> dict[str, Path]:
    """Copy (or hard-link: no second copy of the weights) what would be uploaded into `to`: `model/` (and
    `pairs/`); returns those folders."""
    method, folder = model_to_push(run, method)
    if not (folder / "README.md").is_file():
        raise SodaError(f"{folder}: no model card (README.md); a run from before model cards: run its stage's command again")
    to.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, to / "model", ignore=shutil.ignore_patterns("checkpoints", "training_args.bin"),
                    copy_function=_link if link else shutil.copy2, dirs_exist_ok=True)
    staged = {"model": to / "model"}
    if with_pairs:
        pairs = run.output("pairs")
        if not pairs.is_file():
            raise SodaError(f"{run.path}: no pairs.jsonl to push")
        (to / "pairs").mkdir(exist_ok=True)
        shutil.copyfile(pairs, to / "pairs" / "pairs.jsonl")
        count = sum(1 for line in pairs.open() if line.strip())
        (to / "pairs" / "README.md").write_text(PAIRS_CARD.format(count=count))
        staged["pairs"] = to / "pairs"
    return staged


def push(run_dir: str | Path, repo: str, method: str | None = None, private: bool = False, with_pairs: bool = False,
         to_dir: str | Path | None = None) -> list[str]:
    """Upload (or with `to_dir`, only stage) a run's model; returns what was made: Hub URLs or folders."""
    run = RunDir(run_dir)
    if not run.manifest_path.exists():
        raise SodaError(f"{run.path}: not a run directory (no manifest.json)")
    if to_dir is not None:
        return [str(p) for p in stage_upload(run, method, with_pairs, Path(to_dir)).values()]
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:  # before anything is staged
        for name in (repo, f"{repo}-pairs") if with_pairs else (repo,):
            validate_repo_id(name)
    except HFValidationError as e:
        raise SodaError(f"--repo {repo}: {e}") from None

    api = HfApi()
    made = []
    with tempfile.TemporaryDirectory(dir=run.path, prefix=".push-") as tmp:
        staged = stage_upload(run, method, with_pairs, Path(tmp), link=True)
        try:
            for kind, folder in staged.items():
                repo_id, repo_type = (repo, "model") if kind == "model" else (f"{repo}-pairs", "dataset")
                url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
                api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=str(folder),
                                  commit_message=f"soda-distill: {kind} from {run.path.name}")
                made.append(str(url))
        except (HfHubHTTPError, OSError) as e:  # no network, no token, no rights: one line, nothing lost
            raise SodaError(f"push to {repo}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return made
