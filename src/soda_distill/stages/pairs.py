"""Stage 3 — the preference set D_pref = {(x, chosen = y_t, rejected = y_s)} in TRL's conversational format.

Pairs that teach nothing or do not fit are dropped and counted: an empty response on either side, a student
answer identical to the teacher's, or prompt + the longer response over `pairs.max_length` tokens — counted as TRL's
DPO tokenizes them, through the chat template, so a response's end of turn counts as many tokens as the template has.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..config import Config, fingerprint
from ..manifest import RunDir, combine
from ..models import load_tokenizer, resolve_model
from ..records import atomic_write_jsonl, read_examples, sha256_file
from ..stats import length_summary


def run_pairs(cfg: Config, run: RunDir) -> Path:
    teacher_path, snapshot_path, out = run.output("teacher"), run.output("snapshot"), run.output("pairs")
    fp = combine(fingerprint(cfg.pairs), sha256_file(teacher_path), sha256_file(snapshot_path))
    if run.done("pairs", fp):
        return out
    with run.stage("pairs", fp) as info:
        teacher = read_examples(teacher_path, want_response=True)
        student = {ex.id: ex for ex in read_examples(snapshot_path, want_response=True)}
        tokenizer = load_tokenizer(resolve_model(cfg.student.model, cfg.student.gguf_file), cfg.student.trust_remote_code)
        chat_tokens = lambda messages, **kw: len(
            tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])
        dropped: Counter = Counter()
        lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
        pairs = []
        for ex in teacher:
            chosen = ex.response
            rejected = student[ex.id].response if ex.id in student else None
            if rejected is None:
                dropped["no_student_response"] += 1
                continue
            if not chosen.strip():
                dropped["empty_chosen"] += 1
                continue
            if not rejected.strip():
                dropped["empty_rejected"] += 1
                continue
            if chosen.strip() == rejected.strip():
                dropped["identical"] += 1
                continue
            n_prompt = chat_tokens(ex.prompt, add_generation_prompt=True)
            n_chosen = chat_tokens(ex.prompt + [{"role": "assistant", "content": chosen}]) - n_prompt
            n_rejected = chat_tokens(ex.prompt + [{"role": "assistant", "content": rejected}]) - n_prompt
            if n_prompt + max(n_chosen, n_rejected) > cfg.pairs.max_length:
                dropped["too_long"] += 1
                continue
            for key, n in zip(lengths, (n_prompt, n_chosen, n_rejected)):
                lengths[key].append(n)
            pairs.append({
                "id": ex.id,
                "prompt": ex.prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            })
        atomic_write_jsonl(out, pairs)
        info.update(kept=len(pairs), dropped=dict(dropped), lengths={k: length_summary(v) for k, v in lengths.items()})
    return out
