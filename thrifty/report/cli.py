"""The `thrifty report` subcommand; `register` adds it to the `thrifty` command's subparsers."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="an HTML page (and Markdown) of plots and a table from bench serve/sweep JSON files",
        description="Plots throughput, TTFT/TPOT percentiles against load and $ per 1M output tokens, and "
                    "tabulates each configuration at its highest-throughput point.")
    p.add_argument("files", nargs="+", metavar="FILE", help="bench_serve or bench_sweep JSON files")
    p.add_argument("--out", default="report.html",
                   help="the HTML page to write, self-contained (default: report.html)")
    p.add_argument("--markdown", default=None, metavar="MD",
                   help="also write Markdown here, with the plots as PNG files next to it")
    p.add_argument("--title", default=None, help="the report's title")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """Bad input files raise ValueError naming the file; the thrifty command makes it exit 2."""
    # Imported here so that `thrifty --help` does not pay for importing matplotlib.
    from thrifty.report.report import build_report, write_html, write_markdown

    report = build_report(args.files, title=args.title)
    print(f"wrote {write_html(report, args.out)}")
    if args.markdown:
        md, *images = write_markdown(report, args.markdown)
        print(f"wrote {md} and {len(images)} PNG file(s) next to it")
    skipped = [p for p in report.plots if p.png is None]
    for plot in skipped:
        print(f"note: {plot.title}: {plot.note}", file=sys.stderr)
    return 0
