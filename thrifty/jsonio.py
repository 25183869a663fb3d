"""Reading a user's JSON file, with an error that names the option it came from."""

from __future__ import annotations

import json


def read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path!r} is not valid JSON: {e}") from None
