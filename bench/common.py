"""What the benchmark scripts share: the demo's data as their committed results measured it, and how a result
names the machine it ran on."""

from __future__ import annotations

import os
import platform

# The demo as it was when the committed sweep and cost results were measured: 64 prompts of ≤ 640 tokens (the demo
# is now 48 of ≤ 512, to fit its time); the benchmarks keep it so that their points stay comparable.
DEMO_DATA = ["data.limit=64", "pairs.max_length=640", "warmup.max_length=640", "seqkd.max_length=640",
             "distill.max_length=640"]


def machine() -> str:
    from soda_distill.models import bf16_supported

    return f"{platform.machine()}, {os.cpu_count()} cores, " + ("bf16" if bf16_supported() else "no bf16 (fp32 training)")
