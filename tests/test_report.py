"""`thrifty report`: synthetic bench results -> HTML (checked in headless Chromium) and Markdown."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from thrifty.entrypoints.cli import main  # noqa: E402
from thrifty.report.report import build_report, write_html, write_markdown  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PRICE = 2.0  # USD per hour


def serve_result(label: str, *, rate: float | str = "inf", concurrency: int | None = None,
                 tput: float, price: float | None = PRICE) -> dict:
    """A bench_serve result whose latencies and counts follow from its throughput, so every
    field differs between points and the table check can tell them apart."""
    ttft = 1000.0 / tput * 20
    cost = price / 3600 / tput * 1e6 if price else None
    pcts = lambda base: {"mean": base * 1.1, "p50": base, "p90": base * 1.5, "p99": base * 2.5}  # noqa: E731
    return {
        "kind": "bench_serve", "label": label, "base_url": "http://127.0.0.1:8000/v1", "model": "SmolLM2-135M",
        "endpoint": "completions", "dataset": "random", "num_prompts": 64, "request_rate": rate,
        "max_concurrency": concurrency, "completed": 60 + int(tput) % 4, "failed": 4 - int(tput) % 4,
        "duration_s": 64 * 128 / tput, "total_input_tokens": 8192, "total_output_tokens": 8192,
        "request_throughput": tput / 128, "output_throughput": tput, "total_token_throughput": tput * 2,
        "ttft_ms": pcts(ttft), "tpot_ms": pcts(ttft / 10), "itl_ms": pcts(ttft / 10), "e2el_ms": pcts(ttft * 13),
        "goodput": tput / 256, "slos": {"ttft_ms": 500}, "price_per_hour_usd": price or 0.0,
        "cost_per_million_output_tokens_usd": cost, "cost_per_million_tokens_usd": cost / 2 if cost else None,
        "machine": "test-box (2 cores)", "date": "2026-11-20",
    }


def sweep_result(label: str, sweep: str, values: list, tputs: list[float], price: float | None = PRICE) -> dict:
    load_kw = "rate" if sweep == "request_rate" else "concurrency"
    points = [serve_result(label, tput=t, price=price, **{load_kw: v}) for v, t in zip(values, tputs, strict=True)]
    return {"kind": "bench_sweep", "label": label, "model": "SmolLM2-135M", "base_url": "http://127.0.0.1:8000/v1",
            "sweep": sweep, "values": values, "price_per_hour_usd": price or 0.0,
            "machine": "test-box (2 cores)", "date": "2026-11-21", "points": points}


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    """Two rate sweeps (one ending at "inf") and a single result without a price."""
    d = tmp_path / "in"
    d.mkdir()
    return [
        write_json(d / "thrifty.json", sweep_result("thrifty", "request_rate", [1, 4, 16, "inf"],
                                                    [100.0, 380.0, 610.0, 590.0])),
        write_json(d / "vllm.json", sweep_result("vllm", "request_rate", [1, 4, 16], [110.0, 420.0, 700.0])),
        write_json(d / "hf.json", serve_result("hf-baseline", rate=2.0, tput=150.0, price=None)),
    ]


class _TableCells(HTMLParser):
    """Text of each <td>/<th> row of the page's tables."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def html_rows(html: str) -> dict[str, list[str]]:
    parser = _TableCells()
    parser.feed(html)
    return {row[0]: row for row in parser.rows}


def md_rows(md: str) -> dict[str, list[str]]:
    rows = [[c.strip().replace("\\$", "$") for c in line.strip("|").split("|")]
            for line in md.splitlines() if line.startswith("| ")]
    return {row[0]: row for row in rows}


def test_table_takes_each_configuration_at_its_best_point(inputs):
    report = build_report(inputs, title="Rate sweep")
    rows = {r["configuration"]: r for r in report.table.rows}
    assert list(rows) == ["thrifty", "vllm", "hf-baseline"]

    best = serve_result("thrifty", rate=16, tput=610.0)  # 610 > 590 at "inf"
    t = rows["thrifty"]
    assert t["at load"] == "rate 16"
    assert (t["completed"], t["failed"]) == (best["completed"], best["failed"])
    assert t["req/s"] == pytest.approx(610 / 128)
    assert t["output tok/s"] == 610.0
    assert t["TTFT p50 (ms)"] == pytest.approx(best["ttft_ms"]["p50"])
    assert t["TTFT p99 (ms)"] == pytest.approx(best["ttft_ms"]["p99"])
    assert t["TPOT p50 (ms)"] == pytest.approx(best["tpot_ms"]["p50"])
    assert t["TPOT p99 (ms)"] == pytest.approx(best["tpot_ms"]["p99"])
    assert t["goodput (req/s)"] == pytest.approx(610 / 256)
    assert t["$/1M output tokens"] == pytest.approx(PRICE / 3600 / 610 * 1e6)
    assert rows["vllm"]["output tok/s"] == 700.0 and rows["vllm"]["at load"] == "rate 16"
    assert rows["hf-baseline"]["at load"] == "rate 2"
    assert rows["hf-baseline"]["$/1M output tokens"] is None

    # Every rate input shares one axis: throughput, TTFT, TPOT, then cost (without the unpriced one).
    assert [p.key for p in report.plots] == ["throughput-vs-rate", "ttft-vs-rate", "tpot-vs-rate", "cost"]
    assert all(p.png.startswith(b"\x89PNG") for p in report.plots)
    assert "hf-baseline" in report.plots[-1].note
    assert dict(report.facts())["dates"] == "2026-11-21, 2026-11-20"


def test_html_and_markdown_show_the_same_table(inputs, tmp_path):
    report = build_report(inputs, title="Rate sweep")
    html = write_html(report, tmp_path / "html" / "report.html").read_text()
    md_path, *pngs = write_markdown(report, tmp_path / "md" / "report.md")
    md = md_path.read_text()

    # thrifty at rate 16: 610 tok/s, 610 % 4 = 2 -> 62 completed, 2 failed; $2/h -> $0.911 per 1M.
    expected = ["thrifty", "rate 16", "62", "2", "4.77", "610.0", "32.8", "82.0", "3.3", "8.2", "2.38", "$0.911"]
    assert html_rows(html)["thrifty"] == expected
    assert md_rows(md)["thrifty"] == expected
    assert html_rows(html)["hf-baseline"][-1] == md_rows(md)["hf-baseline"][-1] == "—"
    for text in (html, md):
        assert "Rate sweep" in text and "test-box (2 cores)" in text and "2026-11-21" in text
        assert all(str(p) in text for p in inputs)

    # Self-contained: every resource is a data URI, nothing runs.
    assert not re.findall(r'(?:src|href)="(?!data:)', html) and "<script" not in html
    assert html.count('src="data:image/png;base64,') == len(report.drawn_plots)

    # The Markdown links PNG files that exist next to it, one per drawn plot.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(report.drawn_plots) == len(pngs)
    for link in links:
        png = md_path.parent / link
        assert png.is_file() and png.read_bytes().startswith(b"\x89PNG")


def test_axes_and_missing_prices(tmp_path):
    """A concurrency sweep gets its own plots; with no price at all, the cost plot is a note."""
    rate = write_json(tmp_path / "rate.json", sweep_result("a", "request_rate", [1, 2], [50.0, 90.0], price=None))
    conc = write_json(tmp_path / "conc.json", sweep_result("b", "max_concurrency", [1, 8, 32], [60, 300, 400],
                                                           price=None))
    single = write_json(tmp_path / "one.json", serve_result("c", concurrency=4, tput=200.0, price=None))
    report = build_report([rate, conc, single])
    assert [p.key for p in report.plots] == [
        "throughput-vs-rate", "throughput-vs-concurrency", "ttft-vs-rate", "ttft-vs-concurrency",
        "tpot-vs-rate", "tpot-vs-concurrency", "cost"]
    cost = report.plots[-1]
    assert cost.png is None and "price" in cost.note
    assert [r["at load"] for r in report.table.rows] == ["rate 2", "concurrency 32", "concurrency 4"]
    md = (write_markdown(report, tmp_path / "r.md")[0]).read_text()
    assert cost.note in md and cost.note in write_html(report, tmp_path / "r.html").read_text()


def test_repeated_labels_are_told_apart(tmp_path):
    a = write_json(tmp_path / "monday.json", serve_result("thrifty", rate=1, tput=10.0))
    b = write_json(tmp_path / "tuesday.json", serve_result("thrifty", rate=1, tput=20.0))
    labels = [c.label for c in build_report([a, b]).configurations]
    assert labels == ["thrifty (monday.json)", "thrifty (tuesday.json)"]


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    (json.dumps({"kind": "bench_throughput"}), "unknown kind 'bench_throughput'"),
    (json.dumps([1, 2]), "unknown kind None"),
    (json.dumps({"kind": "bench_sweep", "sweep": "request_rate", "points": []}), "without points"),
    (json.dumps({"kind": "bench_sweep", "sweep": "prompt_len", "points": [{}]}), "unknown sweep"),
    (json.dumps({"kind": "bench_serve", "request_rate": 1}), "output_throughput"),
])
def test_bad_input_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad_input.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        build_report([path])


def run_cli(argv: list[str]) -> int:
    return main(argv)  # the thrifty command: ValueError becomes exit code 2


def test_cli(inputs, tmp_path, capsys):
    out, md = tmp_path / "out" / "r.html", tmp_path / "out" / "r.md"
    assert run_cli(["report", *map(str, inputs), "--out", str(out), "--markdown", str(md), "--title", "CLI"]) == 0
    assert "<title>CLI</title>" in out.read_text()
    assert md.read_text().startswith("# CLI\n")
    assert len(list(md.parent.glob("r-*.png"))) == 4

    missing = tmp_path / "nope.json"
    assert run_cli(["report", str(inputs[0]), str(missing), "--out", str(tmp_path / "x.html")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


# --- the page in a real browser -------------------------------------------------------------

# Appended to a copy of the page: after `load`, records on <body> how many images decoded.
IMAGE_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
</script>"""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
    return proc


def test_html_renders_in_chromium_with_images_loaded(inputs, tmp_path):
    if shutil.which(CHROMIUM) is None:  # not there, or not executable
        pytest.skip("chromium not installed (apt-get install chromium)")
    report = build_report(inputs, title="Rate sweep")
    # Alone in its folder: an image that needed a file next to the page would not load.
    page = write_html(report, tmp_path / "page" / "report.html")
    num_plots = len(report.drawn_plots)
    assert num_plots == 4

    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri())
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert shot.stat().st_size > 50_000, "the screenshot looks blank"

    probe = tmp_path / "probe" / "report.html"
    probe.parent.mkdir()
    probe.write_text(page.read_text().replace("</body>", IMAGE_PROBE + "\n</body>"))
    dom = chromium(tmp_path, "--dump-dom", "--virtual-time-budget=5000", probe.as_uri()).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:2000]
    counts = dict(re.findall(r'data-(images|loaded)="(\d+)"', body.group(1)))
    assert counts == {"images": str(num_plots), "loaded": str(num_plots)}, body.group(0)


def test_inf_sits_right_of_the_finite_loads():
    from thrifty.report.inputs import RATE, Configuration
    from thrifty.report.plots import load_scale

    points = [{"request_rate": v, "output_throughput": 1.0} for v in (1, 4, 16, "inf")]
    scale = load_scale(RATE, [Configuration("x", Path("x.json"), RATE, points)])
    # Geometric rates get a log axis; inf goes one doubling past the largest finite rate.
    assert scale.log and scale.x(math.inf) == 32 and scale.ticks == [1, 4, 16, math.inf]
