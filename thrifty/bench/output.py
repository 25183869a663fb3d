"""One benchmark result as a JSON line: printed, and appended to a results file if one is given,
with the machine it was measured on (lscpu's model name and flags), as every figure needs."""

from __future__ import annotations

import json

from thrifty.cpuinfo import cpu_flags_line, cpu_name


def emit_json_line(record: dict, path: str | None = None) -> None:
    line = json.dumps({**record, "cpu": cpu_name(), "cpu_flags": cpu_flags_line()})
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
