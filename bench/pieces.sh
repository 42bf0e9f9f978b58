#!/usr/bin/env bash
# Run bench/quality.py commands in pieces until each one's table is complete: the replica's long runs, unattended.
#   bash bench/pieces.sh FILE     # FILE: one `python bench/quality.py ...` command a line, run in order
# Each piece is one call (it stops itself after its --minutes and resumes where it was); a command is repeated until
# its results file says the evaluation is complete, at most 20 pieces in all; one that ends incomplete within a
# minute stops them all. Lines are re-read between pieces, so
# FILE can change while it runs. Progress: runs/pieces.log; every piece's output: runs/pieces-output.log.
set -uo pipefail
cd "$(dirname "$0")/.."
list=$(realpath "$1")
for piece in $(seq 1 20); do
  cmd=$(grep -v '^\s*\(#\|$\)' "$list" | head -1)
  [ -n "$cmd" ] || break
  # its results file, named as bench/quality.py names it: NAME[-quick][-TAG].json
  name=$(basename "$(sed -n 's/.*--config \([^ ]*\).*/\1/p' <<< "$cmd")" .yaml)
  name=${name:-quality}; [[ $cmd == *--quick* ]] && name+=-quick
  tag=$(sed -n 's/.*--tag \([^ ]*\).*/\1/p' <<< "$cmd"); [ -n "$tag" ] && name+=-$tag
  results=bench/results/$name.json
  before=$(stat -c %.9Y "$results" 2>/dev/null)
  echo "$(date -u +%FT%TZ) piece $piece: $cmd" >> runs/pieces.log
  start=$SECONDS
  bash -c "$cmd" >> runs/pieces-output.log 2>&1
  # a piece that crashed before writing leaves an earlier command's complete table: not this one's
  if [ "$(stat -c %.9Y "$results" 2>/dev/null)" != "$before" ] && .venv/bin/python -c "import json, sys; r = json.load(open(sys.argv[1]))
sys.exit(0 if 'in_progress' not in r and r['this_piece']['exit_code'] == 0 and r['evaluation_complete'] else 1)" "$results"; then
    echo "$(date -u +%FT%TZ) complete: $cmd" >> runs/pieces.log
    { grep -vxF -- "$cmd" "$list" || true; } > "$list.tmp" && mv "$list.tmp" "$list"  # done: the next line is next
  elif (( SECONDS - start < 60 )); then  # an error at once (a bad setting, a failed checkout) would only repeat
    echo "$(date -u +%FT%TZ) stopped: piece $piece ended in $((SECONDS - start)) s, incomplete (runs/pieces-output.log)" >> runs/pieces.log
    exit 1
  fi
done
