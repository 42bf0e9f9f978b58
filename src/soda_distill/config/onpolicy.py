"""The sections of the on-policy baselines, whose student learns from its own samples as it trains: GAD, adversarial
with a discriminator as the reward (`gad`), and open-teacher on-policy distillation, which needs the teacher's weights
(`opd`). Both extend `TrainingConfig` with what their sampling and their losses need, and check that the lengths and
batch sizes fit together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import SodaError
from .fields import added, operational
from .training import TrainingConfig


@dataclass
class DiscriminatorConfig:
    """GAD's discriminator: the student's backbone with a scalar head, trained with the Bradley–Terry loss."""

    learning_rate: float = field(default=1e-6, metadata={
        "help": "the discriminator's learning rate, in its warmup and the adversarial phase"})
    warmup_epochs: float = field(default=1.0, metadata={
        "help": "epochs of Bradley–Terry training on pairs.jsonl (teacher vs. q0) before the adversarial phase"})
    only_steps: int = field(default=10, metadata={
        "help": "the first adversarial steps, in which only the discriminator learns"})
    batch_size: int = field(default=8, metadata={
        "help": "(teacher, student) pairs per discriminator forward/backward; must divide the prompts per step"})


@dataclass
class GadConfig(TrainingConfig):
    """GAD (Ye et al., 2025), the fully on-policy adversarial baseline. Defaults: its published recipe (microsoft/LMOps
    `gad/scripts/train/*-lr1e-6.sh`, verl); the TrainingConfig fields are the generator's (GRPO)."""

    section = "gad"
    epochs: float = field(default=2.0, metadata={
        "help": "adversarial epochs over the prompts, after the discriminator warmup"})
    learning_rate: float = field(default=1e-6, metadata={"help": "the generator's peak learning rate"})
    batch_size: int = field(default=8, metadata={"help": "rollouts per forward/backward on each process"})
    gradient_accumulation_steps: int = field(default=256, metadata={
        "help": "forward/backward passes per optimizer step: 8 × 256 = 2048 rollouts a step, 256 prompts × "
                "num_generations"})
    max_length: int = field(default=3584, metadata={
        "help": "most tokens of prompt + rollout (2048 + 1536 published); a prompt leaving no room for max_new_tokens "
                "is dropped"})
    lr_scheduler: str = field(default="constant", metadata={
        "help": "the generator's learning-rate schedule, as transformers names it"})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "the share of the optimizer steps over which the learning rate rises to its peak: at least 0, below 1"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW's weight decay, both networks (verl's default)"})
    max_grad_norm: float = field(default=0.2, metadata={
        "help": "the gradients are clipped to this global L2 norm, both networks"})
    gradient_checkpointing: bool = operational(True, help=(
        "recompute activations in the backward pass instead of keeping them: less memory, more compute"))
    num_generations: int = field(default=8, metadata={
        "help": "rollouts per prompt: the GRPO group, rewards normalized within it; at least 2, and a divisor of "
                "batch_size × gradient_accumulation_steps"})
    temperature: float = field(default=0.8, metadata={"help": "the rollouts' sampling temperature"})
    max_new_tokens: int = field(default=1536, metadata={
        "help": "most tokens per rollout, below max_length; teacher and q0 answers are cut to this for the "
                "discriminator"})
    beta: float = field(default=0.001, metadata={
        "help": "weight of the KL to the starting generator (low-variance k3 estimator) added to the loss"})
    entropy_coef: float = field(default=0.0, metadata={
        "help": "weight of the rollouts' mean token entropy, a bonus subtracted from the loss (TRL's entropy_coef); "
                "0: none"})
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig, metadata={
        "help": "the discriminator's own settings; its weight decay and gradient clipping are the generator's",
        "keyed_flat": True})  # nested after runs were keyed with its keys flat (discriminator_*): keyed so still
    vllm: str | None = added(None, help=(
        "rollouts through vLLM (TRL's integration; vllm installed): \"colocate\" (in each training process) or "
        "\"server\" (`trl vllm-serve` running beside the trainers); null: transformers' generate"))
    vllm_server_base_url: str | None = added(None, help="server mode's URL; null: TRL's default, http://localhost:8000")
    vllm_gpu_memory_utilization: float = added(0.3, help="colocate mode: the share of GPU memory vLLM may take")

    def __post_init__(self):
        super().__post_init__()
        if self.vllm not in (None, "colocate", "server"):
            raise SodaError(f"gad.vllm: {self.vllm!r} is not a mode (colocate, server, or null for transformers)")
        rollouts = self.batch_size * self.gradient_accumulation_steps
        if self.num_generations < 2:
            raise SodaError("gad.num_generations must be at least 2: GRPO normalizes each reward within its prompt's group")
        if rollouts % self.num_generations:
            raise SodaError(f"gad.batch_size × gad.gradient_accumulation_steps ({rollouts} rollouts a step) must be a "
                            f"multiple of gad.num_generations ({self.num_generations})")
        if self.prompts_per_step % self.discriminator.batch_size:
            raise SodaError(f"gad.discriminator.batch_size ({self.discriminator.batch_size}) must divide the prompts per "
                            f"step (batch_size × gradient_accumulation_steps / num_generations = {self.prompts_per_step})")
        if self.max_new_tokens >= self.max_length:
            raise SodaError(f"gad.max_new_tokens ({self.max_new_tokens}) must be below gad.max_length ({self.max_length}), "
                            "which also holds the prompt")

    @property
    def prompts_per_step(self) -> int:
        """Prompts per optimizer step, each with num_generations rollouts; a discriminator warmup step takes as many pairs."""
        return self.batch_size * self.gradient_accumulation_steps // self.num_generations


@dataclass
class OpdConfig(TrainingConfig):
    """Open-teacher on-policy distillation (`--method opd`, TRL's DistillationTrainer): the student samples answers, and
    learns the teacher's next-token distribution at every token of them."""

    section = "opd"
    teacher_model: str | None = field(default=None, metadata={
        "help": "the teacher: a local model folder (or `embedded`) sharing the student's tokenizer"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "run the Python code the teacher's model folder ships (as student.trust_remote_code)"})
    teacher_bf16: bool | None = added(None, help=(
        "the teacher's weights in bf16 (half the memory); null: where the student trains in bf16"))
    learning_rate: float = field(default=1e-6, metadata={"help": "the student's peak learning rate (TRL's default)"})
    beta: float = field(default=1.0, metadata={
        "help": "the generalized JSD's interpolation, 0 to 1: 0 forward KL, 1 reverse KL, 0.5 JSD"})
    temperature: float = field(default=1.0, metadata={
        "help": "of the student's samples and of both distributions in the loss"})
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens per sampled answer, below max_length"})
    max_length: int = field(default=1024, metadata={
        "help": "most tokens of prompt + answer; a prompt leaving no room for max_new_tokens is dropped"})
    overlap_k: int = operational(16, help="token-overlap diagnostics on the top k tokens at each logging step; 0: off")
    overlap_states: int = operational(64, help="the sampled student states they are measured on, per logging step")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.beta <= 1:
            raise SodaError(f"opd.beta must be between 0 (forward KL) and 1 (reverse KL), got {self.beta}")
        if self.max_new_tokens >= self.max_length:
            raise SodaError(f"opd.max_new_tokens ({self.max_new_tokens}) leaves no room for a prompt in opd.max_length "
                            f"({self.max_length})")
