# cython: language_level=3
"""Vector search kernels: a query vector into index space, and the k best (distance, row
id) pairs of a scan, each in one C call.

Why this module exists
----------------------
An exact vector scan of a small admitted set (a filter keeping 0.1% to 5% of the rows)
is one matrix-vector product followed by picking the k nearest rows. numpy does the
product well (BLAS), but picking the k costs a chain of small numpy calls: ``1 - dot``,
a partition, a comparison mask, two gathers, a lexsort for the tie order, two more
gathers and two ``tolist``. Each is about a microsecond of fixed cost, so at a few
hundred rows the selection costs more than the product, and a query through the public
API lost to a bare numpy loop. Here the whole selection is one pass over the scores::

    scores float32[n] (BLAS: rows . q)      ids int64[n] (row ids, any order)
            |                                       |
            +------------------+--------------------+
                               v
          d = 1 - score  (cosine, ip)   or   d = score  (l2: squared distance)
                               |
                               v
            +-------------------------------------------+
            | max-heap of the k best so far, keyed       |   heap[0] = the worst kept
            | (d, id): a pair replaces the top only if   |   O(log k) per replacement
            | it orders before it                        |
            +-------------------------------------------+
                               |  pop the worst k times, filling from the end
                               v
            ([id, ...], [distance, ...])  ascending (d, id): Python lists

Layout and invariants
---------------------
The heap is two parallel C arrays of ``k`` entries, ``hd`` (float32 distances) and
``hi`` (int64 ids), with ``size`` in use. For every ``j < size``, the entry at ``j`` does
not order before either of its children ``2j+1`` and ``2j+2`` (a max-heap by the order
below), so ``heap[0]`` is the worst pair kept. After every scanned element, the heap holds
the ``min(k, seen)`` best pairs of those seen.

The order is "(distance, id) ascending", with NaN after every number (as numpy's
lexsort places it) and ties broken by the smaller id. Ids are distinct, so the order is
total and the result does not depend on the input order: the same pairs come out
whether the ids were scanned ascending (an exact scan) or in a graph's order.

Exactness: ``1 - score`` is one IEEE single-precision subtraction, the very value
numpy's ``np.float32(1.0) - scores`` gives element by element (x86-64 evaluates float
arithmetic in SSE registers at single precision; the build uses no -ffast-math). So a
distance computed here equals the one the numpy path computes for the same row, and
rows ranked here and rows ranked by numpy compare alike. Distances are returned as
Python floats holding the float32 value exactly (what ``tolist()`` gives).

Complexity: O(n log k) time for n scores, O(k) memory; the GIL is held (the calls are
microseconds long, and the inputs are read-only buffers of the caller).

Arguments are taken through the buffer protocol directly (``_take``: one-dimensional,
C-contiguous, the item format checked by hand), not as typed memoryviews: acquiring a
memoryview costs about half a microsecond, which for a search over a hundred admitted
rows would be a tenth of the whole query through the public API::

    numpy array --PyObject_GetBuffer(C_CONTIGUOUS | FORMAT)--> Py_buffer
        ndim == 1, format "f" / "d" / "l" or "q" (native order, "@" or "=" allowed),
        itemsize 4 / 8 / 8                        else ValueError, buffer released
        buf --cast--> const float * / const double * / const int64_t *

The query vector: to_space
--------------------------
Before a search the query vector is checked (every item finite) and put in index space
(scaled to unit length for cosine), which in numpy is a widening copy, a dot product, a
scalar and a multiply: four calls, more than the exact scan of a small set. ``to_space``
does it in one pass over the vector and one over the output::

    v float32[dim] --sum of v[i]^2 in double--> squares (finite iff every v[i] is:
                                                 dim * FLT_MAX^2 < DBL_MAX)
        |                 f = (float)(1 / (sqrt(squares) + 1e-30))   (cosine)
        +--> out[i] = v[i] * f   (cosine: float32 products)   or   v[i]   (l2, ip)

A float64 vector (``to_space64``) is rounded item by item to float32 first, as numpy's
``astype(np.float32)`` rounds it. Either returns False, leaving ``out`` unspecified, when
an item is not finite (or, in float64, beyond float32's range); the caller's general path
then converts or refuses the vector and names the bad item. The sum runs in index order,
so the unit vector is a pure function of the input: every path of one search uses the
same ``out``.
"""
from libc.float cimport FLT_MAX
from libc.math cimport fabs, isfinite, sqrt
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_WRITABLE,
                             PyBuffer_Release, PyObject_GetBuffer)
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF

cdef extern from *:
    const char *PB_SOURCE_DIGEST
__source_digest__ = PB_SOURCE_DIGEST.decode("ascii")

__all__ = ["top_k", "to_space", "to_space64"]

# Item kinds _take accepts, by the letter it is asked with.
_KINDS = {ord("f"): "float32", ord("d"): "float64", ord("q"): "int64"}


cdef bint _is_kind(const Py_buffer *view, char kind) noexcept:
    """The buffer's items are ``kind``: 'f' float32, 'd' float64, 'q' int64 (which a
    native format names 'l' or 'q')."""
    cdef const char *f = view.format
    if f == NULL:                                   # no format: unsigned bytes
        return False
    if f[0] == b'@' or f[0] == b'=':
        f += 1
    if f[0] == 0 or f[1] != 0:
        return False
    if kind == b'q':
        return view.itemsize == 8 and (f[0] == b'q' or f[0] == b'l')
    return f[0] == kind and view.itemsize == (4 if kind == b'f' else 8)


cdef int _take(object obj, Py_buffer *view, char kind, bint writable, str name) except -1:
    """Acquire ``obj``'s buffer into ``view`` (the caller releases it): one-dimensional,
    C-contiguous, items of ``kind`` (see _is_kind), writable when asked; ValueError (or
    the buffer protocol's own error) otherwise, with nothing held."""
    cdef int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT
    if writable:
        flags |= PyBUF_WRITABLE
    PyObject_GetBuffer(obj, view, flags)
    if view.ndim != 1 or not _is_kind(view, kind):
        PyBuffer_Release(view)
        raise ValueError(f"{name}: expected a one-dimensional contiguous array of "
                         f"{_KINDS[kind]}")
    return 0


cdef inline bint _before(float d1, int64_t i1, float d2, int64_t i2) noexcept nogil:
    """(d1, i1) orders before (d2, i2): ascending distance, NaN last, then ascending id."""
    if d1 != d1:
        return d2 != d2 and i1 < i2
    if d2 != d2:
        return True
    return d1 < d2 or (d1 == d2 and i1 < i2)


cdef void _sift_down(float *hd, int64_t *hi, Py_ssize_t size, Py_ssize_t j) noexcept nogil:
    """Restore the heap below ``j`` after its entry was replaced."""
    cdef float d = hd[j]
    cdef int64_t i = hi[j]
    cdef Py_ssize_t c
    while True:
        c = 2 * j + 1
        if c >= size:
            break
        if c + 1 < size and _before(hd[c], hi[c], hd[c + 1], hi[c + 1]):
            c += 1                                  # the worse child
        if not _before(d, i, hd[c], hi[c]):
            break
        hd[j] = hd[c]
        hi[j] = hi[c]
        j = c
    hd[j] = d
    hi[j] = i


cdef void _sift_up(float *hd, int64_t *hi, Py_ssize_t j) noexcept nogil:
    """Restore the heap above ``j`` after an entry was appended there."""
    cdef float d = hd[j]
    cdef int64_t i = hi[j]
    cdef Py_ssize_t p
    while j > 0:
        p = (j - 1) // 2
        if not _before(hd[p], hi[p], d, i):
            break
        hd[j] = hd[p]
        hi[j] = hi[p]
        j = p
    hd[j] = d
    hi[j] = i


def top_k(scores, ids, Py_ssize_t k, bint one_minus):
    """``(ids, distances)``: two lists of the ``min(k, n)`` smallest (distance, id) pairs,
    ascending, where distance is ``1 - score`` (float32) when ``one_minus`` (cosine and
    ip, whose scores are dot products), else the score itself (l2). ``scores`` and ``ids``
    are float32 and int64 arrays of one length ``n``; ids must be distinct."""
    cdef Py_buffer sv, iv
    if k < 0:
        raise ValueError(f"top_k: k must be >= 0, not {k}")
    _take(scores, &sv, b'f', False, "top_k scores")
    try:
        _take(ids, &iv, b'q', False, "top_k ids")
        try:
            return _top_k(<const float *>sv.buf, <const int64_t *>iv.buf, sv.shape[0],
                          iv.shape[0], k, one_minus)
        finally:
            PyBuffer_Release(&iv)
    finally:
        PyBuffer_Release(&sv)


cdef tuple _top_k(const float *scores, const int64_t *ids, Py_ssize_t n, Py_ssize_t n_ids,
                  Py_ssize_t k, bint one_minus):
    if n_ids != n:
        raise ValueError(f"top_k: {n} scores but {n_ids} ids")
    if k > n:
        k = n
    cdef float *hd = <float *>malloc((k if k else 1) * sizeof(float))
    cdef int64_t *hi = <int64_t *>malloc((k if k else 1) * sizeof(int64_t))
    if hd == NULL or hi == NULL:
        free(hd)
        free(hi)
        raise MemoryError()
    cdef Py_ssize_t size = 0, j
    cdef float d, one = 1.0                         # float - float: single precision
    cdef list out_ids, out_d
    cdef object item
    try:
        if k:
            with nogil:
                for j in range(n):
                    d = (one - scores[j]) if one_minus else scores[j]
                    if size < k:
                        hd[size] = d
                        hi[size] = ids[j]
                        size += 1
                        _sift_up(hd, hi, size - 1)
                    elif _before(d, ids[j], hd[0], hi[0]):
                        hd[0] = d
                        hi[0] = ids[j]
                        _sift_down(hd, hi, size, 0)
        out_ids = PyList_New(size)
        out_d = PyList_New(size)
        while size:                                 # the worst goes last
            size -= 1
            item = hi[0]
            Py_INCREF(item)
            PyList_SET_ITEM(out_ids, size, item)
            item = <double>hd[0]
            Py_INCREF(item)
            PyList_SET_ITEM(out_d, size, item)
            hd[0] = hd[size]
            hi[0] = hi[size]
            _sift_down(hd, hi, size, 0)
        return out_ids, out_d
    finally:
        free(hd)
        free(hi)


ctypedef fused real:
    float
    double


cdef bint _to_space(const real *v, float *out, Py_ssize_t n, bint unit) noexcept:
    """to_space for ``n`` float32 or float64 items (a float64 item beyond float32's range,
    or NaN, is refused here: the caller's general path decides about those)."""
    cdef Py_ssize_t j
    cdef double squares = 0.0
    cdef float x, f
    for j in range(n):
        if real is double:
            if not fabs(v[j]) <= FLT_MAX:
                return False
        x = <float>v[j]
        out[j] = x
        squares += <double>x * <double>x
    if not isfinite(squares):
        return False
    if unit:
        f = <float>(1.0 / (sqrt(squares) + 1e-30))
        for j in range(n):
            out[j] = out[j] * f
    return True


def to_space(v, out, bint unit):
    """Write ``v`` into ``out`` (float32 arrays of one length) in index space: scaled to
    unit length when ``unit`` (a zero vector stays zero), else copied. False when an item
    of ``v`` is not finite (``out`` is then unspecified), else True."""
    return _into_space(v, b'f', out, unit, "to_space")


def to_space64(v, out, bint unit):
    """to_space for a float64 ``v``, each item rounded to float32 first (as numpy's
    ``astype(np.float32)``); False also when an item is beyond float32's range."""
    return _into_space(v, b'd', out, unit, "to_space64")


cdef bint _into_space(object v, char kind, object out, bint unit, str name) except -1:
    cdef Py_buffer vv, ov
    cdef Py_ssize_t n
    _take(v, &vv, kind, False, name)
    try:
        _take(out, &ov, b'f', True, name)
        try:
            n = vv.shape[0]
            if ov.shape[0] != n:
                raise ValueError(f"{name}: a vector of {n} items into {ov.shape[0]}")
            if kind == b'f':
                return _to_space(<const float *>vv.buf, <float *>ov.buf, n, unit)
            return _to_space(<const double *>vv.buf, <float *>ov.buf, n, unit)
        finally:
            PyBuffer_Release(&ov)
    finally:
        PyBuffer_Release(&vv)
