"""The replica's committed rows against a second reference set for the same held-out prompts, from their answers alone.

    python bench/second_reference.py [--config configs/alpaca_eval.yaml] [--reference runs/alpaca_eval/data/AE-gpt4-1106.jsonl]

Every committed row of bench/results/NAME/rows/ (NAME: the config's) evaluated by `soda-distill evaluate` on
REFERENCE — the same prompts answered by another model: AlpacaEval 2's reference, gpt4_1106_preview, for the
AlpacaEval replica — from the rows' answers: ROUGE-L, length, repetition and cut answers, with their paired (as
bench/results/NAME.json pairs them) and across-seed differences, raw and at equal length. No reference NLL: the rows'
were scored on the first references, and scoring these would need every model again. Generates nothing; under a
minute. Writes bench/results/NAME-REFERENCE.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from common import machine, versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/alpaca_eval.yaml")
    parser.add_argument("--reference", default="runs/alpaca_eval/data/AE-gpt4-1106.jsonl",
                        help="the held-out prompts with the second reference's answers (bench/alpaca_eval_data.py)")
    args = parser.parse_args()
    config, reference = ROOT / args.config, ROOT / args.reference
    rows = RESULTS / config.stem / "rows"
    index = json.loads((rows / "index.json").read_text())
    # the rows paired as the replica's own table pairs them (Table 2's sources on equal prompts, the dial's k)
    pairings = [o for o in json.loads((RESULTS / f"{config.stem}.json").read_text()).get("overrides", [])
                if o.startswith("evaluate.paired_with=")]
    name = f"{config.stem}-{reference.stem}"

    from soda_distill.cli import main as soda_distill

    with tempfile.TemporaryDirectory() as tmp:
        evaldir = Path(tmp) / "evaluation"
        models = {label: str(rows / file) for label, file in index.items()}
        code = soda_distill(["evaluate", str(config), "--out", str(evaldir), f"evaluate.benchmarks=[{reference}]",
                             "evaluate.models=" + json.dumps(models), *pairings])
        if code:
            raise SystemExit(code)
        evaluation = json.loads((evaldir / "results.json").read_text())
        for suffix in ("md", "png"):
            shutil.copyfile(evaldir / f"results.{suffix}", RESULTS / f"{name}.{suffix}")
    record = {
        "command": f"python bench/second_reference.py --config {args.config} --reference {args.reference}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "config": args.config,
        "precision": f"the rows' own (bench/results/{rows.relative_to(RESULTS)}/provenance.json): no model runs here",
        "results": {k: evaluation[k] for k in ("settings", "benchmarks", "rows", "across_runs")},
    }
    for benchmark in record["results"]["benchmarks"]:  # the same on every machine
        benchmark["path"] = benchmark["path"].replace(f"{ROOT}/", "")
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(f"{len(models)} rows on {reference.name}: bench/results/{name}.json, .md, .png")


if __name__ == "__main__":
    main()
