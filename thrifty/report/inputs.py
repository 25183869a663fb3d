"""Reading `thrifty bench serve` / `thrifty bench sweep` JSON files into configurations.

A configuration is one labelled line on the plots and one row of the table: a sweep is a
configuration of several points, a single bench_serve result a configuration of one point.
Every point is a bench_serve result, kept as the dict it was written as (the field names are a
stable contract, see docs/design.md), so the report reads fields the bench adds later without
changes here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

RATE = "request_rate"
CONCURRENCY = "max_concurrency"
AXIS_TITLES = {RATE: "request rate (req/s)", CONCURRENCY: "max concurrency"}
AXIS_NAMES = {RATE: "rate", CONCURRENCY: "concurrency"}  # short: table cells, file names


def load_value(point: dict, axis: str) -> float:
    """The point's position on the load axis; "inf" (and, for concurrency, no limit) is math.inf."""
    value = point.get(axis)
    # float() also reads the string "inf" and the Infinity that json.dump writes for float("inf").
    return math.inf if value is None else float(value)


def format_load(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"


@dataclass
class Configuration:
    label: str
    source: Path
    axis: str  # RATE or CONCURRENCY: what the points vary
    points: list[dict]  # bench_serve results, sorted by load
    machine: str | None = None
    date: str | None = None
    model: str | None = None

    def load(self, point: dict) -> float:
        return load_value(point, self.axis)

    def best(self) -> dict:
        """The point the table and the cost plot describe: the one with the highest output tok/s."""
        return max(self.points, key=lambda p: p["output_throughput"])


def _single_axis(point: dict) -> str:
    # A lone result measured with a concurrency cap and no rate limit is a concurrency point;
    # anything else (a rate, or neither limit) sits on the rate axis.
    if point.get(CONCURRENCY) is not None and math.isinf(load_value(point, RATE)):
        return CONCURRENCY
    return RATE


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_point(path: Path, where: str, point: object, axis: str) -> None:
    if not isinstance(point, dict):
        raise ValueError(f"{path}: {where} is not a JSON object")
    if not _is_number(point.get("output_throughput")):
        raise ValueError(f"{path}: {where} has no numeric 'output_throughput'")
    try:
        load_value(point, axis)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {where} has a bad {axis!r}: {point.get(axis)!r}") from None


def _read_json(path: Path) -> object:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def load_file(path: str | Path) -> Configuration:
    """One input file as a configuration; any problem is a ValueError that names the file."""
    path = Path(path)
    data = _read_json(path)
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "bench_serve":
        axis = _single_axis(data)
        _check_point(path, "the result", data, axis)
        points = [data]
    elif kind == "bench_sweep":
        axis = data.get("sweep")
        if axis not in AXIS_TITLES:
            raise ValueError(f"{path}: unknown sweep {axis!r}, expected {RATE!r} or {CONCURRENCY!r}")
        points = data.get("points")
        if not isinstance(points, list) or not points:
            raise ValueError(f"{path}: a bench_sweep without points")
        for i, point in enumerate(points):
            _check_point(path, f"point {i}", point, axis)
    else:
        raise ValueError(f"{path}: unknown kind {kind!r}, expected 'bench_serve' or 'bench_sweep'")
    first = points[0]
    return Configuration(
        label=str(data.get("label") or path.stem),
        source=path,
        axis=axis,
        points=sorted(points, key=lambda p: load_value(p, axis)),
        # A sweep records these once at the top; fall back to its points for older files.
        machine=data.get("machine") or first.get("machine"),
        date=data.get("date") or first.get("date"),
        model=data.get("model") or first.get("model"),
    )


def _make_labels_unique(configs: list[Configuration]) -> None:
    # Two runs of the same label (say "thrifty" today and last week) must stay apart on the
    # plots, so a repeated label gets its file's name, then a number if even that repeats.
    seen: set[str] = set()
    repeated = {c.label for c in configs if sum(d.label == c.label for d in configs) > 1}
    for config in configs:
        label = f"{config.label} ({config.source.name})" if config.label in repeated else config.label
        unique, n = label, 2
        while unique in seen:
            unique, n = f"{label} #{n}", n + 1
        config.label = unique
        seen.add(unique)


def load_files(paths: Iterable[str | Path]) -> list[Configuration]:
    configs = [load_file(p) for p in paths]
    if not configs:
        raise ValueError("no input files")
    _make_labels_unique(configs)
    return configs
