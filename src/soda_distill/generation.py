"""Batched generation from chat prompts: transformers (CPU/GPU, KV cache) or vLLM when installed.

Prompts are sorted by length (longest first, so an out-of-memory batch shows up at once) and cut into fixed
batches over the *whole* prompt list; each batch is seeded by its index (with vLLM, each prompt by its own). A
resumed run therefore regenerates a missing batch exactly as the uninterrupted run would have.

Both backends decode by `Sampling` alone: the model's own `generation_config` (a repetition penalty, top-k, ... as
many Hub models ship) is not applied, so one config gives one decoding rule whatever the backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


@dataclass
class Sampling:
    """The whole decoding rule: temperature and top-p sampling (greedy at temperature 0), nothing else — no top-k,
    repetition penalty or minimum length."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def describe(self) -> dict:
        """The rule as the manifest records it."""
        return {"decoding": "greedy" if self.temperature == 0 else "sampled", "temperature": self.temperature,
                "top_p": self.top_p, "top_k": None, "repetition_penalty": 1.0, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "model_generation_config": "ignored"}

    def request_seed(self, index: int) -> int:
        """The seed of the index-th prompt (or batch) of a generation: the same on a resumed run."""
        return self.seed * 100_003 + index


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
    # generate fills every setting left unset from model.generation_config: a neutral one leaves `Sampling` alone
    neutral = GenerationConfig(eos_token_id=list(stop_ids), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=model.generation_config.bos_token_id)
    device = next(model.parameters()).device
    model.eval()
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        bar.update(sum(done(i) for i in order))
        for b, batch in enumerate(batches):
            if all(done(i) for i in batch):
                continue
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(sampling.request_seed(b))
            processors = [CategoricalSampler(sampling.temperature, sampling.top_p)] if sampling.temperature > 0 else []
            with torch.inference_mode(), _generation_config(model, neutral):
                out = model.generate(**enc, do_sample=False, max_new_tokens=sampling.max_new_tokens,
                                     logits_processor=LogitsProcessorList(processors))
            results = []
            for row, i in enumerate(batch):
                new = out[row, enc["input_ids"].shape[1] :].tolist()
                cut = next((k for k, t in enumerate(new) if t in stop_ids), None)
                ids = new if cut is None else new[:cut]
                reason = "length" if cut is None else "stop"
                results.append((i, Generated(tokenizer.decode(ids, skip_special_tokens=True).strip(), reason, len(ids))))
            on_batch([r for r in results if not done(r[0])])
            bar.update(len(batch))


@contextmanager
def _generation_config(model, config: GenerationConfig):
    # A LoRA-wrapped model's generate reads its base model's settings: they are set there.
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved, target.generation_config = target.generation_config, config
    try:
        yield
    finally:
        target.generation_config = saved


def vllm_engine(model_path: str, bf16: bool, seed: int):
    from vllm import LLM

    # On a CPU vLLM reserves 90% of all memory for its KV cache unless told a size, and refuses to start when other
    # processes hold more than a tenth: a fixed 4 GiB instead (its VLLM_CPU_KVCACHE_SPACE, in GiB, still wins).
    cache = {} if torch.cuda.is_available() else {"kv_cache_memory_bytes": 4 << 30}
    # generation_config="vllm": vLLM's neutral defaults, not the model's generation_config.json
    return LLM(model=model_path, dtype="bfloat16" if bf16 else "float32", seed=seed, generation_config="vllm", **cache)


def vllm_sampling(sampling: Sampling, indices: list[int]) -> list[dict]:
    """SamplingParams' arguments for each prompt: the whole rule spelled out, and a seed of the prompt's own (its
    index in the whole prompt list), so prompts draw independent streams and a resumed run draws the same ones."""
    return [{"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": -1, "min_p": 0.0,
             "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
             "max_tokens": sampling.max_new_tokens, "seed": sampling.request_seed(i)} for i in indices]


def generate_vllm(llm, prompts: list[list[dict]], sampling: Sampling, indices: list[int] | None = None) -> list[Generated]:
    """Every prompt's answer from a `vllm_engine`, which schedules them itself (continuous batching); `indices`:
    each prompt's place in the whole prompt list (default: its place here)."""
    from vllm import SamplingParams

    params = [SamplingParams(**p) for p in vllm_sampling(sampling, indices or list(range(len(prompts))))]
    # vLLM divides by its progress bar's elapsed time, which stays 0 when tqdm is disabled
    outputs = llm.chat(prompts, params, use_tqdm=not os.environ.get("TQDM_DISABLE"))
    return [
        Generated(o.outputs[0].text.strip(), "length" if o.outputs[0].finish_reason == "length" else "stop", len(o.outputs[0].token_ids))
        for o in outputs
    ]
