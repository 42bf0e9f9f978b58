"""Token ids of a prompt and its response as TRL's SFT and DPO trainers make them from conversations, and the same
for a response that was cut off: without the chat template's end of turn.

TRL renders the prompt (with the generation prompt) and prompt + response through the chat template; the response
is what follows their common prefix. An answer that hit its token limit did not end, so it must not be trained to
end: `open_end` leaves the template's end-of-turn tokens (`<|im_end|>` and a newline for SmolLM2) off it.
"""

from __future__ import annotations

import functools


def _render(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@functools.lru_cache(maxsize=8)
def end_of_turn(tokenizer) -> tuple[int, ...]:
    """The tokens the chat template puts after an assistant answer's text."""
    prompt = [{"role": "user", "content": "Hi."}]
    _, response = _split(tokenizer, prompt, "Hello.")
    text = tokenizer("Hello.", add_special_tokens=False)["input_ids"]
    return tuple(response[len(text):]) if response[: len(text)] == text else ()


def _split(tokenizer, prompt: list[dict], response: str) -> tuple[list[int], list[int]]:
    prompt_ids = _render(tokenizer, prompt, add_generation_prompt=True)
    full = _render(tokenizer, prompt + [{"role": "assistant", "content": response}])
    n = _common_prefix(prompt_ids, full)
    return prompt_ids[:n], full[n:]


def chat_ids(tokenizer, prompt: list[dict], response: str, open_end: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) as TRL trains this conversation; `open_end`: the response without its end of turn."""
    prompt_ids, response_ids = _split(tokenizer, prompt, response)
    suffix = end_of_turn(tokenizer)
    if open_end and suffix and tuple(response_ids[-len(suffix):]) == suffix:
        response_ids = response_ids[: -len(suffix)]
    return prompt_ids, response_ids
