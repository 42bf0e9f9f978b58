"""soda-distill: SODA (Semi On-policy Distillation with Alignment) for black-box LLM distillation.

The names below load on first use, so that `import soda_distill.report` (or evaluate) pulls in no trainer.
"""

import importlib
import logging

# bitsandbytes (QLoRA), imported by peft wherever installed, warns at import on AVX512-BF16 CPUs that it cannot
# download an optional kernel from the Hub; it falls back to its own, and the warning would open every run's log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
_EXPORTS = {
    "Config": "config", "load_config": "config", "InputError": "errors", "SodaError": "errors", "RunDir": "manifest",
    "METHODS": "registry", "STAGES": "registry", "prepare": "pipeline", "run_all": "pipeline",
    "run_methods": "pipeline", "run_stage": "pipeline",
    "run_teacher": "stages.teacher", "run_snapshot": "stages.snapshot", "run_pairs": "stages.pairs",
    "run_warmup": "stages.warmup", "run_seqkd": "stages.seqkd", "run_distill": "stages.distill", "run_opd": "stages.opd",
    "run_discriminator_warmup": "stages.gad", "run_adversarial": "stages.gad",
    "run_evaluate": "evaluation.evaluate", "analyze": "evaluation.analyze", "analyze_runs": "evaluation.analyze",
    "write_report": "report",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'soda_distill' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
