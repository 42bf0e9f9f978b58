"""Token-overlap diagnostics (from "Rethinking On-Policy Distillation"): at the states the student visits, how far
its next-token distribution and the teacher's agree on a small shared set of likely tokens.

Successful on-policy distillation shows the student's and the teacher's top-k sets converging, with the shared set
holding most of both distributions' mass (97–99% in that paper). Per state, with S and T the student's and the
teacher's k most likely tokens:
- `overlap/ratio`: |S ∩ T| / k;
- `overlap/teacher_mass_shared`, `overlap/student_mass_shared`: each model's probability on S ∩ T;
- `overlap/teacher_mass_topk`: the teacher's probability on its own top k (how much of it k tokens hold).
White-box (OPD) both distributions are whole; grey-box (SFT with `warmup.teacher_kl`) the teacher's is its top k.
"""

from __future__ import annotations

import torch


def overlap_stats(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> dict[str, float]:
    """The means over states (rows of (N, V) logits) of the figures above."""
    p_s, p_t = student_logits.float().softmax(-1), teacher_logits.float().softmax(-1)
    top_s, top_t = p_s.topk(k, -1).indices, p_t.topk(k, -1).indices
    in_s = torch.zeros_like(p_s, dtype=torch.bool).scatter_(-1, top_s, True)
    in_t = torch.zeros_like(p_t, dtype=torch.bool).scatter_(-1, top_t, True)
    shared = in_s & in_t
    return {
        "overlap/ratio": (shared.sum(-1).float() / k).mean().item(),
        "overlap/teacher_mass_shared": (p_t * shared).sum(-1).mean().item(),
        "overlap/student_mass_shared": (p_s * shared).sum(-1).mean().item(),
        "overlap/teacher_mass_topk": (p_t * in_t).sum(-1).mean().item(),
    }


def overlap_with_topk(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> dict[str, float]:
    """The same figures where only the teacher's top k are known (a grey-box endpoint's `top_logprobs`): T is those
    (N, k) ids (log-probability −inf: padding), S the student's k likeliest, k each state's own count of known ids;
    the teacher's mass is its reported one."""
    p_s = student_logits.float().softmax(-1)
    known = teacher_logprobs > float("-inf")
    k = known.sum(-1).clamp(min=1)
    # a teacher token is in S where fewer than k tokens are likelier to the student
    likelier = p_s.shape[-1] - torch.searchsorted(p_s.sort(-1).values, p_s.gather(-1, teacher_ids).contiguous(), right=True)
    shared = (likelier < k[:, None]) & known
    p_t = teacher_logprobs.float().exp() * known
    return {
        "overlap/ratio": (shared.sum(-1) / k).mean().item(),
        "overlap/teacher_mass_shared": (p_t * shared).sum(-1).mean().item(),
        "overlap/student_mass_shared": (p_s.gather(-1, teacher_ids) * shared).sum(-1).mean().item(),
        "overlap/teacher_mass_topk": p_t.sum(-1).mean().item(),
    }


def state_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits at `positions` ((row, column) pairs of the batch), projecting only those
    states through the output layer (a (batch, length, vocabulary) tensor would not fit)."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model.get_output_embeddings()(hidden[positions[:, 0], positions[:, 1]])


def sampled_states(completion_mask: torch.Tensor, prompt_length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Up to `count` states the student visited: (row, position) of tokens that predict a completion token."""
    rows, cols = completion_mask.nonzero(as_tuple=True)
    pick = torch.randperm(len(rows), generator=generator)[:count]
    return torch.stack([rows[pick], cols[pick] + prompt_length - 1], dim=1)
