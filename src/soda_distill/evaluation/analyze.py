"""Representation analysis (the paper's section 3.3, Figure 3): how distillation reshapes the student inside.

For each named model, the hidden state of the last prompt token is taken at every layer (index 0 is the embedding
output, index L the final layer after the final norm, as transformers returns them) on held-out chat prompts, and:

- linear CKA of every layer against the base model's same layer (1 = same structure, up to rotation and scale);
- for the final layer, the entropy of a histogram of all activation values (higher = more diverse) and their
  kurtosis (higher = a few dimensions dominate).

Memory stays bounded by the features, never by the activations of all models: models run one at a time, in
batches; the base model's last-token features ([prompts x hidden] per layer, fp64; 200 prompts of an 8B model are
~220 MB) are kept, each other model's are compared with them and dropped, and only every model's final layer is kept
for the histogram, whose bins must span all models' values. All statistics are fp64, whatever dtype the model runs in.

`soda-distill analyze RUN` (analyze_runs) compares a run's models — Base, SeqKD, SODA, GAD — on held-out prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config, load_config
from ..errors import SodaError
from ..generation import chat_texts
from ..manifest import RunDir
from ..models import load_model, load_tokenizer, resolve_model, use_bf16
from ..plots import plot_activation_stats, plot_cka
from ..records import atomic_write_text, read_examples, resolve_data_path

KURTOSIS = "Fisher (excess) kurtosis from population moments, m4 / m2^2 - 3: 0 for a normal distribution"


def _centered(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    # Shifting by the first row first makes a constant column exactly zero (the mean of n copies of a value need
    # not round back to that value), so "no variance" is detected exactly rather than as rounding noise.
    X = X - X[0]
    return X - X.mean(axis=0)


def linear_cka(X, Y) -> float:
    """Linear CKA of two [samples x features] matrices: ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on centered features.

    NaN when either matrix has no variance across samples (0/0): there is no structure to compare.
    """
    X, Y = _centered(X), _centered(Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"CKA needs the same samples in both matrices, got {X.shape[0]} and {Y.shape[0]} rows")
    if X.shape[0] < max(X.shape[1], Y.shape[1]):
        # Fewer samples than features (the usual case: hundreds of prompts, thousands of dimensions): the n x n
        # Gram matrices give the same numbers, as ‖XᵀY‖²_F = <XXᵀ, YYᵀ>_F and ‖XᵀX‖_F = ‖XXᵀ‖_F, for far less
        # work.
        K, L = X @ X.T, Y @ Y.T
        cross = float(np.sum(K * L))
    else:
        K, L = X.T @ X, Y.T @ Y
        cross = float(np.linalg.norm(X.T @ Y) ** 2)
    denominator = float(np.linalg.norm(K) * np.linalg.norm(L))
    return cross / denominator if denominator > 0 else math.nan


def activation_entropy(values, edges) -> float:
    """Shannon entropy (nats) of the histogram of `values` over the bins with these edges."""
    counts, _ = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins=np.asarray(edges, dtype=np.float64))
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def kurtosis(values) -> float:
    """Fisher (excess) kurtosis with population moments, as scipy.stats.kurtosis by default; NaN for constant values."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x - x.mean()
    m2 = np.mean(x**2)
    return float(np.mean(x**4) / m2**2 - 3.0) if m2 > 0 else math.nan


def last_token_states(model, tokenizer, prompts: list[list[dict]], batch_size: int = 8, max_length: int = 512,
                      desc: str = "hidden states") -> list[np.ndarray]:
    """Hidden states of each prompt's last token (its generation prompt) at every layer: one fp64
    [prompts x hidden] array per layer, rows in prompt order.

    Prompts longer than `max_length` tokens lose their beginning, so the last token stays the one that answers.
    Either padding side works: the last real token is found from the attention mask.
    """
    tokenizer.truncation_side = "left"
    ids = tokenizer(chat_texts(tokenizer, prompts), add_special_tokens=False, truncation=True,
                    max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: little padding
    device = next(model.parameters()).device
    layers: list[np.ndarray] = []
    model.eval()
    with tqdm(total=len(ids), desc=desc, unit="prompt") as bar, torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            enc = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt").to(device)
            mask = enc["attention_mask"]
            # A plain forward numbers positions 0..T-1 whatever the padding; left-padded rows need their own
            # (rotary embeddings are shift-invariant, but learned absolute positions are not).
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            # The base model (no LM head) gives the same hidden states without computing vocabulary logits.
            out = model.base_model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions,
                                   output_hidden_states=True, use_cache=False)
            last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
            rows = torch.arange(len(batch), device=device)
            if not layers:
                layers = [np.empty((len(ids), h.shape[-1])) for h in out.hidden_states]
            for features, h in zip(layers, out.hidden_states):
                features[batch] = h[rows, last].double().cpu().numpy()
            bar.update(len(batch))
    return layers


def _model_states(path: str, prompts, batch_size: int, max_length: int, bf16: bool | None, trust_remote_code: bool,
                  desc: str) -> list[np.ndarray]:
    resolved = resolve_model(path)
    tokenizer = load_tokenizer(resolved, trust_remote_code)
    model = load_model(resolved, torch.bfloat16 if use_bf16(bf16) else torch.float32, trust_remote_code)
    try:
        return last_token_states(model, tokenizer, prompts, batch_size, max_length, desc)
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _number(x: float) -> float | None:
    return None if math.isnan(x) else x  # JSON has no NaN


def analyze(models: dict[str, str], prompts: list[list[dict]], out_dir: Path, base: str = "base", batch_size: int = 8,
            max_length: int = 512, bins: int = 100, bf16: bool | None = None, trust_remote_code: bool = False,
            source: dict | None = None) -> dict:
    """Compare named models (name -> path, Hub id, .gguf or `embedded`) with `models[base]` on chat prompts.

    Writes `analysis.json` (returned too; `source` is recorded in it as given: where the models and prompts came
    from), `cka.png` and `activation_stats.png` in `out_dir`. In the JSON, a layer's
    CKA is null when it is undefined: the embedding output of the last token is the same for every prompt (it is the
    chat template's fixed generation prompt), so layer 0 has no variance to compare. The entropy's bins are `bins`
    equal-width bins over the range of all models' final-layer values together, so the entropies are comparable.
    """
    if base not in models:
        raise SodaError(f"the base model '{base}' is not among the models ({', '.join(models)})")
    if not prompts:
        raise SodaError("no prompts to analyze")
    names = [base, *(name for name in models if name != base)]
    base_states: list[np.ndarray] = []
    final: dict[str, np.ndarray] = {}
    cka: dict[str, list[float]] = {}
    for name in names:
        states = _model_states(models[name], prompts, batch_size, max_length, bf16, trust_remote_code,
                               f"analyze {name}")
        if name == base:
            base_states = states
        elif len(states) != len(base_states):
            raise SodaError(f"{models[name]}: {len(states) - 1} layers, but the base model has {len(base_states) - 1}; "
                            "layer-wise CKA needs models of the same depth")
        cka[name] = [linear_cka(b, s) for b, s in zip(base_states, states)]
        final[name] = states[-1]
    low = min(float(v.min()) for v in final.values())
    high = max(float(v.max()) for v in final.values())
    edges = np.linspace(low, high, bins + 1)
    result = {
        "base": base,
        "num_prompts": len(prompts),
        "num_layers": len(base_states),
        "layer_index": "last prompt token's hidden state: 0 = embeddings, last = final layer after the final norm",
        "binning": {"bins": bins, "range": [low, high], "spacing": "equal-width", "log": "natural (nats)"},
        "kurtosis": KURTOSIS,
        "source": source,
        "models": {
            name: {
                "path": str(models[name]),
                "cka": [_number(c) for c in cka[name]],
                "final_layer_entropy": activation_entropy(final[name], edges),
                "final_layer_kurtosis": _number(kurtosis(final[name])),
            }
            for name in names
        },
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_cka(result, out_dir / "cka.png")
    plot_activation_stats(result, out_dir / "activation_stats.png")
    atomic_write_text(out_dir / "analysis.json", json.dumps(result, indent=2) + "\n")  # last: its presence means done
    return result


def run_models(runs: list[Path]) -> dict[str, str]:
    """`Base` (the runs' student, which they must share: CKA compares every model with one base) and each run's
    trained models whose stage finished (registry.METHODS) — `SeqKD`, `SODA`, `GAD`, or `RUN/SeqKD`, ... for
    several runs."""
    if not runs:
        raise SodaError("give one or more run directories to analyze")
    bases, models = set(), {}
    for path in map(Path, runs):
        if not (path / "config.yaml").is_file():
            raise SodaError(f"{path}: not a run directory (no config.yaml)")
        student = load_config(path / "config.yaml").student
        bases.add(resolve_model(student.model, student.gguf_file))
        for method, model in RunDir(path).trained_models():
            name = f"{path.name}/{method.label}" if len(runs) > 1 else method.label
            if name in models:
                raise SodaError(f"two runs are named {path.name}; analyze runs whose directory names differ")
            models[name] = str(model)
    if len(bases) > 1:
        raise SodaError(f"the runs have different students ({', '.join(sorted(bases))}); CKA compares every model "
                        "with one base model, so analyze them one at a time")
    return {"Base": bases.pop(), **models}


def analyze_runs(cfg: Config, runs: list[Path], out_dir: Path) -> dict:
    """`soda-distill analyze`: the runs' models (see run_models) on `cfg.analyze`'s held-out prompts; the student
    settings (bf16, trust_remote_code) are `cfg.student`'s."""
    a = cfg.analyze
    prompts_path = resolve_data_path(a.prompts)
    prompts = [ex.prompt for ex in read_examples(Path(prompts_path), limit=a.limit)]
    source = {"runs": [str(Path(r).resolve()) for r in runs], "prompts": prompts_path, "limit": a.limit,
              "max_length": a.max_length}
    return analyze(run_models(runs), prompts, out_dir, base="Base", batch_size=a.batch_size, max_length=a.max_length,
                   bins=a.bins, bf16=cfg.student.bf16, trust_remote_code=cfg.student.trust_remote_code, source=source)
