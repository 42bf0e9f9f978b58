"""The documentation: every generated page is what its source gives (the code, or bench/results/), a changed results
file changes its page, every config key has its help, and the hand-written pages keep up with the package (every
module in the architecture, every results page in the site's nav, the README short and its example config valid)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from soda_distill.config import Config, field_help, load_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "soda_distill"
RENDERERS = ("render_results.py", "render_reference.py")


def render(script: Path, docs: Path) -> None:
    subprocess.run([sys.executable, str(script), "--docs", str(docs)], check=True, capture_output=True, text=True)


@pytest.mark.parametrize("script", RENDERERS)
def test_committed_pages_are_what_their_sources_give(tmp_path, script):
    render(ROOT / "scripts" / script, tmp_path)
    pages = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.md"))
    assert pages
    committed = {page: ROOT / "docs" / page for page in pages}
    stale = [str(page) for page, path in committed.items()
             if not path.exists() or path.read_text() != (tmp_path / page).read_text()]
    assert not stale, f"docs/ differs from what the sources give for {stale}: run bash scripts/docs.sh"
    if script == "render_results.py":  # and no page is left over from a results file that is gone
        assert sorted((ROOT / "docs" / "results").glob("*.md")) == sorted(ROOT / "docs" / p for p in pages)


def test_a_changed_results_file_changes_its_page(tmp_path):
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "render_results.py", copy / "scripts")
    shutil.copytree(ROOT / "bench" / "results", copy / "bench" / "results", ignore=shutil.ignore_patterns("*.jsonl"))
    collect = copy / "bench" / "results" / "collect.json"
    record = json.loads(collect.read_text())
    record["requests_per_s"] = 12345.6
    del record["machine"]
    collect.write_text(json.dumps(record))
    render(copy / "scripts" / "render_results.py", tmp_path / "docs")
    page = (tmp_path / "docs" / "results" / "collect.md").read_text()
    assert page != (ROOT / "docs" / "results" / "collect.md").read_text()
    assert "| requests_per_s | 12345.6 |" in page
    assert "| machine | not recorded |" in page
    untouched = "results/quality.md"
    assert (tmp_path / "docs" / untouched).read_text() == (ROOT / "docs" / untouched).read_text()


def test_a_results_file_no_page_names_gets_its_own(tmp_path):
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "render_results.py", copy / "scripts")
    shutil.copytree(ROOT / "bench" / "results", copy / "bench" / "results", ignore=shutil.ignore_patterns("*.jsonl"))
    (copy / "bench" / "results" / "new-bench.json").write_text(json.dumps(
        {"command": "python bench/new.py", "date": "2027-01-01T00:00:00+00:00", "figures": {"speedup": 2.5}}))
    render(copy / "scripts" / "render_results.py", tmp_path / "docs")
    page = (tmp_path / "docs" / "results" / "new-bench.md").read_text()
    assert "`python bench/new.py`" in page and "| figures.speedup | 2.5 |" in page
    assert "[`new-bench.json`](new-bench.md)" in (tmp_path / "docs" / "results" / "index.md").read_text()


def test_a_replica_page_opens_with_its_seeds_pooled():
    """render_results.py: a replica's page leads with the across-runs section of its evaluation (the headline), taken
    to the next heading of its level; a table of one run has none to lead with."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import render_results
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    evaluation = ("### Evaluation results\n##### ROUGE-L\n| a | 1 |\n##### Across runs (pooled)\n\n**ROUGE-L**\n\n"
                  "| SODA | vs SeqKD | -0.7 |\n##### Mean response length\n| a | 9 |\n")
    assert render_results.across_runs(evaluation) == "**ROUGE-L**\n\n| SODA | vs SeqKD | -0.7 |\n"
    assert render_results.across_runs(evaluation.replace("Across runs", "Paired")) is None
    page = (ROOT / "docs" / "results" / "alpaca-eval.md").read_text()
    assert page.index("### In brief: every seed pooled") < page.index("How each committed row was made")


def test_every_config_key_has_help():
    """Every field of every section, nested ones included, says what it does: the config reference prints it."""
    def without_help(cls, prefix: str) -> list[str]:
        hints, missing = typing.get_type_hints(cls), []
        for f in dataclasses.fields(cls):
            if not str(f.metadata.get("help") or "").strip():
                missing.append(prefix + f.name)
            inner = next((t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)), None)
            if inner is not None:
                missing += without_help(inner, f"{prefix}{f.name}.")
        return missing

    assert len(dataclasses.fields(Config)) > 10
    assert not without_help(Config, "")


def test_a_key_redefined_without_help_keeps_its_base_sections_help():
    @dataclasses.dataclass
    class Base:
        size: int = dataclasses.field(default=1, metadata={"help": "how many"})

    @dataclasses.dataclass
    class Sub(Base):
        size: int = 2

    assert field_help(Sub, "size") == "how many" and field_help(Sub, "other") == ""


def test_the_architecture_names_every_module():
    page = (ROOT / "docs" / "design" / "architecture.md").read_text()
    modules = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))
    assert not [m for m in modules if f"`{m}`" not in page]


def test_every_page_is_in_the_sites_nav():
    def pages(nav) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, dict):
            return [p for value in nav.values() for p in pages(value)]
        return [p for item in nav for p in pages(item)]

    nav = pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    on_disk = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == on_disk


def test_the_readme_is_short_its_commands_are_the_two_and_its_config_loads(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for command in ("bash scripts/install.sh && .venv/bin/soda-distill run configs/demo.yaml",
                    "bash scripts/install.sh && .venv/bin/python -m pytest -q"):
        assert f"```bash\n{command}\n```" in readme
    (tmp_path / "own.yaml").write_text(re.search(r"```yaml\n(.*?)```", readme, re.S)[1])
    cfg = load_config(tmp_path / "own.yaml")
    assert cfg.student.model == "Qwen/Qwen2.5-7B-Instruct" and cfg.warmup.gradient_accumulation_steps == 8


def test_the_readmes_and_docs_links_resolve():
    broken = []
    for page in [ROOT / "README.md", ROOT / "bench" / "LOG.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken
