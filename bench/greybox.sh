#!/usr/bin/env bash
# The grey-box teacher on the replica: the run's own SeqKD serves the 400 Dolly training prompts on loopback with
# each answer token's top-20 log-probabilities (tests/logprobs_server.py: `transformers serve` refuses `logprobs`),
# and the warmup trains on those answers twice, from the same teacher stage: on their text alone (`greytext`) and
# with the top-20 KL term (`greybox`, warmup.teacher_kl=LAMBDA); the two q_w paired in bench/results/quality.md.
#   bash bench/greybox.sh [MINUTES] [LAMBDA]     (default 120, 1.0; resumable with the same PORT, which the teacher
#                                                 stage's settings hold: run it again to go on)
#   QUICK=1 bash bench/greybox.sh                (--quick's 24 prompts, quality-quick.md: a check of the script)
# Needs the seed-42 SeqKD: runs/quality/seed-42/seqkd (python bench/quality.py --methods seqkd).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-120} LAMBDA=${2:-1.0} PORT=${PORT:-8765}
PYTHON=${PYTHON:-python}
TEACHER=${TEACHER:-runs/quality/seed-42/seqkd}
[ -f "$TEACHER/config.json" ] || { echo "greybox.sh: no teacher model at $TEACHER (train it: python bench/quality.py --methods seqkd)"; exit 2; }
PYTHONPATH=tests $PYTHON -c "
import sys, time
from logprobs_server import LogprobsServer
server = LogprobsServer(sys.argv[1], port=int(sys.argv[2]))
print('serving', server.url, flush=True)
while True: time.sleep(3600)" "$TEACHER" "$PORT" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
until curl -s -o /dev/null "http://127.0.0.1:$PORT/"; do sleep 2; kill -0 $SERVER || exit 1; done
kill -0 $SERVER  # ours answers, not another process on PORT
TEACHER_SETTINGS=(teacher.file=null data.prompts=builtin:dolly_train "teacher.base_url=http://127.0.0.1:$PORT/v1"
  teacher.model=seqkd teacher.api_key_env=null teacher.temperature=0 teacher.max_tokens=192 teacher.top_logprobs=20
  teacher.concurrency=2 teacher.timeout_s=600)
QUALITY=(bench/quality.py --seeds 42 --methods none --with-committed --variant-method warmup)
if [ "${QUICK:-0}" = 1 ]; then QUALITY+=(--quick); fi
# the text-only warmup first: the KL variant then takes its teacher stage (the same settings) from it
$PYTHON "${QUALITY[@]}" --minutes "$MINUTES" --variant greytext "${TEACHER_SETTINGS[@]}" \
  --variant greybox "${TEACHER_SETTINGS[@]}" "warmup.teacher_kl=$LAMBDA"
