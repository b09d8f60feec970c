"""Vector search kernels: top-k selection and the query vector in index space (see
vkernel.pyx's essay)."""
from typing import Any

__all__ = ["top_k", "to_space", "to_space64"]

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
