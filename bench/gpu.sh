#!/usr/bin/env bash
# The GPU check: on one GPU with no internet, in ≤ 8 minutes (one H200): the demo (SODA and GAD), the throughput
# bench (model FLOP/s against the GPU's bf16 matrix-product rate) and a one-GPU FSDP smoke test; JSON to $OUT
# (default bench/results/gpu/). Prepare here first: bash bench/gpu_wheels.sh (→ .whl/, carried to the machine).
#   device run:  bash bench/gpu.sh          with carry [".whl"]
#   on a CPU, the same steps at toy size, to check the script:  bash bench/gpu.sh --smoke
#   the on-policy dial and OPD (bf16 teacher) on a GPU:  bash bench/gpu.sh --parts dial,opd
#   SFT and DPO at 0.5B, 1.5B and 3B parameters, soda against stock TRL (≤ 8 minutes):  bash bench/gpu.sh --parts shapes
#   a seed of the AlpacaEval replica on the real student, its parts carried in three calls (bench/gpu_wheels.sh
#   --replica says how):  bash bench/gpu.sh --parts replica --budget 570
set -uo pipefail
cd "$(dirname "$0")/.."
dry=false; [[ " $* " == *" --dry "* ]] && dry=true  # a dry check installs and unpacks nothing
if ! $dry && [ -f .gpu/SHA256SUMS ]; then  # a part of bench/gpu_wheels.sh --replica's bundle: kept on the machine until all have come
  bundle=${SODA_GPU_BUNDLE:-/tmp/soda-gpu-bundle}
  mkdir -p $bundle && cp .gpu/part-* .gpu/SHA256SUMS $bundle/ || exit 1
  checked=$(cd $bundle && sha256sum --check --ignore-missing SHA256SUMS 2>/dev/null)
  damaged=$(sed -n 's/: FAILED$//p' <<< "$checked")
  if [ -n "$damaged" ]; then
    (cd $bundle && rm -f $damaged); echo "bundle: $damaged damaged in transfer (checksum differs); carry it again"; exit 1
  fi
  have=$(grep -c ': OK$' <<< "$checked"); total=$(wc -l < $bundle/SHA256SUMS)
  if [ "$have" -lt "$total" ]; then echo "bundle: $have of $total parts on this machine; carry the next"; exit 0; fi
  cat $bundle/part-* | tar -xf - || exit 1  # .whl/ (the embedded student's wheel too) and runs/alpaca_eval/data/
fi
PYTHON=${PYTHON:-python3}
if ! $dry && [ -d .whl ] && ! $PYTHON -c "import trl, transformers, rapidfuzz, importlib.util; from packaging.version import Version as V; assert V(transformers.__version__) >= V('5.24') and importlib.util.find_spec('liger_kernel')" 2>/dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
exec $PYTHON bench/gpu.py --out "${OUT:-bench/results/gpu}" "$@"
