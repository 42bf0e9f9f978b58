"""The Markdown that report.py writes (and evaluate's results.md) as one self-contained HTML page, rendered by
markdown-it-py, its images embedded as data URIs; no scripts."""

from __future__ import annotations

import base64
import html
from pathlib import Path

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2329; background: #fff;
       margin: 0; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 1.7em; border-bottom: 3px solid #2f6fb3; padding-bottom: 6px; }
h2 { font-size: 1.35em; margin-top: 2.2em; border-bottom: 1px solid #d5dae0; padding-bottom: 4px; }
h3 { font-size: 1.12em; margin-top: 1.6em; }
h4, h5, h6 { font-size: 1em; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #d5dae0; padding: 4px 9px; vertical-align: top; }
th { background: #eef2f6; text-align: left; }
tr:nth-child(even) td { background: #f8fafb; }
td, th { font-variant-numeric: tabular-nums; }
code { font: 12.5px ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; background: #f1f3f5;
       padding: 1px 4px; border-radius: 3px; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 10px 12px; overflow-x: auto; max-height: 420px; }
pre code { background: none; padding: 0; }
img { max-width: 100%; height: auto; border: 1px solid #e1e4e8; }
p:has(> img) { margin: 14px 0 2px; }
p:has(> img) + p em { color: #57606a; font-size: 13px; }
"""


def _css_width(png: bytes) -> str:
    """A width attribute that shows a chart at 100 CSS pixels per inch of its figure, whatever dpi it was saved at,
    so that text is the same size in every chart: pixels from the PNG's IHDR chunk, resolution from its pHYs."""
    at = png.find(b"pHYs")
    per_metre = int.from_bytes(png[at + 4:at + 8], "big") if at > 0 else 0
    return f' width="{round(int.from_bytes(png[16:20], "big") / (per_metre * 0.0254) * 100)}"' if per_metre else ""


def _image_html(alt: str, src: str, base: Path) -> str:
    path = base / src
    if src.startswith(("/", "http:", "https:", "data:")) or not path.is_file():
        return f"[image not embedded: {html.escape(src)}]"
    png = path.read_bytes()
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}"{_css_width(png)} src="data:image/png;base64,{data}">'


def markdown_to_html(markdown: str, base: Path) -> str:
    """Markdown (CommonMark and pipe tables, by markdown-it-py) as HTML, raw HTML in it escaped, images read from
    `base` and embedded as data URIs."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
    renderer.add_render_rule("image", lambda rules, tokens, i, options, env: _image_html(
        rules.renderInlineAsText(tokens[i].children or [], options, env), tokens[i].attrGet("src"), base))
    return renderer.render(markdown)


def html_document(title: str, markdown: str, base: Path) -> str:
    """A whole HTML page of this Markdown, its images read from `base`."""
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"{markdown_to_html(markdown, base)}\n</main>\n</body>\n</html>\n")
