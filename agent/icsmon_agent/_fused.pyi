"""Types of the C extension built from _fused.c."""

from collections.abc import Sequence
from typing import Any

def reduce_batch(xs: Sequence[Any], shapes: Any, moments: Any, scalars: Any, ok: Any, /) -> None: ...
def finish_batch(
    moments: Any,
    scalars: Any,
    shapes: Any,
    prev: tuple[Any, Any, Any] | None,
    cols: Any,
    units_out: Any,
    layer_var: Any,
    /,
) -> None: ...
def constants() -> dict[str, Any]: ...
