"""How a config key is declared: every field of a section carries its help in its metadata (`help`), which the config
reference (docs/reference/config.md, by scripts/render_reference.py) prints; `operational` marks a key that changes
how fast or how safely a stage runs, not what it produces, and `added` a key added after runs were made with its
section. Both marks decide what `fingerprint` hashes, so they never change for an existing key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field


def operational(default, help: str | None = None):
    """A key that changes how fast or how safely a stage runs, not what it produces: left out of the fingerprint, so
    it may change between a run and its resumption."""
    return field(default=default, metadata={"operational": True, **({"help": help} if help else {})})


def added(default, original=dataclasses.MISSING, help: str | None = None):
    """A key added after runs were made with this section: at the value those runs had (`original`, if the default
    has changed since) it is left out of the fingerprint, so a stage they finished still matches."""
    metadata = {"added": True, **({} if original is dataclasses.MISSING else {"original": original})}
    return field(default=default, metadata={**metadata, **({"help": help} if help else {})})


def section(cls, help: str):
    """A section of the config, its defaults those of `cls`."""
    return field(default_factory=cls, metadata={"help": help})


# Counts a stage loops over or divides by, in any section: below 1 they would fail deep inside a library. (Counts
# where 0 means "none", such as gad.discriminator.only_steps or opd.overlap_k, are not among them.)
AT_LEAST_ONE = {"batch_size", "precompute_batch_size", "gradient_accumulation_steps", "concurrency", "max_length",
                "max_new_tokens", "max_tokens", "save_steps", "logging_steps", "num_generations", "evals_per_epoch",
                "patience", "bins"}


def field_help(cls, name: str) -> str:
    """The help of the key `name` of the section `cls`: its field's own, or where a subclass redefines the field
    without help, that of the nearest base class giving it ("" if none does); "at least 1" added for a count."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            text = f.metadata["help"]
            return text + ("; at least 1" if name in AT_LEAST_ONE and "at least 1" not in text else "")
    return ""


def config_keys(section, prefix: str = ""):
    """Every key of a config (or one section of it), nested sections walked: (`section.key`, its value, its help,
    whether it is operational)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from config_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, field_help(type(section), f.name), bool(f.metadata.get("operational"))
