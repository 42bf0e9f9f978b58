"""Per-token log-probabilities for training on CPU: only the positions that are scored, a chunk of tokens at a time.

TRL's SFT and DPO trainers patch the model with a fused LM head that never materializes the (batch, length, vocab)
logits. Off CUDA its fallback scores every position, prompt and padding included, and folds each tile into its
statistics in a dozen full-size fp32 passes: on this CPU that head took about 40% of an SFT step for about 20% of
its FLOPs. This head scores only the positions whose label counts, computes each chunk's logits with one bf16 GEMM
under autocast, folds them in a few in-place passes and recomputes them in backward. It returns what TRL's head
returns: log-probabilities with gradients, and the entropy, mean logit and top-1 hit for the metrics (no gradient:
the SFT and DPO losses do not use them).
"""

from __future__ import annotations

import functools
import types

import torch

CHUNK_TOKENS = 1024  # a (1024, vocab) fp32 tile is 200 MB for a 49k vocabulary

# Config attributes that change the logits after the projection; a model with any of them keeps TRL's head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


class ChunkedLogProbs(torch.autograd.Function):
    """log p(target) of `hidden @ weight.T` for each row of `hidden`, plus entropy, mean logit and top-1 (no grad)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        n = hidden.shape[0]
        log_z, target_z, entropy, mean_logits = (hidden.new_empty(n, dtype=torch.float32) for _ in range(4))
        is_top1 = torch.empty(n, dtype=torch.bool, device=hidden.device)
        with torch.autocast("cpu", enabled=False):
            w = weight.to(dtype)
            for s in range(0, n, chunk_tokens):
                e, t = min(s + chunk_tokens, n), targets[s : s + chunk_tokens]
                z = (hidden[s:e].to(dtype) @ w.t()).float()
                torch.logsumexp(z, -1, out=log_z[s:e])
                target_z[s:e] = z.gather(1, t[:, None]).squeeze(1)
                mean_logits[s:e] = z.mean(-1)
                is_top1[s:e] = z.argmax(-1) == t  # the first maximum, as TRL counts a tie
                p = (z - log_z[s:e, None]).exp_()
                entropy[s:e] = log_z[s:e] - torch.linalg.vecdot(p, z)
        ctx.save_for_backward(hidden, weight, targets, log_z)
        ctx.dtype, ctx.chunk_tokens = dtype, chunk_tokens
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1)
        return target_z - log_z, entropy, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, *_):
        hidden, weight, targets, log_z = ctx.saved_tensors
        dtype, n = ctx.dtype, hidden.shape[0]
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with torch.autocast("cpu", enabled=False):
            w = weight.to(dtype)
            for s in range(0, n, ctx.chunk_tokens):
                e = min(s + ctx.chunk_tokens, n)
                h, g_out = hidden[s:e].to(dtype), grad_log_probs[s:e, None].float()
                # d log p_t / dz = onehot(t) - softmax(z), scaled by the incoming gradient; in place on one tile
                g = (h @ w.t()).float().sub_(log_z[s:e, None]).exp_().mul_(-g_out)
                g.scatter_add_(1, targets[s:e, None], g_out)
                g = g.to(dtype)
                grad_hidden[s:e] = g @ w
                # a bf16 product per chunk summed in fp32: the precision of gradient accumulation under autocast
                grad_weight += g.t() @ h
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None


def add_cpu_lm_head(model, chunk_tokens: int = CHUNK_TOKENS) -> bool:
    """Route `model(..., fused_lm_head=True)` (TRL's call) through this head when the model trains on CPU.

    Models this head does not cover (a biased or scaled head, MoE auxiliary losses, pre-shifted labels) keep TRL's.
    Returns whether the head was installed."""
    if getattr(model, "_soda_cpu_lm_head", False):
        return True
    config = model.config.get_text_config()
    lm_head = model.get_output_embeddings()
    if (model.device.type != "cpu" or lm_head is None or getattr(lm_head, "bias", None) is not None
            or getattr(config, "output_router_logits", False)
            or any(getattr(config, a, None) is not None for a in _LOGIT_TRANSFORMS)):
        return False
    from trl.trainer.utils import FusedCausalLMOutput

    trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        per_token = ChunkedLogProbs.apply(hidden[mask], self.get_output_embeddings().weight, labels[mask], chunk_tokens)
        # `masked_scatter` keeps an all-masked batch connected to the graph (a zero loss that still backpropagates)
        log_probs, entropy, mean_logits, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denominator, log_probs=log_probs, entropy=entropy,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model._soda_cpu_lm_head = True
    return True
