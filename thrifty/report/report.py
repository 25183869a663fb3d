"""`thrifty report`: bench serve / sweep results -> one HTML page and/or a Markdown file.

build_report() reads and checks the inputs, draws the plots and fills the comparison table;
write_html() and write_markdown() only lay that out (render.py), so both show the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from thrifty.report.inputs import AXIS_NAMES, Configuration, format_load, load_files
from thrifty.report.plots import Plot, cost_per_million, make_plots, percentile
from thrifty.report.render import render_html, render_markdown

DEFAULT_TITLE = "thrifty benchmark report"
MISSING = "—"


def _fixed(digits: int) -> Callable[[object], str]:
    def fmt(value: object) -> str:
        if value is None:
            return MISSING
        # A field of an unexpected type is shown as written rather than failing the whole report.
        return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else str(value)
    return fmt


def _money(value: object) -> str:
    if value is None:
        return MISSING
    # Cents are enough above a dollar; below, keep three significant digits ($0.00412).
    return f"${value:,.2f}" if value >= 1 else f"${value:.3g}"


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Configuration, dict], object]  # (configuration, its best point) -> raw value
    fmt: Callable[[object], str] = str
    numeric: bool = True  # aligned right


def _load_text(config: Configuration, point: dict) -> str:
    return f"{AXIS_NAMES[config.axis]} {format_load(config.load(point))}"


def _field(name: str) -> Callable[[Configuration, dict], object]:
    return lambda config, point: point.get(name)


def _pct(metric: str, pct: str) -> Callable[[Configuration, dict], object]:
    return lambda config, point: percentile(point, metric, pct)


COLUMNS: tuple[Column, ...] = (
    Column("configuration", lambda c, p: c.label, numeric=False),
    Column("at load", _load_text, numeric=False),
    Column("completed", _field("completed"), _fixed(0)),
    Column("failed", _field("failed"), _fixed(0)),
    Column("req/s", _field("request_throughput"), _fixed(2)),
    Column("output tok/s", _field("output_throughput"), _fixed(1)),
    Column("TTFT p50 (ms)", _pct("ttft_ms", "p50"), _fixed(1)),
    Column("TTFT p99 (ms)", _pct("ttft_ms", "p99"), _fixed(1)),
    Column("TPOT p50 (ms)", _pct("tpot_ms", "p50"), _fixed(1)),
    Column("TPOT p99 (ms)", _pct("tpot_ms", "p99"), _fixed(1)),
    Column("goodput (req/s)", _field("goodput"), _fixed(2)),
    Column("$/1M output tokens", lambda c, p: cost_per_million(p), _money),
)


@dataclass
class Table:
    """One row per configuration at its highest-throughput point; raw values keyed by header."""

    columns: tuple[Column, ...]
    rows: list[dict[str, object]]

    @property
    def headers(self) -> list[str]:
        return [c.header for c in self.columns]

    def cells(self) -> list[list[str]]:
        return [[c.fmt(row[c.header]) for c in self.columns] for row in self.rows]


def comparison_table(configs: list[Configuration]) -> Table:
    rows = [{col.header: col.value(c, c.best()) for col in COLUMNS} for c in configs]
    return Table(COLUMNS, rows)


def _distinct(values: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))  # first-seen order


@dataclass
class Report:
    title: str
    configurations: list[Configuration]
    plots: list[Plot]
    table: Table

    def facts(self) -> list[tuple[str, str]]:
        """The header lines: which machines, dates and models the numbers come from."""
        configs = self.configurations
        facts = [("machine", _distinct(c.machine for c in configs)),
                 ("date", _distinct(c.date for c in configs)),
                 ("model", _distinct(c.model for c in configs))]
        return [(name + ("s" if len(v) > 1 else ""), ", ".join(v) or "unknown") for name, v in facts]

    @property
    def drawn_plots(self) -> list[Plot]:
        return [p for p in self.plots if p.png is not None]


def build_report(paths: Iterable[str | Path], title: str | None = None) -> Report:
    """Reads the files (ValueError naming a bad one), draws the plots, fills the table."""
    configs = load_files(paths)
    return Report(title or DEFAULT_TITLE, configs, make_plots(configs), comparison_table(configs))


def write_html(report: Report, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path


def write_markdown(report: Report, path: str | Path) -> list[Path]:
    """The Markdown file and, next to it, one PNG per drawn plot named `<stem>-<plot key>.png`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    written = [path]
    for plot in report.drawn_plots:
        image = path.with_name(f"{path.stem}-{plot.key}.png")
        image.write_bytes(plot.png)
        images[plot.key] = image.name  # relative: the folder can be moved or committed as is
        written.append(image)
    path.write_text(render_markdown(report, images), encoding="utf-8")
    return written
