"""bench/precision.py --replica: the quick replica's paired effects in bf16 set against fp32's intervals."""

from pathlib import Path


def test_each_bf16_effect_is_placed_against_fp32s_interval(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import precision

    def results(soda_nll: float, seqkd_rouge: float) -> dict:
        figure = lambda d: {"difference": d, "ci95": [round(d - 0.05, 3), round(d + 0.05, 3)], "prompts": 10}
        return {"rows": [
            {"method": "Base", "cells": {"dolly": {"paired": {}}}},
            {"method": "SeqKD", "cells": {"dolly": {"paired": {"vs Base": {"rouge_l": figure(seqkd_rouge)}}}}},
            {"method": "SODA", "cells": {"dolly": {"paired": {"vs Base": {"reference_nll": figure(soda_nll), "judge": None},
                                                              "vs SeqKD": {"reference_nll": None}}}}}]}

    effects = precision.paired_effects(results(-0.10, 1.0), results(-0.18, 1.04))
    assert [(e["effect"], e["metric"], e["bf16_within_fp32"]) for e in effects] == [
        ("SeqKD vs Base", "rouge_l", True), ("SODA vs Base", "reference_nll", False)]
    assert effects[1]["fp32"] == {"difference": -0.10, "ci95": [-0.15, -0.05]} and effects[1]["bf16"]["difference"] == -0.18
