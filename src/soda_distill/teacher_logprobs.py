"""Grey-box teachers: SFT (warmup, SeqKD) with a token-level term toward the teacher's top-k distribution.

An endpoint asked for `top_logprobs` (teacher.top_logprobs) returns, for each token of its answer, the log-
probabilities of its N likeliest tokens. Where the teacher's tokens are the student's — its answer's tokens, decoded
one by one, are the student's tokens of the same text — `warmup.teacher_kl: λ` adds to the SFT loss, at each such
token, λ × the cross-entropy of the student's distribution against the teacher's renormalized over those N tokens
(the forward KL on the teacher's top N, up to the teacher's entropy). An answer whose tokens are not the student's
trains on its text alone, and is counted (`teacher_kl_unaligned`). Each step also logs the token-overlap figures
(token_overlap.py) at the teacher-scored states, the teacher's side being its top N.
"""

from __future__ import annotations

import torch

from .token_overlap import overlap_with_topk
from .models import transformers_model

TARGET_KEYS = ("kl_positions", "kl_ids", "kl_logprobs")


def vocabulary_by_text(tokenizer) -> dict[str, int]:
    """Each token's text, as an endpoint names tokens, to its id; texts two tokens share are left out."""
    seen: dict[str, int | None] = {}
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        seen[text] = None if text in seen else i
    return {text: i for text, i in seen.items() if i is not None}


def teacher_targets(tokenizer, vocabulary: dict[str, int], prompt_length: int, answer_ids: list[int],
                    logprobs: list, max_length: int) -> dict | None:
    """The rows' `kl_*` fields: for each answer token the state predicting it (its index in input_ids, less one),
    the ids of the teacher's alternatives and their log-probabilities; None where the teacher's tokens are not the
    student's."""
    if len(logprobs) > len(answer_ids) or [tokenizer.decode([i]) for i in answer_ids[: len(logprobs)]] != [t[0] for t in logprobs]:
        return None
    positions, ids, values = [], [], []
    for i, (token, logprob, top) in enumerate(logprobs):
        position = prompt_length + i - 1
        if position >= max_length - 1:  # beyond what the trainer keeps of the sequence
            break
        alternatives = {vocabulary[t]: lp for t, lp in top if t in vocabulary}
        alternatives.setdefault(answer_ids[i], logprob)  # the token itself, where it fell outside the top N
        positions.append(position)
        ids.append(list(alternatives))
        values.append(list(alternatives.values()))
    return {"kl_positions": positions, "kl_ids": ids, "kl_logprobs": values}


class TeacherTargetsCollator:
    """TRL's SFT collator, plus each row's teacher targets padded to (batch, positions, k): position −1 and
    log-probability −inf where there is none."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        targets = [{k: e.pop(k) for k in TARGET_KEYS} for e in examples]
        batch = self.collator(examples)
        n = max([len(t["kl_positions"]) for t in targets] + [1])
        k = max([len(ids) for t in targets for ids in t["kl_ids"]] + [1])
        batch["kl_positions"] = torch.full((len(examples), n), -1, dtype=torch.long)
        batch["kl_ids"] = torch.zeros((len(examples), n, k), dtype=torch.long)
        batch["kl_logprobs"] = torch.full((len(examples), n, k), float("-inf"))
        for row, t in enumerate(targets):
            batch["kl_positions"][row, : len(t["kl_positions"])] = torch.tensor(t["kl_positions"], dtype=torch.long)
            for j, (ids, values) in enumerate(zip(t["kl_ids"], t["kl_logprobs"])):
                batch["kl_ids"][row, j, : len(ids)] = torch.tensor(ids)
                batch["kl_logprobs"][row, j, : len(values)] = torch.tensor(values)
        return batch


def topk_cross_entropy(hidden: torch.Tensor, lm_head, positions, ids, logprobs, chunk: int = 256) -> torch.Tensor:
    """The mean over the batch's teacher-scored states of −Σ_k q_k log p_student(k), q the teacher's distribution
    renormalized over its top k; the output layer applied to those states only, `chunk` at a time."""
    rows, cols = (positions >= 0).nonzero(as_tuple=True)
    states = hidden[rows, positions[rows, cols]]
    ids, q = ids[rows, cols], logprobs[rows, cols].float().softmax(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, len(states), chunk):
        logp = lm_head(states[s : s + chunk]).float().log_softmax(-1).gather(-1, ids[s : s + chunk])
        total = total - (q[s : s + chunk] * logp).nan_to_num(0.0).sum()  # padded alternatives: q = 0
    return total / max(len(states), 1)


class TeacherKLTrainer:
    """Mixin for TRL's SFTTrainer: the SFT loss plus `teacher_kl` × `topk_cross_entropy` on the hidden states TRL's
    own forward computes (caught by a forward hook on the decoder, so the model runs once)."""

    teacher_kl = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = {k: inputs.pop(k) for k in TARGET_KEYS if k in inputs}
        inner = transformers_model(self.accelerator.unwrap_model(model))
        caught = {}
        hook = inner.get_decoder().register_forward_hook(lambda module, args, out: caught.update(hidden=out.last_hidden_state))
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            hook.remove()
        if not (targets and model.training and self.teacher_kl):
            return result
        term = topk_cross_entropy(caught["hidden"], inner.get_output_embeddings(), *(targets[k] for k in TARGET_KEYS))
        self.record("teacher_topk_ce", term.item())
        for key, value in self.token_overlap(caught["hidden"], inner.get_output_embeddings(), targets).items():
            self.record(key, value)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # the SFT loss is then a share of the whole optimizer step's tokens, and transformers no longer divides
            # it by the accumulation steps: this per-batch mean takes its share the same way
            term = term / self.current_gradient_accumulation_steps
        loss = (result[0] if return_outputs else result) + self.teacher_kl * term
        return (loss, *result[1:]) if return_outputs else loss

    @torch.no_grad()
    def token_overlap(self, hidden, lm_head, targets, states: int = 64) -> dict[str, float]:
        """token_overlap.py's figures at up to `states` of the batch's teacher-scored states, drawn afresh each step."""
        rows, cols = (targets["kl_positions"] >= 0).nonzero(as_tuple=True)
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.state.global_step))[:states]
        rows, cols = rows[pick.to(rows.device)], cols[pick.to(cols.device)]
        logits = lm_head(hidden[rows, targets["kl_positions"][rows, cols]].detach())
        return overlap_with_topk(logits, targets["kl_ids"][rows, cols], targets["kl_logprobs"][rows, cols])
