"""Batched generation from chat prompts: transformers (CPU/GPU, KV cache) or vLLM when installed.

Prompts are sorted by length (longest first, so an out-of-memory batch shows up at once) and cut into fixed
batches over the *whole* prompt list; each batch is seeded by its index. A resumed run therefore regenerates a
missing batch exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Generated:
    text: str
    finish_reason: str  # "stop" (end of turn) or "length" (hit max_new_tokens)
    num_tokens: int


class CategoricalSampler(LogitsProcessor):
    """Samples the next token (temperature, then top-p) and leaves only it standing, for greedy decoding to pick.

    Why: `generate`'s sampling draws through `torch.multinomial`, whose CPU kernel spends ~18 ms on 16 × 49k
    exponential variates a step, a quarter of a decode step of the 135M student. One uniform per row against the
    cumulative distribution draws from exactly the same distribution for ~1 ms.
    """

    def __init__(self, temperature: float, top_p: float):
        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        cdf = scores.float().softmax(-1).cumsum(-1)
        total = cdf[:, -1:]
        # u < total strictly, so the search lands on a token of positive probability
        u = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
        chosen = torch.searchsorted(cdf, u, right=True)
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)


def chat_texts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]


def prompt_tokens(tokenizer, prompts: list[list[dict]]) -> list[int]:
    """How many tokens each chat prompt is, as generation sees it (chat template and generation prompt included)."""
    return [len(ids) for ids in tokenizer(chat_texts(tokenizer, prompts), add_special_tokens=False)["input_ids"]]


def generate_transformers(
    model,
    tokenizer,
    prompts: list[list[dict]],
    sampling: Sampling,
    batch_size: int,
    done: Callable[[int], bool] = lambda i: False,
    on_batch: Callable[[list[tuple[int, Generated]]], None] = lambda results: None,
    desc: str = "generate",
) -> None:
    """Generate for every prompt i with `done(i)` false; hand each finished batch to `on_batch` as (i, result)."""
    texts = chat_texts(tokenizer, prompts)
    lengths = prompt_tokens(tokenizer, prompts)
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    tokenizer.padding_side = "left"
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    stop_ids = {i for i in [tokenizer.eos_token_id, *configured] if i is not None}
    device = next(model.parameters()).device
    model.eval()
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        bar.update(sum(done(i) for i in order))
        for b, batch in enumerate(batches):
            if all(done(i) for i in batch):
                continue
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(sampling.seed * 100_003 + b)
            kwargs = {"do_sample": False, "max_new_tokens": sampling.max_new_tokens}
            if sampling.temperature > 0:
                kwargs["logits_processor"] = LogitsProcessorList([CategoricalSampler(sampling.temperature, sampling.top_p)])
            with torch.inference_mode():
                out = model.generate(**enc, **kwargs, pad_token_id=tokenizer.pad_token_id, eos_token_id=list(stop_ids))
            results = []
            for row, i in enumerate(batch):
                new = out[row, enc["input_ids"].shape[1] :].tolist()
                cut = next((k for k, t in enumerate(new) if t in stop_ids), None)
                ids = new if cut is None else new[:cut]
                reason = "length" if cut is None else "stop"
                results.append((i, Generated(tokenizer.decode(ids, skip_special_tokens=True).strip(), reason, len(ids))))
            on_batch([r for r in results if not done(r[0])])
            bar.update(len(batch))


def vllm_engine(model_path: str, bf16: bool, seed: int):
    from vllm import LLM

    return LLM(model=model_path, dtype="bfloat16" if bf16 else "float32", seed=seed)


def generate_vllm(llm, prompts: list[list[dict]], sampling: Sampling) -> list[Generated]:
    """Every prompt's answer from a `vllm_engine`, which schedules them itself (continuous batching)."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, seed=sampling.seed
    )
    # vLLM divides by its progress bar's elapsed time, which stays 0 when tqdm is disabled
    outputs = llm.chat(prompts, params, use_tqdm=not os.environ.get("TQDM_DISABLE"))
    return [
        Generated(o.outputs[0].text.strip(), "length" if o.outputs[0].finish_reason == "length" else "stop", len(o.outputs[0].token_ids))
        for o in outputs
    ]
