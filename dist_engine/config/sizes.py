"""Sizes and durations as users write them: ``2GiB``, ``512MiB``, ``500MB``, ``1000000``;
``30s``, ``500ms``, ``2m``, ``45``. One parser for the CLI, the Python API and the configs."""

from __future__ import annotations

import math
import re

SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
              "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
              "tib": 2**40}
DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0, "min": 60.0, "h": 3600.0}
SIZE_FORMS = "bytes as an int, or a string such as '2GiB', '512MiB', '500MB', '1000000'"
DURATION_FORMS = "seconds as a number, or a string such as '30s', '500ms', '2m'"
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$")


def parse_size(value: int | float | str, name: str = "size") -> int:
    """Bytes from an int (or a whole float) or a string with a decimal or binary unit; raises
    ``ValueError`` naming ``name`` and the accepted forms for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: {value!r} is not a size; use {SIZE_FORMS}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
            raise ValueError(f"{name}: {value!r} is not a whole number of bytes; use {SIZE_FORMS}")
        return int(value)
    if isinstance(value, str):
        m = _NUMBER_UNIT.match(value.lower())
        if m and m.group(2) in SIZE_UNITS:
            return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])
    raise ValueError(f"{name}: {value!r} is not a size; use {SIZE_FORMS}")


def parse_duration(value: int | float | str, name: str = "duration") -> float:
    """Seconds from a number or a string with a unit (``ms``, ``s``, ``m``/``min``, ``h``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        m = _NUMBER_UNIT.match(value.lower())
        if m and m.group(2) in DURATION_UNITS:
            return float(m.group(1)) * DURATION_UNITS[m.group(2)]
    raise ValueError(f"{name}: {value!r} is not a duration; use {DURATION_FORMS}")
