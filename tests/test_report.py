"""The report on tiny run directories — checked in a real browser — and the analyze command on a tiny run."""

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
from conftest import ANSWERS, QUESTIONS, write_jsonl
from matplotlib.image import imread

from soda_distill.cli import main
from soda_distill.config import load_config, save_config
from soda_distill.markdown_html import markdown_to_html
from soda_distill.report import write_report

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium); "
                                                              "the report is checked in a real browser")
# Marks every image with whether it decoded, once the page has loaded; --dump-dom prints the DOM after that.
IMAGE_PROBE = ("<script>addEventListener('load', () => { for (const img of document.images) "
               "img.dataset.loaded = img.complete && img.naturalWidth > 0; document.body.dataset.probed = 'yes'; });"
               "</script>")


def _steps(n, **curves):
    """n logged steps, each metric a function of the step, then the summary line TRL writes last."""
    rows = [{"step": s, "epoch": s / n, **{k.replace("__", "/"): f(s) for k, f in curves.items()}} for s in range(1, n + 1)]
    return rows + [{"step": n, "epoch": 1.0, "train_runtime": 1.0, "train_loss": 0.5}]


def _stage(wall_s, **extra):
    return {"status": "done", "fingerprint": "f", "wall_s": wall_s, "peak_rss_mb": 500.0 + 10 * wall_s, **extra}


def make_run(path, model_dir):
    """A finished run directory with the tiny model standing in for every trained model, and made-up metrics."""
    save_config(load_config(None, [f"student.model={model_dir}", "student.bf16=false", f"out={path}"]), path / "config.yaml")
    for folder in ("warmup", "seqkd", "distill", "gad/generator"):
        shutil.copytree(model_dir, path / folder)
    (path / "gad/discriminator_warmup").mkdir()
    write_jsonl(path / "warmup/metrics.jsonl", _steps(6, loss=lambda s: 3 - 0.3 * s))
    write_jsonl(path / "seqkd/metrics.jsonl", _steps(8, loss=lambda s: 3 - 0.3 * s, eval_loss=lambda s: 3 - 0.1 * s))
    write_jsonl(path / "distill/metrics.jsonl", _steps(
        10, loss=lambda s: 0.69 - 0.03 * s, rewards__margins=lambda s: 0.1 * s, rewards__accuracies=lambda s: min(1, s / 5),
        logps__chosen=lambda s: -100 + 2 * s, logps__rejected=lambda s: -150 - 3 * s))
    with open(path / "distill/metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 0.3')  # a torn last line, as a kill mid-write leaves
    write_jsonl(path / "gad/discriminator_warmup/metrics.jsonl", _steps(4, loss=lambda s: 0.7 / s, accuracy=lambda s: s / 4))
    write_jsonl(path / "gad/metrics.jsonl", _steps(
        5, reward=lambda s: -1 + 0.2 * s, discriminator__accuracy=lambda s: 0.9 - 0.05 * s, discriminator__loss=lambda s: 0.3 + 0.05 * s))
    pairs = [{"id": f"q{i}", "prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
              "rejected": [{"role": "assistant", "content": f"Well, I think the answer might be {a} " * (i % 3 + 1)}]}
             for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]
    write_jsonl(path / "pairs.jsonl", pairs)
    stages = {
        "teacher": _stage(0.1, records=12), "snapshot": _stage(5.0, records=12),
        "pairs": _stage(0.2, kept=12, dropped={}, lengths={"chosen": {"mean": 3.5}, "rejected": {"mean": 14.0}}),
        "warmup": _stage(20.0, steps=6), "seqkd": _stage(25.0, steps=8), "distill": _stage(30.0, steps=10),
        "gad_warmup": _stage(8.0, peak_gpu_mb=[900.0, 1200.0]), "gad": _stage(60.0, peak_gpu_mb=[2000.0]),
    }
    (path / "manifest.json").write_text(json.dumps({"stages": stages, "inputs": {},
                                                    "soda_distill": {"device": "cpu (test)", "versions": {"torch": "x"}}}))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A finished tiny run with an evaluation and a representation analysis, made by the real commands."""
    run = make_run(tmp_path_factory.mktemp("runs") / "tiny", tiny_model_dir)
    qa = write_jsonl(run.parent / "qa.jsonl", [
        {"id": f"q{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))])
    assert main(["evaluate", str(run), f"evaluate.benchmarks=[{qa}]", "evaluate.limit=3", "evaluate.max_new_tokens=3",
                 "student.bf16=false"]) == 0
    assert main(["analyze", str(run), "analyze.limit=6", "analyze.batch_size=6", "analyze.bins=20"]) == 0
    return run


def test_analyze_command_compares_the_runs_models(tiny_run):
    result = json.loads((tiny_run / "analysis/analysis.json").read_text())
    assert list(result["models"]) == ["Base", "Warmup", "SeqKD", "SODA", "GAD"]
    assert result["base"] == "Base" and result["num_prompts"] == 6 and result["binning"]["bins"] == 20
    assert result["source"]["prompts"].endswith("dolly_heldout.jsonl") and result["source"]["limit"] == 6
    for name in ("Warmup", "SeqKD", "SODA", "GAD"):  # copies of the base model: the same structure at every layer
        assert result["models"][name]["cka"][1:] == pytest.approx([1, 1], abs=1e-9)
    for png in ("cka.png", "activation_stats.png"):
        assert (tiny_run / "analysis" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_command_needs_out_for_several_runs(tiny_run, capsys):
    assert main(["analyze", str(tiny_run), str(tiny_run / "warmup")]) == 2
    assert "give --out DIR" in capsys.readouterr().err


def render(html_path, tmp_path):
    """Chromium's screenshot of the page (RGB floats) and its DOM once loaded, with every image marked decoded or not."""
    probed = tmp_path / "probed.html"
    probed.write_text(html_path.read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
    shot = tmp_path / "screenshot.png"
    subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-1'}", "--window-size=1280,2400", f"--screenshot={shot}",
                    html_path.as_uri()], check=True, capture_output=True, timeout=60)
    dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-2'}", "--dump-dom", probed.as_uri()],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return imread(shot)[..., :3], dom


def check_page(html_path, tmp_path, images: int) -> None:
    """Nothing outside the file is fetched, the page is not blank, and every image decodes in the browser."""
    page = html_path.read_text()
    assert "<script" not in page and "<link" not in page
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == images and all(s.startswith("data:image/png;base64,") for s in sources)
    pixels, dom = render(html_path, tmp_path)
    assert pixels.std() > 0.05 and (pixels.mean(axis=-1) < 0.9).mean() > 0.02, "blank screenshot"
    assert 'data-probed="yes"' in dom, "the page's load event had not run when the DOM was dumped"
    assert dom.count('data-loaded="true"') == images and 'data-loaded="false"' not in dom


@needs_chromium
def test_report_of_a_finished_run_renders_in_a_browser(tiny_run, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(tiny_run), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    for heading in ("What is here", "Evaluation", "Training curves", "Representation analysis", "Preference pairs",
                    "Cost per stage", "Configuration"):
        assert f"## {heading}" in markdown
    assert "Every stage of the pipeline finished" in markdown and "whitespace-separated words" in markdown
    assert "| Model | Method | qa |" in markdown  # the evaluation's own table
    linked = re.findall(r"!\[[^\]]*\]\((images/[^)]+)\)", markdown)
    # costs, pair lengths, 5 training stages, the evaluation chart, CKA and activation statistics
    assert len(linked) == 10
    for name in linked:
        assert imread(out / name).size
    check_page(out / "report.html", tmp_path, images=len(linked))


@needs_chromium
def test_report_names_what_is_missing(tiny_run, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    save_config(load_config(None, ["student.model=embedded"]), partial / "config.yaml")
    write_jsonl(partial / "teacher.jsonl", [{"prompt": "Hi?", "response": "Hello."}])
    (partial / "manifest.json").write_text(json.dumps({"stages": {"teacher": _stage(1.0)}, "inputs": {}}))
    (partial / "snapshot.jsonl").write_text("")  # begun, not finished
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"stages": ')
    (broken / "pairs.jsonl").write_text('{"prompt": [], "chosen": []}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    html_path = write_report([tiny_run, partial, broken, empty], tmp_path / "report")
    markdown = (tmp_path / "report/report.md").read_text()
    assert "# SODA report: tiny vs partial vs broken vs empty" in markdown
    assert ("**partial** is missing: snapshot (`snapshot.jsonl`), pairs (`pairs.jsonl`), warmup (`warmup/`), "
            "distill (`distill/`)") in markdown
    assert "| snapshot (`snapshot.jsonl`) | done, 5.0 s | started, not finished |" in markdown
    assert "**empty** is missing: config.yaml, manifest.json, teacher (`teacher.jsonl`)" in markdown
    assert "**broken**: `manifest.json` could not be read (JSONDecodeError" in markdown
    assert "**broken**: `pairs.jsonl` could not be read (IndexError" in markdown
    assert "No `warmup/metrics.jsonl` with these metrics in: partial, broken, empty." in markdown
    assert "No readable `pairs.jsonl` in: partial, broken, empty." in markdown
    assert "Settings that differ between the runs:" in markdown and "| `student.model` |" in markdown
    check_page(html_path, tmp_path, images=markdown.count("](images/"))


def test_report_of_nothing_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "nowhere: no such directory (a run directory was expected)" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "r")]) == 2


def test_markdown_to_html_escapes_and_embeds(tmp_path):
    from soda_distill.plots import new_figure, save_png

    fig = new_figure(1, 1)
    fig.add_subplot().plot([0, 1])
    save_png(fig, tmp_path / "images/x.png")
    page = markdown_to_html("\n".join([
        "## A <b>heading</b>", "", "Some **bold**, *italic `a*b` code* and <script>.", "",
        "| name | value |", "| --- | ---: |", "| a \\| b | 1.5 |", "", "- one", "- `two`", "",
        "```yaml", "key: <tag> & **not bold**", "```", "", "![a chart](images/x.png)", "![gone](images/missing.png)",
    ]), tmp_path)
    assert "<h2>A &lt;b&gt;heading&lt;/b&gt;</h2>" in page
    assert "<p>Some <strong>bold</strong>, <em>italic <code>a*b</code> code</em> and &lt;script&gt;.</p>" in page
    flat = page.replace("\n", "")
    assert '<td>a | b</td><td style="text-align:right">1.5</td>' in flat
    assert "<ul><li>one</li><li><code>two</code></li></ul>" in flat
    assert '<pre><code class="language-yaml">key: &lt;tag&gt; &amp; **not bold**</code></pre>' in flat
    # 150 pixels of a one-inch figure shown 100 CSS pixels wide, as every chart: at 100 CSS pixels per inch
    data = re.search(r'<img alt="a chart" width="100" src="data:image/png;base64,([^"]+)"', page)[1]
    assert imread(io.BytesIO(base64.b64decode(data))).shape[:2] == (150, 150)
    assert "[image not embedded: images/missing.png]" in page
