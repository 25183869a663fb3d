"""Reading a user's JSON (or YAML) file, with an error that names the option it came from."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path!r} is not valid JSON: {e}") from None


def read_mapping(path: str | Path, what: str) -> dict:
    """A YAML or JSON file holding a mapping (JSON is YAML, but a .json file gets JSON's errors);
    an empty file is an empty mapping. Errors name `what` and the path."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {str(path)!r}: {e.strerror}") from None
    import yaml

    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:  # (YAMLError is not a ValueError)
        raise ValueError(f"{what} {path}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a mapping at the top, got {type(data).__name__}")
    return data
