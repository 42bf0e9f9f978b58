"""What makes training fast on a CPU, switched on in one place (`apply_cpu_settings`); a trainer on a GPU is left as
TRL configures it.

    lm_head.py         log-probabilities of the scored positions only, a chunk of tokens at a time
    master_weights.py  bf16 weights with fp32 masters (`MasterWeightsAdamW`), chosen by `adamw_for`
    memory.py          glibc giving freed memory back (`return_freed_memory`)
"""

from __future__ import annotations

from ..models import transformers_model
from .lm_head import add_cpu_lm_head
from .master_weights import MasterWeightsAdamW, adamw_for, bf16_weights, weights_to
from .memory import return_freed_memory

__all__ = ["MasterWeightsAdamW", "adamw_for", "add_cpu_lm_head", "apply_cpu_settings", "bf16_weights",
           "return_freed_memory", "weights_to"]


def apply_cpu_settings(trainer):
    """This package's settings for an SFT or DPO trainer that trains on CPU: the LM head of `lm_head.py`, glibc
    giving freed memory back (`return_freed_memory`) and `bf16_weights`. Idempotent: TRL's DPO trainer needs it
    applied from inside its constructor."""
    if trainer.model.device.type != "cpu":
        return trainer
    if not getattr(trainer, "use_weighting", False):  # WPO weights need log Σp², which only TRL's head returns
        add_cpu_lm_head(transformers_model(trainer.model))
    return_freed_memory()
    return bf16_weights(trainer)
