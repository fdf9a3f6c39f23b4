"""The JSON report: the report dict as strict JSON (indent 2, sorted keys).

Non-finite floats become the strings "inf", "-inf" and "nan" (the convention of vexport.parity), numpy
scalars and arrays become plain numbers and lists, paths become strings, so the output always parses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """A copy of `value` made only of dicts, lists, strings, finite floats, ints, bools and None."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} to a JSON report")


def render_json(report: Mapping[str, Any]) -> str:
    """The report as JSON text ending in a newline."""
    return json.dumps(to_jsonable(report), indent=2, sort_keys=True, allow_nan=False) + "\n"
