"""Stage 3 — the preference set D_pref = {(x, chosen = y_t, rejected = y_s)} in TRL's conversational format.

Pairs that teach nothing or do not fit are dropped and counted: an empty response on either side, a student
answer identical to the teacher's, or prompt + the longer response over `pairs.max_length` tokens — counted as DPO
trains them (chat_tokens.py), the template's whole end of turn included. An answer cut at its token limit is kept
open (flagged `chosen_truncated`/`rejected_truncated`, trained with no end of turn) or dropped, per side
(`pairs.truncated_chosen`, `pairs.truncated_rejected`).

The rejected answer is q0's own (SODA), or for the paper's Table 2 ablation another source (`pairs.rejected_source`):
q0's answer to another prompt, the teacher's answer degraded, or another model's answers from a file. Sources drop
different pairs (q0's cut answers, say); `pairs.same_prompts_as` pairs only the prompts of another run's pairs, so that
they compare on the same prompts and budget.
"""

from __future__ import annotations

import dataclasses
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..chat_tokens import chat_ids
from ..config import REJECTED_SOURCES, Config
from ..errors import InputError, SodaError
from ..keys import KeyParts
from ..manifest import RunDir, StageResult
from ..models import load_tokenizer, resolve_model
from ..pipeline import execute
from ..records import Example, atomic_write_jsonl, read_examples, read_jsonl
from ..stats import length_summary


@dataclass
class PairsResult(StageResult):
    kept: int
    dropped: dict  # why, how many
    lengths: dict  # of the kept pairs' prompts and answers, in tokens (stats.length_summary)
    truncated_kept_open: dict  # answers cut at their limit and kept without an end of turn, by side
    truncated_policy: dict  # pairs.truncated_chosen, pairs.truncated_rejected
    rejected_source: str


def pairs_key(cfg: Config) -> KeyParts:
    """Another model's answers (`pairs.rejected_source` a file) and the prompts kept (`pairs.same_prompts_as`) are
    inputs: their bytes are part of the key."""
    source, same = cfg.pairs.rejected_source, cfg.pairs.same_prompts_as
    return KeyParts([None if source in REJECTED_SOURCES else Path(source), Path(same) if same else None])


def prompt_ids(path: Path) -> set:
    """The `id` of every line of `path` (pairs.same_prompts_as)."""
    ids = set()
    for lineno, obj in read_jsonl(path):
        if not isinstance(obj.get("id"), (str, int)) or isinstance(obj["id"], bool):
            raise InputError(path, lineno, "id", "expected a string or integer (pairs.same_prompts_as keeps the "
                                                 "prompts of these ids)")
        ids.add(obj["id"])
    return ids


def degraded(answer: str, rng: random.Random) -> str:
    """A worse answer made from a good one: its sentences shuffled, then cut to the first half of its words."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", answer.strip()) if s]
    rng.shuffle(sentences)
    words = " ".join(sentences).split()
    return " ".join(words[: max(1, len(words) // 2)])


def rejected_answers(teacher: list[Example], student: dict[str, Example], source: str, seed: int) -> dict[str, Example | None]:
    """Each teacher example's rejected answer, by id, from `source` (config.REJECTED_SOURCES, or a file)."""
    rng = random.Random(seed)
    if source == "q0":
        return {ex.id: student.get(ex.id) for ex in teacher}
    if source not in REJECTED_SOURCES:
        answers = {ex.id: ex for ex in read_examples(Path(source), want_response=True)}
        return {ex.id: answers.get(ex.id) for ex in teacher}
    if source == "degraded_teacher":
        return {ex.id: dataclasses.replace(ex, response=degraded(ex.response, rng), truncated=False) for ex in teacher}
    # other_q0: a seeded cycle through the prompts, so that no prompt gets its own answer
    order = [ex.id for ex in teacher if ex.id in student]
    rng.shuffle(order)
    others = {i: student[order[(k + 1) % len(order)]] for k, i in enumerate(order)} if len(order) > 1 else {}
    return {ex.id: others.get(ex.id) for ex in teacher}


def pairs_body(cfg: Config, run: RunDir, inputs: dict[str, Path]) -> PairsResult:
    """Write `pairs.jsonl`: the pairs kept, in the teacher's order."""
    teacher_path, snapshot_path = inputs["teacher"], inputs["snapshot"]
    teacher = read_examples(teacher_path, want_response=True)
    dropped: Counter = Counter()
    if cfg.pairs.same_prompts_as:
        same = prompt_ids(Path(cfg.pairs.same_prompts_as))
        dropped.update("other_prompts" for ex in teacher if ex.id not in same)
        teacher = [ex for ex in teacher if ex.id in same]
    student = {ex.id: ex for ex in read_examples(snapshot_path, want_response=True)}
    rejected = rejected_answers(teacher, student, cfg.pairs.rejected_source, cfg.pairs.seed)
    tokenizer = load_tokenizer(resolve_model(cfg.student.model, cfg.student.gguf_file), cfg.student.trust_remote_code)
    policy = {"chosen": cfg.pairs.truncated_chosen, "rejected": cfg.pairs.truncated_rejected}
    kept_open: Counter = Counter()
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    pairs = []
    for ex in teacher:
        answers = {"chosen": ex, "rejected": rejected[ex.id]}
        if answers["rejected"] is None:
            dropped["no_student_response"] += 1
            continue
        text = {side: a.response for side, a in answers.items()}
        empty = next((side for side in answers if not text[side].strip()), None)
        if empty:
            dropped[f"empty_{empty}"] += 1
            continue
        if text["chosen"].strip() == text["rejected"].strip():
            dropped["identical"] += 1
            continue
        cut = [side for side, a in answers.items() if a.truncated]
        if any(policy[side] == "drop" for side in cut):
            dropped[f"truncated_{next(s for s in cut if policy[s] == 'drop')}"] += 1
            continue
        ids = {side: chat_ids(tokenizer, ex.prompt, text[side], open_end=side in cut) for side in answers}
        n = {"prompt": len(ids["chosen"][0]), **{side: len(ids[side][1]) for side in answers}}
        if n["prompt"] + max(n["chosen"], n["rejected"]) > cfg.pairs.max_length:
            dropped["too_long"] += 1
            continue
        kept_open.update(cut)
        for key in lengths:
            lengths[key].append(n[key])
        pairs.append({
            "id": ex.id,
            "prompt": ex.prompt,
            **{side: [{"role": "assistant", "content": text[side]}] for side in answers},
            **{f"{side}_truncated": side in cut for side in answers},
        })
    if not pairs:
        raise SodaError(f"pairs: none of {len(teacher)} kept (dropped: {dict(dropped)})" + (
            "; q0's answers were cut at snapshot.max_new_tokens: raise it, or keep them with "
            "pairs.truncated_rejected=open" if dropped["truncated_rejected"] else ""))
    if dropped["truncated_rejected"] > len(teacher) / 2:
        print(f"pairs: {dropped['truncated_rejected']} of {len(teacher)} pairs dropped because q0's answer was cut at "
              f"snapshot.max_new_tokens (pairs.truncated_rejected=drop); a higher limit keeps more", file=sys.stderr)
    atomic_write_jsonl(run.output("pairs"), pairs)
    return PairsResult(kept=len(pairs), dropped=dict(dropped), lengths={k: length_summary(v) for k, v in lengths.items()},
                       truncated_kept_open=dict(kept_open), truncated_policy=policy,
                       rejected_source=cfg.pairs.rejected_source)


def run_pairs(cfg: Config, run: RunDir) -> Path:
    """The pairs stage (pipeline.execute): `pairs.jsonl`, unless finished."""
    return execute("pairs", cfg, run)
