"""Per-token negative log-likelihood of held-out reference answers under a model: how much of the reference's (the
teacher's, a human's) way of answering a model has taken in, from one forward pass per prompt and no generation.
Cheap enough to run on every row, and a metric that moves where ROUGE-L on a few hundred greedy answers does not.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..chat_tokens import chat_ids


def scoring_dtype(cfg) -> torch.dtype:
    """The dtype NLL is scored in (`evaluate.nll_dtype`): in bf16 the residual stream's sums round away part of what
    fine-tuning changed, and every effect shrinks by about a fifth (docs/results/precision.md)."""
    from ..models import use_bf16

    return torch.bfloat16 if cfg.evaluate.nll_dtype == "student" and use_bf16(cfg.student.bf16) else torch.float32


@torch.inference_mode()
def reference_nll(model, tokenizer, prompts: list[list[dict]], references: list[str | None],
                  desc: str = "reference NLL", open_ends: list[bool] | None = None) -> list[float | None]:
    """Mean NLL (nats per token) of each reference answer, its end of turn included (not for an answer cut at its
    token limit: `open_ends`), after its prompt as the chat template renders it; None where there is no reference.
    One prompt at a time: no padding to get wrong."""
    device = next(model.parameters()).device
    model.eval()
    out: list[float | None] = []
    open_ends = open_ends or [False] * len(prompts)
    for prompt, reference, open_end in tqdm(list(zip(prompts, references, open_ends)), desc=desc, unit="prompt"):
        if reference is None:
            out.append(None)
            continue
        prompt_ids, answer_ids = chat_ids(tokenizer, prompt, reference, open_end)
        ids = torch.tensor([prompt_ids + answer_ids], device=device)
        # only the logits that predict the answer's tokens: the last len(answer) + 1 positions, less the very last
        logits = model(input_ids=ids, logits_to_keep=len(answer_ids) + 1, use_cache=False).logits[0, :-1].float()
        targets = torch.tensor(answer_ids, device=device)
        out.append(float(torch.nn.functional.cross_entropy(logits, targets)))
    return out
