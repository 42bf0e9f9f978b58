"""bf16 weights with fp32 masters, for training on a CPU: the model computes in bf16 throughout (faster there than
autocast over fp32 weights) while every update is made, and accumulated, in fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers.trainer import OPTIMIZER_NAME

from ..distributed import world_size
from ..errors import SodaError


def bf16_weights(trainer):
    """Train with `adamw_for`'s choice: bf16 weights and fp32 masters where the trainer trains in bf16 on CPU, the
    optimizer then clipping the masters' gradients itself (the bf16 weights, which the trainer clips, hold none);
    `training.StepLog` logs their norm."""
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    if optimizer_cls is not torch.optim.AdamW:
        return trainer
    adamw = adamw_for(trainer.model, trainer.args.bf16)
    if adamw is MasterWeightsAdamW:
        kwargs = {**kwargs, "max_grad_norm": trainer.args.max_grad_norm}
        if getattr(trainer, "ref_model", None) is not None:  # GRPO's frozen reference computes as the policy does
            weights_to(trainer.ref_model, torch.bfloat16)
    trainer.optimizer_cls_and_kwargs = (adamw, kwargs)
    return trainer


def adamw_for(model, bf16: bool) -> type[torch.optim.AdamW]:
    """The AdamW to train `model` with: on CPU in bf16, `MasterWeightsAdamW` (bf16 weights, fp32 masters); otherwise
    AdamW over fp32 weights (under autocast where bf16 is on). Not across processes (the masters take each gradient as
    soon as it is computed, before DDP has averaged it), nor with LoRA (the frozen weights, rounded to bf16, would be
    merged so)."""
    if (not (bf16 and next(model.parameters()).device.type == "cpu") or world_size() > 1
            or hasattr(model, "peft_config")):
        return torch.optim.AdamW
    for p in model.parameters():
        if p.dtype != torch.bfloat16:  # the fp32 value stays with it, for MasterWeightsAdamW's master
            p._soda_fp32 = p.data
    weights_to(model, torch.bfloat16)
    return MasterWeightsAdamW


def weights_to(model, dtype: torch.dtype) -> None:
    """The model's parameters in `dtype`, its buffers left as they are: `model.to` would round the rotary
    embedding's fp32 frequencies too (by up to 0.0014 per position for SmolLM2)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


class MasterWeightsAdamW(torch.optim.AdamW):
    """AdamW over fp32 master copies of a model's weights, which it turns to bf16.

    Under autocast around fp32 weights, every step casts each weight to bf16, runs the residual stream, norms and
    activations in fp32 and casts their gradients back; with bf16 weights the model computes in bf16 throughout, which
    is faster on a CPU (docs/results/precision.md). Each backward's bf16 gradient is added
    into the master's fp32 one as soon as it is complete, so micro-batches of gradient accumulation add up in fp32, and
    the update is made on the masters: at a learning rate of 5e-6 most steps are far below bf16's resolution for a
    weight and would round away. The masters are saved with the optimizer's state, so a resumed run continues from
    them and not from bf16 weights. The gradients live on the masters: given `max_grad_norm` (0: measure only), each
step clips them and keeps their norm in `grad_norm`; without it, clip them with `clip_grad_norm_`.

    The masters are the weights before they were rounded (`adamw_for` keeps them): masters taken from bf16 weights
    all lie on bf16's grid, and every update smaller than half a step of it then never reaches the forward pass (the
    demo's SFT loss plateaued 0.24 nats above fp32's). From fp32 masters, the bf16 weights are what autocast would
    cast them to.
    """

    def __init__(self, params, max_grad_norm: float | None = None, **kwargs):
        self.max_grad_norm, self.grad_norm = max_grad_norm, None
        groups = list(params)
        groups = groups if isinstance(groups[0], dict) else [{"params": groups}]
        self.model_params = [p for group in groups for p in group["params"]]
        super().__init__([{**group, "params": [_master(p) for p in group["params"]]} for group in groups], **kwargs)
        self.masters = [m for group in self.param_groups for m in group["params"]]
        for p in self.model_params:
            p.data = p.data.to(torch.bfloat16)
        for p, master in zip(self.model_params, self.masters):
            if hasattr(p, "_soda_master_hook"):  # an earlier optimizer of the same model
                p._soda_master_hook.remove()
            p._soda_master_hook = p.register_post_accumulate_grad_hook(functools.partial(_accumulate, master))

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_grad_norm is not None:
            self.grad_norm = float(self.clip_grad_norm_(self.max_grad_norm or float("inf")))
        loss = super().step(closure)
        for p, master in zip(self.model_params, self.masters):
            p.copy_(master)
            master.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for master in self.masters:
            master.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.masters, max_norm)

    @torch.no_grad()
    def copy_into(self, model) -> None:
        """The model back in fp32, holding the masters exactly: what a stage saves, so that the progress below bf16's
        resolution is not rounded away at the hand-off to the next stage."""
        weights_to(model, torch.float32)
        for p, master in zip(self.model_params, self.masters, strict=True):
            p.copy_(master)

    def state_dict(self):
        return {**super().state_dict(), "master_weights": self.masters}

    @torch.no_grad()
    def load_masters(self, checkpoint: Path) -> None:
        """The masters a checkpoint saved (its bf16 weights lack their low bits): for the trainer's best model."""
        for master, saved in zip(self.masters, torch.load(checkpoint / OPTIMIZER_NAME, weights_only=True)["master_weights"],
                                 strict=True):
            master.copy_(saved)

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        if "master_weights" not in state_dict:
            raise SodaError("this checkpoint's optimizer state has no fp32 master weights: it was written with bf16 "
                            "off (student.bf16); resume with the setting it was written with, or delete the stage's "
                            "checkpoints to start it again")
        masters = state_dict.pop("master_weights")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for master, saved in zip(self.masters, masters, strict=True):
                master.copy_(saved)


def _master(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master of a weight: the value `adamw_for` kept before rounding it (a tensor no one else holds), else
    a copy of the weight in fp32."""
    kept = param.__dict__.pop("_soda_fp32", None)
    return kept if kept is not None else param.detach().to(torch.float32, copy=True)


@torch.no_grad()
def _accumulate(master: torch.Tensor, param: torch.nn.Parameter) -> None:
    if master.grad is None:
        master.grad = param.grad.float()
    else:
        master.grad.add_(param.grad)
    param.grad = None
