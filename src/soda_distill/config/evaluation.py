"""The sections of the commands that measure models rather than train them: `evaluate` (the rows, the benchmarks, the
answers' decoding, and its reference and judge endpoints), `check` (the before/after `soda-distill run` ends with),
`compare` (the methods and seeds trained side by side) and `analyze` (the representation analysis), with the
evaluation presets `evaluate.preset` names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import SodaError
from .endpoints import JudgeConfig, ReferenceConfig
from .fields import added, operational, section

# Every evaluation setting the paper states (Appendix B): greedy answers of at most 1536 tokens, GPT-4o as the
# reference and the judge, the judge prompt of Ye et al. (GAD), which is FastChat's pairwise review prompt.
# `evaluate.preset: paper` applies them under whatever the config and the command line set themselves.
EVALUATE_PRESETS = {
    "paper": {"max_new_tokens": 1536, "prompt_format": "chat",
              "reference": {"model": "gpt-4o", "max_tokens": 1536}, "judge": {"model": "gpt-4o", "template": "fastchat"}},
}


@dataclass
class EvaluateConfig:
    preset: str | None = field(default=None, metadata={
        "help": "\"paper\": every setting the paper states (Appendix B: greedy answers of at most 1536 tokens in the "
                "chat format, GPT-4o as the reference and the judge with FastChat's prompt), under those this config "
                "sets itself; null: none"})
    runs: list[str] = field(default_factory=list, metadata={
        "help": "run directories; each gives Base and its finished methods (SeqKD, SODA, GAD, ...) as rows"})
    models: dict[str, str] = field(default_factory=dict, metadata={
        "help": "more rows, \"Model/Method\": a model (folder or Hub id) or a .jsonl (.jsonl.gz) of responses"})
    methods: list[str] | None = added(None, help=(
        "which methods of each run are rows (registry names: base, warmup, seqkd, soda, gad, opd); null: every "
        "finished one"))
    paired_with: dict[str, list[str]] = field(default_factory=dict, metadata={
        "operational": True,
        "help": "more paired differences than each row's own baselines: method → the methods it is also compared "
                "with, in each model (seed) that has both, e.g. {\"SODA (refresh4)\": [\"SODA\"]}; no answer changes"})
    benchmarks: list[str] = field(default_factory=lambda: ["dolly", "selfinst", "vicuna"], metadata={
        "help": "the benchmark columns, in order: dolly, selfinst, vicuna (shipped with the package), builtin:NAME, "
                "or the path of a `messages` JSONL"})
    lmsys: str | None = field(default=None, metadata={
        "help": "a JSONL of held-out LMSYS-style chat prompts, which when set is the first column (LMSYS); null: none"})
    limit: int | None = field(default=None, metadata={
        "help": "only the first N prompts of each benchmark; null: all"})
    prompt_format: str = field(default="chat", metadata={
        "help": "\"chat\": the prompt through the student's chat template, as its instruct training and this "
                "package's SFT/DPO present it (the paper's students are instruct models); \"alpaca\": MiniLLM's "
                "Alpaca layout, for base models"})
    max_new_tokens: int = field(default=256, metadata={
        "help": "most tokens of each answer, always decoded greedily; the paper's 1536 with `preset: paper`"})
    nll_dtype: str = added("float32", original="student", help=(
        "the dtype the reference NLL is scored in: \"float32\", or \"student\" (the student's, bf16 where it trains "
        "in bf16). bf16 scoring shrinks every fine-tuning effect on NLL by about a fifth: docs/results/precision.md"))
    backend: str = field(default="transformers", metadata={
        "help": "what generates the answers: \"transformers\", or \"vllm\" when installed"})
    exact_match_max_words: int = field(default=5, metadata={
        "help": "exact match is scored on the references of at most this many words"})
    batch_size: int = operational(16, help="prompts generated together (transformers backend)")
    reference: ReferenceConfig = section(ReferenceConfig,
                                         "the reference model's endpoint, whose answers the judge compares each row's with")
    judge: JudgeConfig = section(JudgeConfig, "the LLM judge's endpoint")

    def __post_init__(self):
        if self.nll_dtype not in ("float32", "student"):
            raise SodaError(f"evaluate.nll_dtype: expected \"float32\" or \"student\", got {self.nll_dtype!r}")


@dataclass
class CheckConfig:
    """The before/after `soda-distill run` ends with (evaluation/check.py): Base and the distilled model on a few
    held-out prompts. `limit: 0` leaves it out."""

    prompts: str = field(default="builtin:dolly_heldout", metadata={
        "help": "chat prompts with reference answers, never trained on: builtin:NAME or a JSONL path"})
    limit: int = field(default=20, metadata={
        "help": "the first N prompts are read, those with a reference answer measured; 0: no before/after"})
    max_new_tokens: int = field(default=128, metadata={
        "help": "most tokens of the one greedy answer shown from each model"})


@dataclass
class CompareConfig:
    """`soda-distill compare`: the methods to train and evaluate side by side, once per seed."""

    methods: list[str] = field(default_factory=lambda: ["base", "seqkd", "soda", "gad"], metadata={
        "help": "the methods, as the registry names them: base (the untrained student), warmup, seqkd, soda, gad, opd"})
    seeds: list[int] = field(default_factory=lambda: [42], metadata={
        "help": "one or more distinct seeds, a run each: its seed for q0's sampling and every training stage"})

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) < len(self.seeds):
            raise SodaError(f"compare.seeds: give one or more distinct seeds, got {self.seeds}")


@dataclass
class AnalyzeConfig:
    """Representation analysis (`soda-distill analyze`): which held-out prompts the models read, and how."""

    prompts: str = field(default="builtin:dolly_heldout", metadata={
        "help": "chat prompts (`messages` or `prompt` JSONL, or builtin:NAME), never trained on"})
    limit: int | None = field(default=200, metadata={
        "help": "only the first N prompts: the paper's 200 (dolly_heldout has 100); null: all"})
    max_length: int = field(default=512, metadata={
        "help": "most prompt tokens read; a longer prompt loses its beginning"})
    bins: int = field(default=100, metadata={"help": "equal-width histogram bins for the activation entropy"})
    batch_size: int = operational(8, help="prompts per forward pass")
