"""`thrifty report`: plots and a comparison table from `thrifty bench serve` / `bench sweep` JSON files.

    from thrifty.report import build_report, write_html, write_markdown
    report = build_report(["a.json", "b.json"], title="rate sweep")
    write_html(report, "report.html")          # self-contained: plots inline as data URIs
    write_markdown(report, "report.md")        # plots as report-<plot>.png next to it
"""

from __future__ import annotations

__all__ = ["build_report", "write_html", "write_markdown"]


def __getattr__(name: str):
    # Lazy: `thrifty --help` imports thrifty.report.cli, and must not pay for importing matplotlib.
    if name in __all__:
        from thrifty.report import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
