"""Types of the C extension built from _fused.c."""

from typing import Any

def reduce_f32(x: Any, outer: int, units: int, inner: int, sat: int, out: Any, scalars: Any, /) -> bool: ...
