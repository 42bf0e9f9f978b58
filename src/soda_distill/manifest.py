"""The run directory's manifest: versions, input hashes, and per-stage wall time, peak memory and counts.

A stage is finished when the manifest says so; that record is written last (atomically), after its outputs,
so a kill at any point leaves either a finished stage or one that resumes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .distributed import is_main, world_size
from .errors import SodaError
from .records import atomic_write_text, source_digest
from .registry import STAGES, finished, trained_models

PACKAGES = ("soda-distill", "torch", "transformers", "trl", "accelerate", "datasets", "openai", "vllm")


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _device() -> str:
    import torch  # here, not at the top: reading a run directory (report) needs no torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    from .models import cpu_bf16_units

    units = cpu_bf16_units()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads" \
           + (f", bf16 on {units})" if units else ")")


_HELD: dict[Path, object] = {}  # the open lock file of each directory this process holds


def combine(*parts: str) -> str:
    """One short fingerprint for a stage from the fingerprints and hashes of what it depends on."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class PeakMemory:
    """Peak memory of this process (launched as several: of the main one) within a span: resident set size on CPU
    (Linux's VmHWM, reset at the start), peak allocated bytes on each GPU."""

    def __enter__(self):
        import torch

        try:  # writing 5 to clear_refs resets VmHWM (the RSS high-water mark) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        if torch.cuda.is_initialized():  # before CUDA's first use there is nothing to reset, and resetting fails
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        return self

    def __exit__(self, *exc):
        import torch

        self.result = {}
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.result["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            import resource

            self.result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if torch.cuda.is_available():
            self.result["peak_gpu_mb"] = [
                round(torch.cuda.max_memory_allocated(i) / 2**20, 1) for i in range(torch.cuda.device_count())
            ]
        return False


@dataclasses.dataclass
class StageResult:
    """What a stage's body returns: its figures, recorded in its manifest record under their fields' names. A field
    whose default is None is left out while None (it applies to some runs only; one without a default is recorded even
    as null); a field that is itself a StageResult is recorded flat, its fields beside the others."""

    def record(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, StageResult):
                out.update(value.record())
            elif value is not None or f.default is not None:
                out[f.name] = value
        return out


LOCK = ".lock"  # in a run or evaluation directory: the PID of the process working in it


# The prompt count a stage's record holds, by stage: teacher and snapshot answers, pairs kept, SFT examples, DPO
# pairs, GAD's prompts.
PROMPT_COUNTS = ("records", "kept", "examples", "pairs", "prompts")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.path / "manifest.json"

    def lock(self) -> RunDir:
        """Hold the directory for this process until it exits: a second process working in it would pay for
        requests twice and interleave its records. An flock, so a process killed holding it holds it no more.
        Launched as several processes, the main one holds it for all."""
        if not is_main() or self.path in _HELD:
            return self
        f = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise SodaError(f"{self.path}: in use by another process (PID {holder}); wait for it to finish, or stop "
                            "it and run again (it resumes)") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _HELD[self.path] = f
        return self

    def file(self, name: str) -> Path:
        return self.path / name

    def output(self, stage: str) -> Path:
        """What the stage yields here (registry.STAGES): its model folder, else its first output."""
        s = STAGES[stage]
        return self.path / (s.model or s.outputs[0].rstrip("/"))

    def manifest(self) -> dict:
        return read_manifest(self.path)

    def _update(self, fn) -> None:
        if not is_main():  # launched as several processes, the main one keeps the record
            return
        m = self.manifest()
        m.setdefault("stages", {})
        m.setdefault("inputs", {})
        m["soda_distill"] = {"versions": _versions(), "device": _device(), "platform": platform.platform(),
                             "processes": world_size()}
        fn(m)
        atomic_write_text(self.manifest_path, json.dumps(m, indent=2, sort_keys=False) + "\n")

    def record_input(self, path: Path) -> str:
        digest = source_digest(path)
        self._update(lambda m: m["inputs"].__setitem__(str(path), digest))
        return digest

    def finished(self, stage: str) -> bool:
        """Whether the stage finished here (with whatever settings), its model in place if it yields one."""
        return finished(self.path, self.manifest()["stages"], stage)

    def trained_models(self) -> list:
        """(method, model folder) of each trained method whose stage finished here, in registry order."""
        return trained_models(self.path, self.manifest()["stages"])

    def done(self, stage: str, fingerprint: str, legacy: str | None = None) -> bool:
        """True when the stage finished with these settings; an error when it finished with others. `legacy`: the
        same settings as an earlier version fingerprinted them, accepted and rewritten to the current form."""
        rec = self.manifest()["stages"].get(stage)
        if not rec or rec.get("status") != "done":
            return False
        if legacy and rec.get("fingerprint") == legacy != fingerprint:
            self._update(lambda m: m["stages"][stage].__setitem__("fingerprint", fingerprint))
            return True
        if rec.get("fingerprint") != fingerprint:
            raise SodaError(
                f"{self.path}: stage '{stage}' already finished with different settings or inputs; "
                f"use a new --out directory, or delete {stage}'s outputs and its entry in manifest.json"
            )
        return True

    @contextmanager
    def stage(self, name: str, fingerprint: str):
        """Time a stage (the pipeline's, an evaluation) and track its peak memory; the caller fills `info` (counts
        etc.), recorded on success. A stage run in pieces (stopped by an error or an interrupt — Ctrl-C,
        bench/quality.py's time limit — and resumed) is recorded with the seconds of all its pieces, each redoing the
        steps since its last checkpoint; a piece killed outright leaves no seconds, and is counted in
        `pieces_uncounted`."""
        info: dict = {}
        before = self.manifest().get("pieces", {}).get(name, {})
        before = before if before.get("fingerprint") == fingerprint else {}
        earlier = {"fingerprint": fingerprint, "wall_s": before.get("wall_s", 0.0), "count": before.get("count", 0),
                   "uncounted": before.get("uncounted", 0) + bool(before.get("open"))}  # still open: killed
        self._update(lambda m: m.setdefault("pieces", {}).__setitem__(name, {**earlier, "open": True}))
        start = time.perf_counter()
        try:
            with PeakMemory() as peak:
                yield info
        except BaseException as e:
            piece = {**earlier, "wall_s": round(earlier["wall_s"] + time.perf_counter() - start, 2),
                     "count": earlier["count"] + 1}

            def stop(m):
                m.setdefault("pieces", {})[name] = piece
                if isinstance(e, SodaError):  # why it stopped (a spend limit, failed requests, bad input)
                    m.setdefault("stopped", {})[name] = {"reason": str(e),
                                                         "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            with suppress(Exception):  # a full disk: the error that stopped the stage is the one to report
                self._update(stop)
            raise
        wall = time.perf_counter() - start
        earlier_pieces = earlier["count"] + earlier["uncounted"]
        record = {
            "status": "done",
            "fingerprint": fingerprint,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(earlier["wall_s"] + wall, 2),
            **({"pieces": earlier_pieces + 1, "last_piece_s": round(wall, 2)} if earlier_pieces else {}),
            **({"pieces_uncounted": earlier["uncounted"]} if earlier["uncounted"] else {}),
            **peak.result,
            **info,
        }
        count = next((info[k] for k in PROMPT_COUNTS if isinstance(info.get(k), int) and info[k] > 0), None)
        if count:  # what the stage costs at another size: its time per 1,000 of the prompts it worked on
            record["wall_s_per_1k_prompts"] = round(record["wall_s"] * 1000 / count, 1)

        def finish(m):
            m["stages"][name] = record
            m.get("stopped", {}).pop(name, None)  # a stop before this run of it no longer holds
            m.get("pieces", {}).pop(name, None)

        self._update(finish)


def read_manifest(path: Path) -> dict:
    """A run directory's manifest.json (no stages where there is none yet), creating nothing: a RunDir creates its
    directory, and an empty one where a run was looked for would be taken for a run started there."""
    manifest = Path(path) / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.exists() else {"stages": {}, "inputs": {}}


def copy_stages(source: Path, path: Path, stages: list[str], link: bool = False) -> None:
    """Start the run directory `path` (or add to it) from the finished `stages` of `source` it lacks: their outputs
    (without checkpoints) and their manifest records, so that a run with other settings for later stages reuses them.
    With `link` the outputs are hard links: for runs on one disk that only read them (a sweep's points)."""
    path.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(source)
    own = read_manifest(path) if (path / "manifest.json").exists() else \
        {**{k: v for k, v in manifest.items() if k not in ("pieces", "stopped")}, "stages": {}}  # the source's own
    copy = os.link if link else shutil.copy2
    for name in (n for n in stages if n not in own["stages"] and finished(source, manifest["stages"], n)):
        for output in STAGES[name].outputs:
            src, dst = source / output.rstrip("/"), path / output.rstrip("/")
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"), copy_function=copy, dirs_exist_ok=True)
            elif src.exists() and not dst.exists():
                copy(src, dst)
        own["stages"][name] = manifest["stages"][name]
        own.get("pieces", {}).pop(name, None)
    own["inputs"] = {**manifest.get("inputs", {}), **own.get("inputs", {})}
    atomic_write_text(path / "manifest.json", json.dumps(own, indent=2) + "\n")
