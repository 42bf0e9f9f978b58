"""The Markdown that report.py writes (and evaluate's results.md) as one self-contained HTML page: headings,
paragraphs, pipe tables, bullet lists, fenced code, and images embedded as data URIs; no scripts."""

from __future__ import annotations

import base64
import html
import re
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
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font: 12.5px ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; background: #f1f3f5;
       padding: 1px 4px; border-radius: 3px; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 10px 12px; overflow-x: auto; max-height: 420px; }
pre code { background: none; padding: 0; }
img { max-width: 100%; height: auto; border: 1px solid #e1e4e8; }
p.figure { margin: 14px 0 2px; }
p.figure + p em { color: #57606a; font-size: 13px; }
"""


def _inline(text: str) -> str:
    """Inline Markdown (`code`, **bold**, *italic*) as HTML, everything else escaped; code spans are set aside
    first, so emphasis may enclose them but never reaches into them."""
    codes: list[str] = []

    def set_aside(m) -> str:
        codes.append(m[1])
        return f"\x00{len(codes) - 1}\x00"

    text = html.escape(re.sub(r"`([^`]*)`", set_aside, text))
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*(?![\s*])(.+?)(?<![\s*])\*(?![\w*])", r"<em>\1</em>", text)
    return re.sub("\x00(\\d+)\x00", lambda m: f"<code>{html.escape(codes[int(m[1])])}</code>", text)


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _html_table(lines: list[str]) -> str:
    header, body = _cells(lines[0]), lines[1:]
    align = [""] * len(header)
    if body and re.fullmatch(r"\|?(\s*:?-+:?\s*\|)*\s*:?-+:?\s*\|?", body[0].strip()):
        align = [' class="num"' if c.endswith(":") else "" for c in _cells(body.pop(0))]
    row = lambda cells, tag: "<tr>" + "".join(f"<{tag}{a}>{_inline(c)}</{tag}>" for c, a in zip(cells, align)) + "</tr>"
    return ("<table><thead>" + row(header, "th") + "</thead><tbody>"
            + "".join(row(_cells(line), "td") for line in body) + "</tbody></table>")


def _css_width(png: bytes) -> str:
    """A width attribute that shows a chart at 100 CSS pixels per inch of its figure, whatever dpi it was saved at,
    so that text is the same size in every chart: pixels from the PNG's IHDR chunk, resolution from its pHYs."""
    at = png.find(b"pHYs")
    per_metre = int.from_bytes(png[at + 4:at + 8], "big") if at > 0 else 0
    return f' width="{round(int.from_bytes(png[16:20], "big") / (per_metre * 0.0254) * 100)}"' if per_metre else ""


def _image_html(alt: str, src: str, base: Path) -> str:
    path = base / src
    if src.startswith(("/", "http:", "https:", "data:")) or not path.is_file():
        return f"<p>[image not embedded: {html.escape(src)}]</p>"
    png = path.read_bytes()
    data = base64.b64encode(png).decode("ascii")
    return f'<p class="figure"><img alt="{html.escape(alt)}"{_css_width(png)} src="data:image/png;base64,{data}"></p>'


def markdown_to_html(markdown: str, base: Path) -> str:
    """The Markdown this module writes (and evaluate's results.md) as HTML: headings, paragraphs, pipe tables,
    bullet lists, fenced code and images on their own line, read from `base` and embedded as data URIs."""
    lines, out, i = markdown.splitlines(), [], 0
    starts = ("#", "|", "- ", "```", "![")
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:end])) + "</code></pre>")
            i = end + 1
        elif m := re.match(r"(#{1,6}) (.*)", line):
            out.append(f"<h{len(m[1])}>{_inline(m[2])}</h{len(m[1])}>")
            i += 1
        elif m := re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip()):
            out.append(_image_html(m[1], m[2], base))
            i += 1
        elif line.startswith(("|", "- ")):
            end = next((j for j in range(i, len(lines)) if not lines[j].startswith(line[0])), len(lines))
            block = lines[i:end]
            out.append(_html_table(block) if line[0] == "|" else
                       "<ul>" + "".join(f"<li>{_inline(item[2:])}</li>" for item in block) + "</ul>")
            i = end
        elif not line.strip():
            i += 1
        else:
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].strip() or lines[j].startswith(starts)), len(lines))
            out.append("<p>" + _inline(" ".join(lines[i:end])) + "</p>")
            i = end
    return "\n".join(out)


def html_document(title: str, markdown: str, base: Path) -> str:
    """A whole HTML page of this Markdown, its images read from `base`."""
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"{markdown_to_html(markdown, base)}\n</main>\n</body>\n</html>\n")
