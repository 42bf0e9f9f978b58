"""The benchmarks of SODA's Table 1 (LMSYS, Dolly, SelfInst, Vicuna) and the prompt layouts students answer in.

A benchmark is a `messages` JSONL file: the prompt (ending with a user turn), the reference answer as a final
assistant turn when the benchmark has one, an `id`, and optionally a `category` and the `instruction` and `input`
(Dolly: `context`) the prompt was made from, which the Alpaca layout keeps apart. Dolly, SelfInst and Vicuna ship
with the package (`builtin:NAME`); the LMSYS column is whatever held-out chat prompts `evaluate.lmsys` names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import EvaluateConfig
from ..errors import InputError, SodaError
from ..records import BUILTIN, read_examples, read_jsonl, resolve_data_path

PROMPT_FORMATS = ("chat", "alpaca")


@dataclass(frozen=True)
class Shipped:
    column: str
    data: str
    note: str


SHIPPED = {
    "dolly": Shipped("Dolly", "builtin:dolly_heldout", "100 held-out prompts of MiniLLM's 500-prompt Dolly split; references: Dolly's human-written answers"),
    "selfinst": Shipped("SelfInst", "builtin:self_instruct", "Self-Instruct user-oriented, MiniLLM's public file: 242 of the 252 prompts the papers cite; references: human-written"),
    "vicuna": Shipped("Vicuna", "builtin:vicuna", "the 80 Vicuna questions; references: GPT-3.5-turbo's answers (FastChat), not GPT-4o's"),
}
LMSYS = Shipped("LMSYS", "", "held-out LMSYS-style chat prompts from evaluate.lmsys")

# MiniLLM's prompt layout (from Stanford Alpaca), which GAD also uses for these benchmarks.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Item:
    id: str
    prompt: list[dict]  # chat turns ending with the user's
    reference: str | None
    category: str | None
    instruction: str
    input: str
    line: int | None = None  # in the benchmark file, for errors


@dataclass
class Benchmark:
    name: str  # its column in the results
    path: str
    note: str
    items: list[Item]


def alpaca_prompt(instruction: str, input: str = "") -> str:
    template = ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT
    return template.replace("{instruction}", instruction).replace("{input}", input)


def student_prompt(item: Item, prompt_format: str) -> list[dict]:
    """The chat turns a student is given: the prompt as is, or its last user turn in the Alpaca layout."""
    if prompt_format == "alpaca":
        return item.prompt[:-1] + [{"role": "user", "content": alpaca_prompt(item.instruction, item.input)}]
    return item.prompt


def _optional_string(path, lineno: int, obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise InputError(path, lineno, key, "expected a string")
    return value


def load_benchmark(path: str, name: str, note: str, limit: int | None = None) -> Benchmark:
    examples = read_examples(Path(path), limit=limit)  # validates the turns and the ids
    items = []
    for ex, (lineno, obj) in zip(examples, read_jsonl(Path(path))):
        category = _optional_string(path, lineno, obj, "category")
        instruction = _optional_string(path, lineno, obj, "instruction")
        extra = _optional_string(path, lineno, obj, "input") or _optional_string(path, lineno, obj, "context") or ""
        if ex.response is not None and not ex.response.strip():
            raise InputError(path, lineno, "messages", "empty reference answer (leave the assistant turn out for a prompt without one)")
        items.append(Item(ex.id, ex.prompt, ex.response, category, instruction or ex.prompt[-1]["content"], extra, lineno))
    return Benchmark(name, str(path), note, items)


def load_benchmarks(ev: EvaluateConfig) -> list[Benchmark]:
    """The configured benchmarks in column order: LMSYS first when `evaluate.lmsys` is set, then `benchmarks`."""
    if ev.prompt_format not in PROMPT_FORMATS:
        raise SodaError(f"evaluate.prompt_format: expected one of {PROMPT_FORMATS}, got {ev.prompt_format!r}")
    specs = [(LMSYS.column, resolve_data_path(ev.lmsys), LMSYS.note)] if ev.lmsys else []
    for spec in ev.benchmarks:
        if spec in SHIPPED:
            specs.append((SHIPPED[spec].column, resolve_data_path(SHIPPED[spec].data), SHIPPED[spec].note))
        else:
            column = spec[len(BUILTIN):] if spec.startswith(BUILTIN) else Path(spec).stem
            specs.append((column, resolve_data_path(spec), ""))
    names = [s[0] for s in specs]
    if not specs or len(set(names)) < len(names):
        raise SodaError(f"evaluate.benchmarks: expected distinct benchmarks, got {names} (names: {', '.join(SHIPPED)}, builtin:NAME or a JSONL path)")
    return [load_benchmark(path, name, note, ev.limit) for name, path, note in specs]
