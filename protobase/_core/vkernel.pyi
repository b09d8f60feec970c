"""Vector search kernels: top-k selection and the query vector in index space (see
vkernel.pyx's essay)."""
from typing import Any

__all__ = ["top_k", "rank", "distances", "to_space", "to_space64", "rows_to_space"]

__source_digest__: str

def top_k(scores: Any, ids: Any, k: int, one_minus: bool) -> tuple[list[int], list[float]]:
    """The min(k, n) smallest (distance, id) pairs as (ids, distances) lists, ascending;
    distance = float32(1 - score) when one_minus, else score. scores: float32[n]
    contiguous, ids: int64[n] contiguous and distinct."""
    ...

def to_space(v: Any, out: Any, unit: bool) -> bool:
    """Write v (float32[n] contiguous) into out (float32[n] contiguous): scaled to unit
    length when unit, else copied. False when an item of v is not finite."""
    ...

def to_space64(v: Any, out: Any, unit: bool) -> bool:
    """to_space for a float64 v (float64[n] contiguous), each item rounded to float32
    first; False also when an item is beyond float32's range."""
    ...

def distances(vecs: Any, q: Any, out: Any, l2: bool) -> None:
    """Write into out (float32[rows]) each row's distance to q (vecs float32[rows, dim]
    contiguous, q float32[dim]): squared L2 when l2, else 1 - dot; one fixed summation
    order on every CPU (see vkernel.pyx)."""
    ...

def rank(vecs: Any, q: Any, ids: Any, k: int, l2: bool, pos: Any = None) -> tuple[list[int], list[float]]:
    """The k best (distance, id) of the rows of ids (row pos[id] of vecs when pos is
    given, else row j), ascending, gathered, measured and selected in one pass."""
    ...

def rows_to_space(vecs: Any, out: Any, unit: bool) -> bool:
    """to_space for each row of a float32 matrix into out (same shape; may be vecs)."""
    ...
