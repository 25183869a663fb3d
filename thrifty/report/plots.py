"""The report's plots, drawn with matplotlib's Agg canvas into PNG bytes.

Figures are built with `matplotlib.figure.Figure` rather than pyplot: no global figure registry,
no GUI backend choice, nothing to close, and safe to call from a server thread.
A plot the inputs cannot support comes back with no PNG and a note saying why, so a report is
always produced and says what is missing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from thrifty.report.inputs import AXIS_NAMES, AXIS_TITLES, Configuration, format_load

PERCENTILES = ("p50", "p90", "p99")
LATENCIES = {"ttft_ms": "TTFT", "tpot_ms": "TPOT"}
DPI = 100


@dataclass
class Plot:
    key: str  # stable and file-name safe: names the Markdown's PNG files
    title: str
    png: bytes | None = None  # None: skipped, and `note` says why
    note: str | None = None  # also a caveat on a drawn plot (configurations left out)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # attaches itself to the figure
    buf = io.BytesIO()
    # No "Software" metadata: the same inputs give byte-identical PNGs.
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def percentile(point: dict, metric: str, pct: str) -> float | None:
    stats = point.get(metric)
    return _number(stats.get(pct)) if isinstance(stats, dict) else None


@dataclass
class LoadScale:
    """Where load values go on the x axis. inf (no rate limit) has no place on a numeric axis, so it
    sits one step right of the largest finite value and its tick reads "inf"."""

    axis: str
    log: bool
    inf_x: float
    ticks: list[float]  # load values, inf included

    def x(self, load: float) -> float:
        return self.inf_x if math.isinf(load) else load

    def apply(self, ax) -> None:
        if self.log:
            ax.set_xscale("log", base=2)
        ax.set_xticks([self.x(v) for v in self.ticks], [format_load(v) for v in self.ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(AXIS_TITLES[self.axis])


def load_scale(axis: str, configs: list[Configuration]) -> LoadScale:
    loads = sorted({c.load(p) for c in configs for p in c.points})
    finite = [v for v in loads if not math.isinf(v)]
    # Sweeps are usually geometric (1, 2, 4, ... req/s): a log axis keeps the low end readable.
    log = bool(finite) and finite[0] > 0 and finite[-1] / finite[0] >= 8
    if not finite:
        inf_x = 1.0
    elif log:
        inf_x = finite[-1] * 2
    else:
        inf_x = finite[-1] + max((finite[-1] - finite[0]) * 0.25, 1.0)
    return LoadScale(axis, log, inf_x, loads)


def _draw_lines(ax, scale: LoadScale, configs: list[Configuration], colors: dict[str, str],
                y_of: Callable[[dict], float | None]) -> bool:
    """One line per configuration (markers, so one-point configurations show); False if nothing drawn."""
    drawn = False
    for config in configs:
        xy = [(scale.x(config.load(p)), y) for p in config.points if (y := y_of(p)) is not None]
        if xy:
            xs, ys = zip(*xy, strict=True)
            ax.plot(xs, ys, marker="o", color=colors[config.label], label=config.label)
            drawn = True
    scale.apply(ax)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    return drawn


def throughput_plot(axis: str, configs: list[Configuration], colors: dict[str, str]) -> Plot:
    plot = Plot(f"throughput-vs-{AXIS_NAMES[axis]}", f"Output throughput vs {AXIS_TITLES[axis]}")
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    _draw_lines(ax, load_scale(axis, configs), configs, colors, lambda p: _number(p.get("output_throughput")))
    ax.set_ylabel("output tokens/s")
    ax.set_title(plot.title)
    ax.legend()
    plot.png = _png(fig)
    return plot


def latency_plot(metric: str, axis: str, configs: list[Configuration], colors: dict[str, str]) -> Plot:
    name = LATENCIES[metric]
    plot = Plot(f"{name.lower()}-vs-{AXIS_NAMES[axis]}", f"{name} percentiles vs {AXIS_TITLES[axis]}")
    # One panel per percentile rather than one crowded panel: p99 is often 10x p50, which would
    # flatten the p50 lines, and each panel needs only one legend.
    fig = Figure(figsize=(13, 4))
    scale = load_scale(axis, configs)
    drawn = False
    for i, pct in enumerate(PERCENTILES):
        ax = fig.add_subplot(1, len(PERCENTILES), i + 1)
        drawn |= _draw_lines(ax, scale, configs, colors, lambda p, pct=pct: percentile(p, metric, pct))
        ax.set_title(f"{name} {pct}")
        ax.set_ylabel(f"{name} (ms)")
        if i == 0:
            ax.legend()
    if not drawn:
        plot.note = f"Not drawn: no {name} percentiles in the inputs."
        return plot
    fig.suptitle(plot.title)
    plot.png = _png(fig)
    return plot


def cost_per_million(point: dict) -> float | None:
    return _number(point.get("cost_per_million_output_tokens_usd"))


def cost_plot(configs: list[Configuration], colors: dict[str, str]) -> Plot:
    plot = Plot("cost", "$ per 1M output tokens (each configuration at its highest throughput)")
    priced = [(c, cost) for c in configs if (cost := cost_per_million(c.best())) is not None]
    unpriced = [c.label for c in configs if cost_per_million(c.best()) is None]
    if not priced:
        plot.note = "Not drawn: no input gives a price (run the bench with a price per hour)."
        return plot
    if unpriced:
        plot.note = f"Left out, no price given: {', '.join(unpriced)}."
    fig = Figure(figsize=(max(5.0, 1.4 * len(priced) + 2), 4.5))
    ax = fig.add_subplot()
    labels = [c.label for c, _ in priced]
    bars = ax.bar(labels, [cost for _, cost in priced], color=[colors[label] for label in labels])
    ax.bar_label(bars, labels=[f"${cost:.3g}" for _, cost in priced], padding=2)
    ax.set_ylabel("USD per 1M output tokens")
    ax.set_title(plot.title)
    ax.margins(y=0.15)  # room for the value labels above the bars
    ax.grid(True, axis="y", alpha=0.3)
    if len(priced) > 4:
        ax.tick_params(axis="x", labelrotation=20)
    plot.png = _png(fig)
    return plot


def make_plots(configs: list[Configuration]) -> list[Plot]:
    """Throughput, TTFT and TPOT against load (one set per load axis present), then cost."""
    # One colour per configuration, the same on every plot (matplotlib's 10-colour cycle).
    colors = {c.label: f"C{i % 10}" for i, c in enumerate(configs)}
    by_axis: dict[str, list[Configuration]] = {}
    for config in configs:
        by_axis.setdefault(config.axis, []).append(config)
    plots = [throughput_plot(axis, group, colors) for axis, group in by_axis.items()]
    for metric in LATENCIES:
        plots += [latency_plot(metric, axis, group, colors) for axis, group in by_axis.items()]
    plots.append(cost_plot(configs, colors))
    return plots
