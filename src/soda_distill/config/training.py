"""The training settings every trainer shares (`TrainingConfig`, TRL's trainer arguments), the experiment trackers
(`training`), and the sections of the offline training stages built on them: the SFT warmup q0 → q_w (`warmup`),
the SeqKD baseline (`seqkd`) and SODA's DPO from q_w (`distill`). The on-policy baselines are in `onpolicy.py`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from ..errors import SodaError
from .fields import added, operational
from .inputs import _check_truncated


# transformers 5's SchedulerType and TRL 1.16's DPO loss types (tests/test_config.py checks them against both)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class TrainingConfig:
    section: typing.ClassVar[str] = "training"  # its name in the config, for error messages
    epochs: float = field(default=1.0, metadata={"help": "passes over the training data; fractions of one allowed"})
    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW's peak learning rate"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward/backward on each process"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "forward/backward passes per optimizer step: a step sees batch_size × this × processes examples"})
    max_length: int = field(default=1024, metadata={
        "help": "most tokens of prompt + answer in a training sequence; TRL cuts a longer one to it"})
    lr_scheduler: str = field(default="cosine", metadata={
        "help": "the learning-rate schedule after its warm-up steps, as transformers names it: cosine, linear, ..."})
    warmup_ratio: float = field(default=0.1, metadata={
        "help": "the share of the optimizer steps over which the learning rate rises from 0 to its peak: at least 0, "
                "below 1"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "the gradients are clipped to this global L2 norm before each update"})
    seed: int = field(default=42, metadata={"help": "the training seed: data order, dropout, new weights"})
    gradient_checkpointing: bool = operational(False, help=(
        "recompute activations in the backward pass instead of keeping them: less memory, more compute"))
    save_steps: int = operational(50, help=(
        "optimizer steps between checkpoints, which a killed stage resumes from (the latest one kept)"))
    logging_steps: int = operational(1, help=(
        "optimizer steps between the metrics written to metrics.jsonl and the trackers"))

    def __post_init__(self):
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise SodaError(f"{self.section}.lr_scheduler: {self.lr_scheduler!r} is not one of transformers' "
                            f"({', '.join(LR_SCHEDULERS)})")
        if not 0 <= self.warmup_ratio < 1:
            raise SodaError(f"{self.section}.warmup_ratio must be at least 0 and below 1 (a fraction of the optimizer "
                            f"steps), got {self.warmup_ratio}")


@dataclass
class TrackersConfig:
    """Experiment trackers (`trackers.report_to`) for every training stage, as transformers names them: tensorboard,
    wandb, trackio, mlflow, ... (each installed separately). Runs are named RUNDIR/STAGE; TensorBoard writes to
    RUNDIR/tensorboard/, soda's own stage figures and evaluation tables beside the trainers' curves."""

    report_to: list[str] = field(default_factory=list, metadata={
        "operational": True, "help": "the trackers, as transformers names them (tensorboard, wandb, ...); []: none"})
    project: str = operational("soda-distill", help="the project name where the tracker has one (trackio, wandb)")

    def __post_init__(self):
        if not self.report_to:
            return
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        unknown = [name for name in self.report_to if name not in INTEGRATION_TO_CALLBACK]
        if unknown:
            raise SodaError(f"trackers.report_to: {unknown[0]!r} is not a tracker transformers knows "
                            f"(known: {', '.join(sorted(INTEGRATION_TO_CALLBACK))})")


@dataclass
class WarmupConfig(TrainingConfig):
    section = "warmup"
    epochs: float = field(default=3.0, metadata={
        "help": "passes over the teacher's answers; 3, SeqKD's epoch cap, since the paper calls SeqKD \"equivalent to "
                "the warmup phase of SODA\""})
    learning_rate: float = field(default=5e-6, metadata={"help": "the SFT's peak learning rate (GAD's SeqKD one)"})
    truncated: str = added("open", help=(
        "a teacher answer cut at its token limit: \"open\" trains its text with no end of turn after it, \"drop\" "
        "leaves it out (as pairs.truncated_chosen)"))
    teacher_kl: float = added(0.0, help=(
        "grey-box teachers (teacher.top_logprobs): λ × the cross-entropy to the teacher's top-k distribution at each "
        "answer token whose tokens are the student's, added to the SFT loss; 0: the text alone"))

    def __post_init__(self):
        super().__post_init__()
        _check_truncated(self.section, "truncated", self.truncated)


@dataclass
class SeqKDConfig(WarmupConfig):
    """SeqKD, the baseline: SFT on the teacher's answers run to its best point, the step of least loss on teacher
    answers held out from its training (`heldout`), evaluated `evals_per_epoch` times an epoch."""

    section = "seqkd"
    epochs: float = field(default=3.0, metadata={
        "help": "passes over the teacher's answers at most: it stops once `patience` evaluations in a row have not "
                "lowered the held-out loss"})
    heldout: float = field(default=0.1, metadata={
        "help": "the share of the teacher's answers held out (a seeded draw, at least one), never trained on: above "
                "0, below 1"})
    evals_per_epoch: int = field(default=4, metadata={
        "help": "held-out loss evaluations an epoch, each with a checkpoint; at least 1"})
    patience: int = field(default=2, metadata={
        "help": "evaluations in a row without a lower held-out loss after which training stops; at least 1"})

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.heldout < 1:
            raise SodaError(f"seqkd.heldout must be above 0 and below 1 (a fraction of the teacher answers), got {self.heldout}")


@dataclass
class DistillConfig(TrainingConfig):
    section = "distill"
    learning_rate: float = field(default=5e-7, metadata={"help": "DPO's peak learning rate"})
    beta: float = field(default=0.1, metadata={
        "help": "DPO's β: how strongly the policy is held to the reference q_w (higher: closer)"})
    loss_type: str | list[str] = field(default="sigmoid", metadata={
        "help": "any TRL DPO loss type, or several summed with loss_weights: [sigmoid, sft] is RPO (DPO plus the "
                "chosen answers' NLL)"})
    loss_weights: list[float] | None = added(None, help="one weight per loss type; null: 1 each")
    use_weighting: bool = added(False, help=(
        "WPO's weighting of each pair by the policy's probability of it (TRL's use_weighting)"))
    ld_alpha: float | None = added(None, help=(
        "LD-DPO: each answer's tokens past the shorter answer's length count α times, 0 to 1 (1: DPO; 0: only the "
        "shared length); null: plain DPO; not with refresh_every or select"))
    refresh_every: int | None = added(None, help=(
        "the on-policy dial: every k optimizer steps, the rejected answers of the next k steps' pairs generated again "
        "by the student as it then is (sampled as the snapshot); null: q0's answers throughout (SODA); 1: on-policy "
        "DPO"))
    select: str | None = added(None, help=(
        "teacher-aligned selection (stages/selection.py): DPO on the pairs in select_band of a ranking, from q_w's "
        "reference pass, by \"teacher_nll\" (its per-token NLL of the teacher's answer, lowest first), \"margin\" (how "
        "far it still prefers q0's answer, least first) or \"random\" (a seeded draw); null: every pair"))
    select_band: list[float] = field(default_factory=lambda: [0.0, 0.5], metadata={
        "added": True,
        "help": "[lo, hi], 0 ≤ lo < hi ≤ 1: the band of the `select` ranking kept, as fractions of it ([0, 0.5]: the "
                "first half)"})
    precompute_batch_size: int = operational(16, help=(
        "pairs per batch of the reference pass, which computes q_w's log-probabilities of every pair before training"))

    def __post_init__(self):
        super().__post_init__()
        losses = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if unknown := [loss for loss in losses if loss not in DPO_LOSS_TYPES]:
            raise SodaError(f"distill.loss_type: {unknown[0]!r} is not one of TRL's ({', '.join(DPO_LOSS_TYPES)})")
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise SodaError(f"distill.loss_weights: {len(self.loss_weights)} weights for {len(losses)} loss types")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise SodaError(f"distill.ld_alpha must be between 0 and 1 (null: plain DPO), got {self.ld_alpha}")
        if self.select is not None and self.select not in ("teacher_nll", "margin", "random"):
            raise SodaError(f"distill.select: expected teacher_nll, margin or random (null: every pair), got {self.select!r}")
        lo, hi = self.select_band if len(self.select_band) == 2 else (None, None)
        if lo is None or not 0 <= lo < hi <= 1:
            raise SodaError(f"distill.select_band: expected [lo, hi] with 0 ≤ lo < hi ≤ 1, got {self.select_band}")
        if self.refresh_every is not None and self.refresh_every < 1:
            raise SodaError(f"distill.refresh_every must be at least 1 (optimizer steps; null: never), got {self.refresh_every}")
        # LD-DPO weighs both answers by their shared length: a new rejected answer would change the chosen answer's
        # reference term, and the selection scores would no longer be per-token figures.
        for key in ("refresh_every", "select"):
            if self.ld_alpha is not None and getattr(self, key) is not None:
                raise SodaError(f"distill.ld_alpha cannot be combined with distill.{key} (LD-DPO weighs both answers "
                                f"by their shared length); set one of them to null")
