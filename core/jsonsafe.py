"""Strict JSON for everything the service writes to Redis or sends (torch-free).

JSON has no NaN or Infinity; Python's json.dumps writes them anyway (`NaN`), which browsers'
JSON.parse and most other parsers reject. `dumps` turns a non-finite float into null (e.g. a
progress loss that went NaN just before the engine's guard stopped the run) and then encodes with
allow_nan=False, so nothing non-standard can get out.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every NaN/inf float (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps of `finite(value)` with allow_nan=False (other json.dumps arguments pass through)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
