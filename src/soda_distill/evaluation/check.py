"""The before/after that `soda-distill run` ends with: did distillation move the student toward the teacher?

Base and the distilled model on a few held-out prompts no stage trained on (`check.prompts`, first `check.limit`):
the per-token NLL of their reference answers under each model (a forward pass per prompt; lower is closer), with a
paired bootstrap 95% interval of the change, and both models' greedy answers to the first prompt side by side.
Written to the run's `check.json`, and recomputed only when a model or a setting changes.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from ..config import Config, fingerprint
from ..errors import SodaError
from ..generation import Sampling, generate_transformers
from ..manifest import RunDir
from ..models import load_model, load_tokenizer, model_digest, resolve_model, use_bf16
from ..records import atomic_write_text, resolve_data_path
from ..stats import paired_difference
from .benchmarks import load_benchmark
from .nll import reference_nll, scoring_dtype

def _measure(path: str, items, cfg: Config) -> tuple[list[float | None], str]:
    """The reference NLL of every item, and the greedy answer to the first, under the model at `path` (both in the
    dtype NLL is scored in)."""
    tokenizer = load_tokenizer(path, cfg.student.trust_remote_code)
    model = load_model(path, scoring_dtype(cfg), cfg.student.trust_remote_code)
    nll = reference_nll(model, tokenizer, [it.prompt for it in items], [it.reference for it in items], desc="check: NLL")
    answer = []
    generate_transformers(model, tokenizer, [items[0].prompt], Sampling(max_new_tokens=cfg.check.max_new_tokens), 1,
                          on_batch=lambda results: answer.extend(g.text for _, g in results), desc="check: answer")
    return nll, answer[0]


def before_after(cfg: Config, run: RunDir, distilled: Path) -> dict:
    base = resolve_model(cfg.student.model, cfg.student.gguf_file)
    path = resolve_data_path(cfg.check.prompts)
    identity = {"settings": fingerprint(cfg.check), "bf16": use_bf16(cfg.student.bf16), "nll_dtype": str(scoring_dtype(cfg)),
                "models": [model_digest(Path(base)) if Path(base).is_dir() else base, model_digest(distilled)]}
    saved = run.file("check.json")
    if saved.exists() and (earlier := json.loads(saved.read_text())).get("identity") == identity:
        return earlier
    items = [it for it in load_benchmark(path, "check", "", cfg.check.limit).items if it.reference]
    if not items:
        raise SodaError(f"{path}: check.prompts has no prompt with a reference answer among its first {cfg.check.limit}")
    (base_nll, base_answer), (nll, answer) = (_measure(p, items, cfg) for p in (base, str(distilled)))
    result = {
        "identity": identity, "prompts": path, "count": len(items),
        "reference_nll": {"Base": sum(base_nll) / len(items), "distilled": sum(nll) / len(items),
                          "change": paired_difference(nll, base_nll)},
        "example": {"prompt": items[0].prompt[-1]["content"], "reference": items[0].reference,
                    "Base": base_answer, "distilled": answer},
    }
    atomic_write_text(saved, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def render(result: dict, width: int = 100) -> str:
    nll, ex = result["reference_nll"], result["example"]
    change = nll["change"]
    lo, hi = change["ci95"]
    verdict = ("closer to the references" if hi < 0 else "further from the references" if lo > 0
               else "no change these prompts can tell apart")
    clip = lambda text, indent: textwrap.indent(textwrap.fill(" ".join(text.split())[:400], width - len(indent)), indent).lstrip()
    return "\n".join([
        f"Before/after on {result['count']} held-out prompts ({result['prompts']}), never trained on:",
        f"  reference NLL, nats per token (lower = closer): Base {nll['Base']:.3f} -> distilled {nll['distilled']:.3f}"
        f"  ({change['difference']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]: {verdict})",
        f"  prompt:     {clip(ex['prompt'], ' ' * 14)}",
        f"  reference:  {clip(ex['reference'], ' ' * 14)}",
        f"  Base:       {clip(ex['Base'], ' ' * 14)}",
        f"  distilled:  {clip(ex['distilled'], ' ' * 14)}",
    ])
