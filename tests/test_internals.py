"""The TRL/transformers internals this package overrides (soda_distill.internals): each still there as written
against, the table complete, and a changed internal reported by the name of the override that relies on it."""

import inspect
import re
from importlib import metadata

import pytest
from transformers import Trainer
from trl import DPOTrainer

from soda_distill import internals
from soda_distill.internals import INTERNALS, TESTED, check_internals
from soda_distill.stages.distill import DistillDPOTrainer, RefreshingDPOTrainer
from soda_distill.stages.gad import BradleyTerryTrainer, GadTrainer
from soda_distill.stages.opd import OpdTrainer
from soda_distill.stages.warmup import ResumableSFTTrainer


def test_every_internal_holds_in_the_installed_libraries():
    assert check_internals() == []


@pytest.mark.parametrize("package", sorted(TESTED))
def test_installed_versions_are_the_tested_ones(package):
    assert metadata.version(package).startswith(TESTED[package] + "."), \
        f"{package} {metadata.version(package)} is not the tested {TESTED[package]}: re-check soda_distill.internals"


TRAINERS = [DistillDPOTrainer, RefreshingDPOTrainer, GadTrainer, BradleyTerryTrainer, ResumableSFTTrainer, OpdTrainer]


def test_at_most_eight_internals():
    assert len(INTERNALS) <= 8


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_private_override_is_listed(trainer):
    """A private method of the library that one of our trainers defines anew must have its entry."""
    listed = {(i.owner.split(":")[1], i.name) for i in INTERNALS}
    ours = [c for c in inspect.getmro(trainer) if c.__module__.startswith("soda_distill")]
    library = [c for c in inspect.getmro(trainer) if c.__module__.split(".")[0] in TESTED]
    for cls in ours:
        for name in vars(cls):
            if not name.startswith("_") or name.startswith("__"):
                continue
            defined_in = [base.__name__ for base in library if name in vars(base)]
            if defined_in:
                assert any((owner, name) in listed for owner in defined_in), \
                    f"{cls.__name__}.{name} overrides {defined_in[0]}.{name}: add it to soda_distill.internals.INTERNALS"


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_private_attribute_our_trainers_use_is_listed(trainer):
    """`self._name` in our trainers' code is our own or listed: an attribute the library sets in its constructor
    (TRL's `_metrics`, GRPO's `_step`) is as private as a method."""
    listed = {i.name for i in INTERNALS}
    ours = [c for c in inspect.getmro(trainer) if c.__module__.startswith("soda_distill")]
    own = {name for cls in ours for name in vars(cls)}
    for cls in ours:
        for name in re.findall(r"self\.(_[A-Za-z]\w*)", inspect.getsource(cls)):
            assert name.startswith("__") or name in own or name in listed, \
                f"{cls.__name__} uses the library's private {name}: add it to soda_distill.internals.INTERNALS"


def test_a_changed_internal_is_reported_by_its_override(monkeypatch):
    def _precompute_ref_logps(self, dataset, name, batch_size, device):  # a new parameter, as an upgrade might add
        return dataset

    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", _precompute_ref_logps)
    monkeypatch.setattr(Trainer, "_run_epoch", None)
    problems = check_internals()
    assert len(problems) == 2
    assert problems[0].startswith("stages.distill.DistillDPOTrainer overrides or relies on DPOTrainer._precompute_ref_logps")
    assert "device" in problems[0]
    assert problems[1].startswith("training.ResumableOrder overrides or relies on Trainer._run_epoch")


def test_a_call_the_library_no_longer_makes_is_reported(monkeypatch):
    entry = next(i for i in INTERNALS if i.name == "current_gradient_accumulation_steps")
    moved = internals.Internal(entry.owner, entry.name, entry.used_by, entry.why, called_as="self._micro_step += 1")
    assert "no longer contains 'self._micro_step += 1'" in internals.check(moved)


def test_the_cpu_bf16_units_are_read_from_torch_as_the_kernel_reports_them():
    """models.cpu_bf16_units relies on torch.cpu's private probes (torch 2.13): they must still exist and agree with
    the CPU flags Linux reports, since results name the units (AMX and AVX512-BF16 round bf16 sums differently)."""
    from pathlib import Path

    import torch

    from soda_distill.models import cpu_bf16_units

    assert callable(torch.cpu._is_amx_tile_supported) and callable(torch.cpu._is_avx512_bf16_supported)
    flags = set(next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), []))
    expected = "amx" if "amx_tile" in flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert cpu_bf16_units() == expected
