"""Vector search: an optional hnswlib index per vector field and ``nearest()`` over queries.

``coll.create_vector_index("embedding", dim=384)`` stores a spec (``make_spec``) in the
collection's metadata; the database keeps one shared :class:`HnswIndex` per (collection,
field) whose labels are row ids. ``coll.where(...).nearest("embedding", q, k=10)`` gives
:class:`Hits`, exact for the transaction's snapshot: HNSW only proposes candidates, the
snapshot decides which rows exist and what their vectors are (see search.py).

Distances are hnswlib's, so figures compare with hnswlib alone: ``"l2"`` is the *squared*
Euclidean distance, ``"ip"`` is ``1 - dot(a, b)``, ``"cosine"`` is ``1 - cos(a, b)`` (a zero
vector is at distance 1 from everything).

numpy is needed for any vector work; hnswlib only for the index. Without hnswlib,
``nearest()`` scans exactly with numpy. This module imports neither until it is used, so
``import protobase`` works without them.
"""
import math
import numbers

from ..errors import MissingDependencyError, VectorError
from ..query.query import Query

__all__ = ["METRICS", "require_hnswlib", "require_numpy", "make_spec", "as_vector",
           "HnswIndex", "nearest", "Hits"]

METRICS = ("cosine", "l2", "ip")
_INSTALL = "install protobase[vector]: pip install 'protobase[vector]'"


def require_hnswlib():
    """The hnswlib module, or MissingDependencyError saying which extra to install."""
    try:
        import hnswlib
    except ImportError as exc:
        raise MissingDependencyError(f"vector indexes need hnswlib; {_INSTALL}") from exc
    return hnswlib


def require_numpy():
    """The numpy module, or MissingDependencyError saying which extra to install."""
    try:
        import numpy
    except ImportError as exc:
        raise MissingDependencyError(f"vector search needs numpy; {_INSTALL}") from exc
    return numpy


def _int_setting(name, value, lo, hi):
    if type(value) is not int or not lo <= value <= hi:
        raise VectorError(f"{name} must be an int in [{lo}, {hi}], not {value!r}")
    return value


def make_spec(field, dim, metric="cosine", M=16, ef_construction=200):
    """The validated settings of a vector index as a plain JSON-able dict."""
    if not isinstance(field, str) or not field:
        raise VectorError(f"a vector index needs a field path such as 'embedding', not {field!r}")
    if metric not in METRICS:
        raise VectorError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
    return {
        "field": field,
        "dim": _int_setting("dim", dim, 1, 65536),
        "metric": metric,
        "M": _int_setting("M", M, 2, 256),
        "ef_construction": _int_setting("ef_construction", ef_construction, 1, 100000),
    }


def as_vector(value, dim=None):
    """``value`` (a numpy array or a sequence of real numbers) as a 1-D float32 array.

    VectorError (a ValueError) when it is not 1-D, not numeric, holds NaN or infinity, or
    its length is not ``dim`` (when given)."""
    np = require_numpy()
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise VectorError(f"a vector must be 1-D, not an array of shape {value.shape}")
        if value.dtype.kind not in "iuf":
            raise VectorError(f"a vector must hold real numbers, not {value.dtype}")
        if value.dtype == np.float32:
            arr = value.copy()                 # the caller may change theirs later
        else:
            with np.errstate(over="ignore"):   # too large for float32: refused below
                arr = value.astype(np.float32)
    else:
        if (isinstance(value, (str, bytes, bytearray, dict, set, frozenset))
                or not hasattr(value, "__len__")):
            raise VectorError(f"a vector must be a numpy array or a sequence of numbers, "
                              f"not {type(value).__name__}")
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):
            arr = np.asarray(value, dtype=object)
        if arr.dtype.kind == "O":              # mixed types: name the first bad item
            for i, x in enumerate(value):
                if isinstance(x, bool) or not isinstance(x, numbers.Real):
                    raise VectorError(f"a vector must hold real numbers; item {i} is "
                                      f"{type(x).__name__} {x!r}")
        elif arr.dtype.kind not in "iuf":
            raise VectorError(f"a vector must hold real numbers, not {arr.dtype} items")
        if arr.ndim != 1:
            raise VectorError("a vector must be a flat sequence of numbers")
        with np.errstate(over="ignore"):       # too large for float32: refused below
            arr = arr.astype(np.float32)
    if dim is not None and arr.shape[0] != dim:
        raise VectorError(f"expected a vector of dimension {dim}, got {arr.shape[0]}")
    if arr.shape[0] == 0:
        raise VectorError("a vector must not be empty")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise VectorError(f"a vector must hold finite numbers; item {bad} is {arr[bad]}"
                          + (" (too large for float32)" if math.isfinite(float(_item(value, bad)))
                             else ""))
    return arr


def _item(value, i):
    try:
        return value[i]
    except (TypeError, IndexError, KeyError):
        return math.nan


def nearest(query, field, vector, k=10, ef=None, metric=None):
    """The ``k`` entries of ``query`` whose vector at ``field`` is nearest to ``vector``."""
    from .search import nearest as run
    Query._nearest = run          # numpy is loaded now: later queries go there directly
    return run(query, field, vector, k=k, ef=ef, metric=metric)


Query._nearest = nearest          # Query.nearest() runs here (the query layer knows no vectors)


def __getattr__(name):
    if name == "HnswIndex":
        from .hnsw import HnswIndex
        return HnswIndex
    if name == "Hits":
        from .search import Hits
        return Hits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
