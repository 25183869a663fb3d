"""The price table: a dated JSON file of accelerators and instances, plus the user's own entries.

Built-in entries live in `prices.json` next to this file. A user file (`--prices FILE`, or the path in
the `THRIFTY_PRICES` environment variable) adds entries or overrides them, merged by name
(case-insensitive), field by field. The file holds `{"entries": [...]}` or a bare list of entries.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from importlib import resources

from thrifty.cost.formula import check_number, num, table_lines
from thrifty.cpuinfo import cpu_vendor
from thrifty.jsonio import read_json
from thrifty.machine import machine_share

PRICES_ENV = "THRIFTY_PRICES"
KINDS = ("gpu", "cpu", "instance")


def _tokens(text: str) -> tuple[str, ...]:
    # Tokens, not substrings: "L4" must not match "NVIDIA L40S", nor "A10G" match "A100".
    return tuple(re.findall(r"[a-z0-9]+", text.lower()))


@dataclass(frozen=True)
class PriceEntry:
    name: str
    kind: str  # gpu: price of one accelerator; cpu: a CPU-only instance; instance: a whole multi-GPU machine
    price_per_hour_usd: float
    source: str  # where the price was taken (URL or document); the hardware figures' datasheet too
    date: str  # when the price was taken (YYYY-MM or YYYY-MM-DD), or "unknown"
    accelerators: int = 1
    memory_gib: float | None = None
    memory_bandwidth_gbps: float | None = None  # decode reads all weights once per step: this sets its speed
    peak_bf16_tflops: float | None = None  # dense, no sparsity: this sets prefill speed
    match: tuple[str, ...] = ()  # more ways a device reports its name, e.g. "H100 HBM3"
    vcpus: int | None = None  # an instance's vCPUs: a CPU server's default price is scaled by them
    cpu_vendor: str = ""  # the CPU's vendor_id in /proc/cpuinfo ("GenuineIntel", "AuthenticAMD")
    notes: str = ""

    @classmethod
    def from_dict(cls, d: dict, where: str) -> PriceEntry:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: an entry must be a JSON object, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        for required in ("name", "kind", "price_per_hour_usd", "source", "date"):
            if d.get(required) in (None, ""):
                raise ValueError(f"{where}: field {required!r} is required")
        name = str(d["name"])
        where = f"{where} ({name})"
        if d["kind"] not in KINDS:
            raise ValueError(f"{where}: kind must be one of {KINDS}, got {d['kind']!r}")
        kw: dict = {"name": name, "kind": d["kind"], "source": str(d["source"]), "date": str(d["date"]),
                    "notes": str(d.get("notes", "")), "cpu_vendor": str(d.get("cpu_vendor") or "")}
        kw["price_per_hour_usd"] = check_number(f"{where}: price_per_hour_usd", d["price_per_hour_usd"],
                                                allow_equal=True)
        for key in ("memory_gib", "memory_bandwidth_gbps", "peak_bf16_tflops"):
            if d.get(key) is not None:
                kw[key] = check_number(f"{where}: {key}", d[key])
        accelerators = d.get("accelerators", 0 if d["kind"] == "cpu" else 1)
        if isinstance(accelerators, bool) or not isinstance(accelerators, int) or accelerators < 0:
            raise ValueError(f"{where}: accelerators must be an integer >= 0, got {accelerators!r}")
        kw["accelerators"] = accelerators
        vcpus = d.get("vcpus")
        if vcpus is not None:
            if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
                raise ValueError(f"{where}: vcpus must be an integer >= 1, got {vcpus!r}")
            kw["vcpus"] = vcpus
        match = d.get("match", [])
        if not isinstance(match, list) or not all(isinstance(m, str) for m in match):
            raise ValueError(f"{where}: match must be a list of strings, got {match!r}")
        kw["match"] = tuple(match)
        return cls(**kw)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["match"] = list(self.match)
        return d

    def patterns(self) -> list[tuple[str, ...]]:
        """Token sets that identify this entry in a device name: its own name and its `match` strings."""
        return [_tokens(self.name)] + [_tokens(m) for m in self.match]


@dataclass(frozen=True)
class PriceTable:
    entries: tuple[PriceEntry, ...]
    as_of: str = ""
    note: str = ""
    files: tuple[str, ...] = field(default=())  # the files merged, in order

    def get(self, name: str) -> PriceEntry | None:
        key = name.strip().lower()
        return next((e for e in self.entries if e.name.lower() == key), None)

    def for_device(self, device_name: str) -> PriceEntry | None:
        """The entry for a device name as CUDA/ROCm reports it, e.g. "NVIDIA H100 80GB HBM3".

        An exact name wins; otherwise the entry with the most specific pattern (most tokens) whose
        tokens all appear in the device name. No match gives None: a wrong price is worse than none.
        """
        exact = self.get(device_name)
        if exact is not None:
            return exact
        have = set(_tokens(device_name))
        best, best_len = None, 0
        for entry in self.entries:
            for pattern in entry.patterns():
                if pattern and set(pattern) <= have and len(pattern) > best_len:
                    best, best_len = entry, len(pattern)
        return best

    def lookup(self, name: str, field_name: str) -> PriceEntry:
        """An entry by table name or device name, or a ValueError naming the field it came from."""
        entry = self.for_device(name)
        if entry is None:
            raise ValueError(f"{field_name}: {name!r} is not in the price table (known: "
                             f"{', '.join(e.name for e in self.entries)}); add it with --prices FILE")
        return entry

    def lines(self) -> list[str]:
        head = ["name", "kind", "$/hour", "accel", "vCPU", "mem GiB", "mem GB/s", "bf16 TFLOP/s", "date", "source"]
        rows = [[e.name, e.kind, num(e.price_per_hour_usd), str(e.accelerators), num(e.vcpus), num(e.memory_gib),
                 num(e.memory_bandwidth_gbps), num(e.peak_bf16_tflops), e.date, e.source] for e in self.entries]
        out = [f"price table (list prices as of {self.as_of or 'the dates shown'}; not quotes)"]
        out += table_lines([head, *rows], align="llrrrrrrll")
        if self.note:
            out += ["", self.note]
        if self.files:
            out.append("merged from: " + ", ".join(self.files))
        return out

    def to_dict(self) -> dict:
        return {"kind": "cost_prices", "as_of": self.as_of, "note": self.note, "files": list(self.files),
                "entries": [e.to_dict() for e in self.entries]}



def _entries_of(data, where: str) -> list:
    entries = data.get("entries") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{where}: expected a list of entries or an object with 'entries'")
    return entries


def builtin_prices() -> PriceTable:
    text = resources.files("thrifty.cost").joinpath("prices.json").read_text()
    data = json.loads(text)
    entries = tuple(PriceEntry.from_dict(e, f"prices.json entries[{i}]")
                    for i, e in enumerate(_entries_of(data, "prices.json")))
    return PriceTable(entries, data.get("as_of", ""), data.get("note", ""), ("built-in prices.json",))


def merge_prices(table: PriceTable, overrides: list, origin: str) -> PriceTable:
    """`table` with `overrides` (entry dicts) merged by name: a known name takes the given fields,
    a new name is appended (and must have every required field)."""
    entries = list(table.entries)
    for i, raw in enumerate(overrides):
        where = f"{origin} entries[{i}]"
        if not isinstance(raw, dict) or not raw.get("name"):
            raise ValueError(f"{where}: each entry needs a 'name'")
        key = str(raw["name"]).strip().lower()
        index = next((j for j, e in enumerate(entries) if e.name.lower() == key), None)
        if index is None:
            d = {"source": f"user file {origin}", "date": "unknown", **raw}
            entries.append(PriceEntry.from_dict(d, where))
            continue
        d = entries[index].to_dict()
        # source and date describe the price: a new price without them must not inherit the old ones.
        if "price_per_hour_usd" in raw:
            d["source"], d["date"] = f"user file {origin}", "unknown"
        d.update(raw)
        d["name"] = entries[index].name
        entries[index] = PriceEntry.from_dict(d, where)
    return replace(table, entries=tuple(entries), files=table.files + (origin,))


def load_prices(path: str | None = None, *, use_env: bool = True) -> PriceTable:
    """The built-in table, then the THRIFTY_PRICES file, then `path`: later files win."""
    table = builtin_prices()
    paths = []
    if use_env and os.environ.get(PRICES_ENV):
        paths.append((os.environ[PRICES_ENV], PRICES_ENV))
    if path:
        paths.append((path, "prices"))
    for p, what in paths:
        table = merge_prices(table, _entries_of(read_json(p, what), f"{what} {p!r}"), p)
    return table


def price_for_device(device_name: str, table: PriceTable | None = None) -> PriceEntry | None:
    """The table entry for a CUDA device name (torch.cuda.get_device_name()), e.g. the server's default
    price on CUDA. Uses the built-in table merged with THRIFTY_PRICES unless a table is given."""
    return (table or load_prices()).for_device(device_name)


@dataclass(frozen=True)
class PriceChoice:
    """The price a server computes its costs with, and where it came from (thrifty:price_info)."""
    price_per_hour_usd: float
    source: str  # "flag" (--price-per-hour), "table" (the GPU's entry), "estimate" (a CPU instance), "off"
    entry: str = ""  # the price table entry used, if any
    detail: str = ""  # what was chosen and why, for people

    def describe(self) -> str:
        how = "--price-per-hour sets it, 0 turns cost off"
        if self.source == "off":
            return f"price: none, costs are 0 ({self.detail}); {how}"
        return f"price: ${self.price_per_hour_usd:.4g}/h, {self.source}: {self.detail}; {how}"


def _per_vcpu(entry: PriceEntry) -> float:
    return entry.price_per_hour_usd / entry.vcpus


def price_for_cpu(vendor: str, vcpus: float, memory_gib: float | None = None,
                  table: PriceTable | None = None) -> PriceChoice | None:
    """An estimate for a CPU-only server that may use `vcpus` CPUs: the price table's CPU instance of
    the same vendor (/proc/cpuinfo's vendor_id) with the nearest vCPU count, scaled per vCPU (cloud
    providers price the sizes of a family in proportion to their vCPUs). Another vendor (ARM, say)
    takes the cheapest CPU per vCPU in the table. Memory is reported, not matched: the table's CPU
    entries are all of one memory-to-vCPU ratio, and a container sees the host's MemTotal unless a
    cgroup limits it. None if the table has no CPU entry with a vCPU count."""
    if vcpus <= 0:
        raise ValueError(f"vcpus must be > 0, got {vcpus}")
    cpus = [e for e in (table or load_prices()).entries if e.kind == "cpu" and e.vcpus]
    if not cpus:
        return None
    same = [e for e in cpus if e.cpu_vendor and e.cpu_vendor == vendor]
    if same:
        entry = min(same, key=lambda e: (abs(e.vcpus - vcpus), _per_vcpu(e)))
        why = ""
    else:
        entry = min(cpus, key=lambda e: (_per_vcpu(e), abs(e.vcpus - vcpus)))
        why = f"; CPU vendor {vendor or 'unknown'!r} is not in the table, so its cheapest CPU per vCPU"
    spec = f"{entry.vcpus} vCPU" + (f", {num(entry.memory_gib)} GiB" if entry.memory_gib else "")
    mem = "" if memory_gib is None else f" ({memory_gib:.1f} GiB memory here)"
    detail = (f"{entry.name} ({spec}, ${num(entry.price_per_hour_usd)}/h, {entry.date}) scaled to "
              f"{vcpus:g} vCPU{mem}{why}")
    return PriceChoice(_per_vcpu(entry) * vcpus, "estimate", entry.name, detail)


def server_price(given: float | None, gpu_name: str | None = None, *, vcpus: float | None = None,
                 table: PriceTable | None = None) -> PriceChoice:
    """The price a server uses: `given` (--price-per-hour; 0 turns cost off) wins; else on a GPU
    (`gpu_name` as CUDA reports it) its table entry; else an estimate for this machine's CPUs
    (`vcpus`, default what this process may use: affinity capped by a cgroup quota)."""
    if given is not None:
        given = check_number("price_per_hour", given, allow_equal=True)
        if given == 0:
            return PriceChoice(0.0, "off", detail="--price-per-hour 0")
        return PriceChoice(given, "flag", detail=f"--price-per-hour {num(given)}")
    table = table or load_prices()
    if gpu_name is not None:
        entry = table.for_device(gpu_name)
        if entry is None:
            return PriceChoice(0.0, "off", detail=f"no price table entry for {gpu_name}")
        return PriceChoice(entry.price_per_hour_usd, "table", entry.name,
                           f"{entry.name} for {gpu_name} (${num(entry.price_per_hour_usd)}/h, {entry.date}, "
                           f"{entry.source})")
    share = machine_share()
    estimate = price_for_cpu(cpu_vendor(), vcpus or share.vcpus, share.memory_gib, table)
    if estimate is None:
        return PriceChoice(0.0, "off", detail="the price table has no CPU entry with vcpus")
    return estimate
