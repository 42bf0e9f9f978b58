"""The private internals of TRL and transformers this package overrides or relies on, where they offer no public hook.

Each entry names the library object, what this package does with it and why, and what it was written against: the
parameters of the method, and that the library itself still calls it. `check_internals()` compares every entry with
the installed libraries (tests/test_internals.py runs it), so an upgrade that moves one fails naming the override
instead of silently training differently; pyproject.toml pins the versions it was tested with.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, is_dataclass
from dataclasses import fields as dataclass_fields

TESTED = {"trl": "1.16", "transformers": "5.25"}  # the minor versions these entries were checked against


@dataclass(frozen=True)
class Internal:
    owner: str  # "module:Class" of the library
    name: str  # the private attribute
    used_by: str  # where this package relies on it
    why: str
    parameters: tuple[str, ...] | None = None  # a method's parameters as written against; None: not a method
    called_as: str | None = None  # text the source of the owner or its bases must contain: the library calls it so
    fields: tuple[str, ...] | None = None  # for a dataclass: the fields this package fills

    @property
    def label(self) -> str:
        return f"{self.owner.split(':')[1]}.{self.name}" if self.name else self.owner.split(":")[1]


INTERNALS = (
    Internal("trl:DPOTrainer", "_precompute_ref_logps", "stages.distill.DistillDPOTrainer",
             "the reference pass under the training forward (CPU head, bf16 autocast): step 0 starts at ratio 1",
             ("self", "dataset", "name", "batch_size"), "self._precompute_ref_logps("),
    Internal("trl:DPOTrainer", "_prepare_dataset", "stages.distill.DistillDPOTrainer",
             "takes pairs already tokenized (a cut answer without its end of turn) as they are; TRL always tokenizes",
             ("self", "dataset", "processing_class", "args", "dataset_name"), "self._prepare_dataset("),
    Internal("transformers:Trainer", "_get_train_sampler", "training.ResumableOrder",
             "a training order that a resumed run repeats, and length buckets that group on small data",
             ("self", "train_dataset"), "sampler_fn=self._get_train_sampler"),
    Internal("transformers:Trainer", "_run_epoch", "training.ResumableOrder",
             "sets the training order's epoch, which a resumed epoch's loader under several processes does not reach",
             ("self", "model", "epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch", "trial",
              "ignore_keys_for_eval", "start_time", "resume_from_checkpoint", "epochs_trained",
              "steps_trained_in_current_epoch"), "self._run_epoch("),
    Internal("transformers:Trainer", "current_gradient_accumulation_steps", "teacher_logprobs.TeacherKLTrainer",
             "the grey-box top-k term takes its share of an optimizer step as the SFT loss does: divided by the "
             "accumulation steps only where transformers no longer divides the token-normalized loss",
             called_as="self.model_accepts_loss_kwargs and num_items_in_batch is not None"),
    Internal("trl.trainer.utils:FusedCausalLMOutput", "", "cpu.lm_head.add_cpu_lm_head",
             "the output of TRL's fused LM head, which this package's CPU head returns in its place",
             fields=("loss", "log_probs", "entropy", "mean_logits", "is_top1", "label_mask")),
    Internal("trl:DPOTrainer", "", "cpu.lm_head.add_cpu_lm_head",
             "TRL calls the model with fused_lm_head=True, the call this package's CPU head answers",
             called_as="fused_lm_head=True"),
    Internal("trl:GRPOTrainer", "", "stages.gad.GadTrainer",
             "GAD's rollouts are drawn by this package's sampler through the model's generate, which it replaces: "
             "TRL must roll out through that generate, else every rollout would be greedy",
             called_as="unwrapped_model.generate("),
)


def check(internal: Internal) -> str | None:
    """What no longer holds for this entry in the installed libraries, or None."""
    module, _, attr = internal.owner.partition(":")
    try:
        owner = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        return f"{internal.owner} is gone ({e})"
    if internal.parameters is not None:
        method = getattr(owner, internal.name, None)
        if method is None:
            return f"{internal.owner} has no {internal.name}"
        found = tuple(inspect.signature(method).parameters)
        if found != internal.parameters:
            return f"{internal.name} now takes {found}, not {internal.parameters}"
    if internal.called_as is not None:
        sources = [inspect.getsource(c) for c in inspect.getmro(owner) if c.__module__.split(".")[0] in TESTED]
        if not any(internal.called_as in source for source in sources):
            return f"{internal.owner}'s source no longer contains {internal.called_as!r}"
    if internal.fields is not None:
        have = {f.name for f in dataclass_fields(owner)} if is_dataclass(owner) else set()
        if missing := [f for f in internal.fields if f not in have]:
            return f"{internal.owner} has no field {', '.join(missing)}"
    return None


def check_internals() -> list[str]:
    """One line per entry that no longer holds, naming the override that relies on it; [] when all hold."""
    problems = []
    for internal in INTERNALS:
        problem = check(internal)
        if problem:
            problems.append(f"{internal.used_by} overrides or relies on {internal.label} ({internal.why}): {problem}")
    return problems
