"""One typed config for a whole run, loaded from YAML with `section.key=value` overrides from the command line.

Fields marked `operational` change how fast or how safely a stage runs, not what it produces, so changing them
between a run and its resumption is allowed; changing any other field of a finished stage is refused. Every field
carries its help in its metadata (`help`), from which docs/reference/config.md is rendered. The sections live in
`inputs` (student, data, snapshot, pairs), `endpoints` (teacher, evaluation endpoints), `training` (the shared
trainer settings, trackers, warmup, seqkd, distill), `onpolicy` (gad, opd) and `evaluation` (evaluate, check,
compare, analyze); `loading` holds `Config` and `load_config`, `saved` what a run keeps (the saved config,
fingerprints) and `fields` how a key is declared. Every name is imported from here.
"""

from .endpoints import EndpointConfig, JudgeConfig, ReferenceConfig, ScoredEndpointConfig, TeacherConfig
from .evaluation import EVALUATE_PRESETS, AnalyzeConfig, CheckConfig, CompareConfig, EvaluateConfig
from .fields import added, config_keys, field_help, operational
from .inputs import (COLUMNS, REJECTED_SOURCES, TRUNCATED, DataConfig, LoraSettings, PairsConfig, SnapshotConfig,
                     StudentConfig)
from .loading import MAX_CONFIG_BYTES, Config, load_config, parse_overrides
from .onpolicy import GadConfig, OpdConfig
from .saved import fingerprint, redact_url, save_config, to_dict
from .training import DistillConfig, SeqKDConfig, TrackersConfig, TrainingConfig, WarmupConfig

__all__ = [
    "COLUMNS", "EVALUATE_PRESETS", "MAX_CONFIG_BYTES", "REJECTED_SOURCES", "TRUNCATED",
    "AnalyzeConfig", "CheckConfig", "CompareConfig", "Config", "DataConfig", "DistillConfig", "EndpointConfig",
    "EvaluateConfig", "GadConfig", "JudgeConfig", "LoraSettings", "OpdConfig", "PairsConfig", "ReferenceConfig",
    "ScoredEndpointConfig", "SeqKDConfig", "SnapshotConfig", "StudentConfig", "TeacherConfig", "TrackersConfig",
    "TrainingConfig", "WarmupConfig",
    "added", "config_keys", "field_help", "fingerprint", "load_config", "operational", "parse_overrides", "redact_url", "save_config",
    "to_dict",
]
