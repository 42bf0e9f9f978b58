"""soda-distill: SODA (Semi On-policy Distillation with Alignment) for black-box LLM distillation."""

from .analyze import analyze, analyze_runs
from .config import Config, load_config
from .distill import run_distill
from .errors import InputError, SodaError
from .evaluate import run_evaluate
from .gad import run_gad
from .manifest import RunDir
from .pairs import run_pairs
from .pipeline import prepare, run_all
from .report import write_report
from .snapshot import run_snapshot
from .teacher import run_teacher
from .warmup import run_warmup

__version__ = "0.1.0"
__all__ = [
    "Config", "InputError", "RunDir", "SodaError", "load_config", "prepare", "run_all",
    "run_teacher", "run_snapshot", "run_pairs", "run_warmup", "run_distill",
    "run_gad", "run_evaluate", "analyze", "analyze_runs", "write_report",
]
