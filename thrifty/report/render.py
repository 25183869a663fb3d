"""Laying a Report out as a self-contained HTML page or as Markdown.

The HTML page carries everything inside it (inline CSS, plots as base64 PNG data URIs, no script),
so it can be mailed, attached to a CI run or opened offline. The Markdown links PNG files that
write_markdown() puts next to it. Both walk the same sections in the same order.
"""

from __future__ import annotations

import base64
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # report.py imports this module
    from thrifty.report.plots import Plot
    from thrifty.report.report import Report

TABLE_CAPTION = "Each configuration at its highest-throughput point."

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1300px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.3rem; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption, .note { color: #555; font-size: 0.9rem; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; }
th { background: #f3f3f3; }
td { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { text-align: left; margin-bottom: 0.3rem; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def _inputs(report: Report) -> list[tuple[str, str]]:
    """(file, what it holds) for each input."""
    return [(str(c.source), f"{c.label}, {len(c.points)} point{'s' if len(c.points) > 1 else ''}")
            for c in report.configurations]


def _html_plot(plot: Plot) -> str:
    title = escape(plot.title)
    if plot.png is None:
        return f'<p class="note" id="{plot.key}"><strong>{title}</strong>: {escape(plot.note or "")}</p>'
    data = base64.b64encode(plot.png).decode("ascii")
    # The title is drawn in the image already; the caption only carries a caveat.
    caption = f"<figcaption>{escape(plot.note)}</figcaption>" if plot.note else ""
    return f'<figure id="{plot.key}"><img src="data:image/png;base64,{data}" alt="{title}">{caption}</figure>'


def _html_table(report: Report) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in report.table.headers)
    body = []
    for cells in report.table.cells():
        tds = "".join(f'<td class="num">{escape(v)}</td>' if col.numeric else f"<td>{escape(v)}</td>"
                      for col, v in zip(report.table.columns, cells, strict=True))
        body.append(f"<tr>{tds}</tr>")
    return (f"<table><caption class=\"note\">{TABLE_CAPTION}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def render_html(report: Report) -> str:
    facts = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in report.facts())
    inputs = "".join(f"<li><code>{escape(f)}</code>: {escape(what)}</li>" for f, what in _inputs(report))
    plots = "\n".join(_html_plot(p) for p in report.plots)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{escape(report.title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{escape(report.title)}</h1>
<dl class="facts">{facts}</dl>
<h2>Inputs</h2>
<ul>{inputs}</ul>
<h2>Plots</h2>
{plots}
<h2>Comparison</h2>
{_html_table(report)}
</body>
</html>
"""


def _md(text: str) -> str:
    # "|" would split a table cell; two "$" on one line read as LaTeX math on GitHub.
    return text.replace("|", "\\|").replace("$", "\\$")


def _md_plot(plot: Plot, images: dict[str, str]) -> list[str]:
    lines = [f"### {_md(plot.title)}", ""]
    if plot.key in images:
        lines += [f"![{_md(plot.title)}]({images[plot.key]})", ""]
    if plot.note:
        lines += [f"*{_md(plot.note)}*", ""]
    return lines


def render_markdown(report: Report, images: dict[str, str]) -> str:
    """`images` maps a drawn plot's key to the PNG's path relative to the Markdown file."""
    lines = [f"# {_md(report.title)}", ""]
    lines += [f"- **{k}**: {_md(v)}" for k, v in report.facts()]
    lines += ["", "## Inputs", ""]
    lines += [f"- `{f}`: {_md(what)}" for f, what in _inputs(report)]
    lines += ["", "## Plots", ""]
    for plot in report.plots:
        lines += _md_plot(plot, images)
    lines += ["## Comparison", "", TABLE_CAPTION, ""]
    headers = report.table.headers
    lines.append("| " + " | ".join(_md(h) for h in headers) + " |")
    lines.append("|" + "|".join("---:" if col.numeric else "---" for col in report.table.columns) + "|")
    lines += ["| " + " | ".join(_md(v) for v in cells) + " |" for cells in report.table.cells()]
    return "\n".join(lines) + "\n"
