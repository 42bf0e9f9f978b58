"""Several processes (`torchrun`, `accelerate launch`): who trains, who writes, who waits.

Every rank trains its share of a training stage (the trainers' own DDP, FSDP or DeepSpeed through accelerate); the
other stages — the teacher, the snapshot, the pairs, evaluation — run on the main process while the others wait,
and then find them finished. Only the main process writes the run directory: the manifest, config, metrics and
models. Launched as one process, all of this is a no-op. The run directory must be on a file system every node sees.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from datetime import timedelta

# A rank waits while the main process runs a whole stage (a snapshot or an evaluation can take hours on CPU);
# torch's default of 30 minutes would end the run.
WAIT = timedelta(hours=48)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def sharded_weights() -> bool:
    """Whether each rank holds only a shard of the weights (FSDP, ZeRO-3): it cannot run the model alone."""
    return zero_stage() == 3 or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def zero_stage() -> int | None:
    """DeepSpeed's ZeRO stage where `accelerate launch` was given a DeepSpeed config, else None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0"))


def start() -> None:
    """Join the launcher's process group (gloo on CPU, NCCL on GPU) with a timeout long enough to wait out a stage;
    the trainers then share it. Call before anything else does."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT)
        if zero_stage() is not None and not torch.cuda.is_available():
            # accelerate starts DeepSpeed's communication on GPUs only; a model loaded under ZeRO-3's Init before
            # any engine exists (GRPO's reference model) needs it
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def is_main() -> bool:
    if world_size() == 1:
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def main_first():
    """The main process runs the block first, the others after it (where it is a stage: to find it finished)."""
    if world_size() == 1:
        return nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()

