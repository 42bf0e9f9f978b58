"""What a run keeps of its config: `config.yaml`, written with every URL's credentials redacted (`redact_url`), and
the fingerprint of each section, the hash of the fields that change a stage's results, which decides whether a
finished stage still matches the config it is resumed with. Fingerprints of runs already on disk must keep matching:
a key's name, value and `operational`/`added` marks are what is hashed, its help never.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path

import yaml

from ..records import atomic_write_text

if typing.TYPE_CHECKING:
    from .loading import Config


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
    return hashlib.sha256(json.dumps(_hashed(section), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _hashed(section, prefix: str = "") -> dict:
    kept = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("keyed_flat"):  # a section nested after runs were keyed with its keys flat, as name_key
            kept.update(_hashed(value, f"{prefix}{f.name}_"))
        elif not f.metadata.get("operational") and not (
                f.metadata.get("added") and value == f.metadata.get("original", _default(f))):
            kept[prefix + f.name] = _redacted(value)
    return kept
