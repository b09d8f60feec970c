# cython: language_level=3
"""Vector search kernels: every distance ProtoBase reports, every vector put into index
space, and the k best (distance, row id) pairs of a scan, each in one C call.

Why this module exists
----------------------
Two reasons. First, determinism: a distance a user sees must be one function of the two
vectors, bit for bit, whatever the CPU and whichever plan found the row. numpy cannot
promise that: ``mat.dot(q)`` (BLAS sgemv), ``np.einsum`` and ``block @ q`` each pick a
SIMD kernel by CPU at run time and sum in an order that depends on the kernel and even on
the matrix's size, so one query object on one snapshot answered 0.0 for a row on one run
and 5.96e-08 on the next (an exact scan of a gathered set, then a rescan of the memo).
Here each distance is summed in one fixed order (below), by code compiled without -march,
-ffast-math or FMA contraction (setup.py builds this module with -ffp-contract=off), so
x86-64 (SSE2) and arm64 (NEON) give the same float32 for the same inputs on every path.
Second, cost: an exact scan of a small admitted set (0.1% to 5% of the rows) through
numpy is a gather, a product and a chain of small calls to pick the k best, each a
microsecond of fixed cost; ``rank`` does gather, distance and selection in one pass::

    vecs float32[rows, dim]   q float32[dim]   ids int64[n]   pos int64[*] (optional)
         |                        |                |
         |   row of ids[j]: pos[ids[j]] (skipped when outside pos or < 0), else row j
         +-----------+------------+----------------+
                     v
          d = distance(row, q): squared L2 (l2) or 1 - dot (ip, cosine)
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

``distances`` gives the same ``d`` for every row of a matrix (for merging rows read from a
snapshot with the index's candidates); ``top_k`` is the selection alone over distances or
dot products already computed.

The summation order (the definition of a distance)
--------------------------------------------------
``_dot`` and ``_l2`` keep LANES = 16 float32 accumulators. Item ``i`` of the vectors
contributes its term (``a[i] * b[i]``, or ``(a[i] - b[i])^2`` computed as ``t = a[i] -
b[i]; t * t``) to lane ``i mod 16``, the items of one lane in ascending ``i``; the lanes
start at +0.0 and are then folded in a fixed tree: lane ``l`` += lane ``l + 8`` for l < 8,
then ``l + 4`` for l < 4, ``l + 2``, ``l + 1``; lane 0 is the sum. Every step is one IEEE
single-precision multiply, subtract or add, rounded to nearest: C evaluates float
arithmetic at float precision on x86-64 and arm64 (FLT_EVAL_METHOD 0), and with
contraction off no multiply-add is fused. The lanes are independent, so gcc -O2
vectorizes a group of 16 items into four 4-wide SIMD multiplies and adds (SSE2 or NEON)
without changing a single rounding. ``1 - dot`` is one more float subtraction.

A vector into index space: to_space
-----------------------------------
Before a search the query vector is checked (every item finite) and put in index space
(scaled to unit length for cosine); a stored vector goes into the index the same way
(``rows_to_space``, a row at a time through the same function), so a row equal to the
query lies at distance exactly 0 from it or not, alike on every path::

    v float32[dim] --sum of v[i]^2 in double, ascending i--> squares (finite iff every
        |                                                  v[i] is: dim * FLT_MAX^2 < DBL_MAX)
        |                 f = (float)(1 / (sqrt(squares) + 1e-30))   (cosine)
        +--> out[i] = v[i] * f   (cosine: float32 products)   or   v[i]   (l2, ip)

A float64 vector (``to_space64``) is rounded item by item to float32 first, as numpy's
``astype(np.float32)`` rounds it. Either returns False, leaving ``out`` unspecified, when
an item is not finite (or, in float64, beyond float32's range); the caller's general path
then converts or refuses the vector and names the bad item. Double arithmetic is exact
IEEE too (sqrt included), so the unit vector is a pure function of the input.

Layout and invariants of the selection
--------------------------------------
The heap is two parallel C arrays of ``k`` entries, ``hd`` (float32 distances) and
``hi`` (int64 ids), with ``size`` in use. For every ``j < size``, the entry at ``j`` does
not order before either of its children ``2j+1`` and ``2j+2`` (a max-heap by the order
below), so ``heap[0]`` is the worst pair kept. After every scanned element, the heap holds
the ``min(k, seen)`` best pairs of those seen.

The order is "(distance, id) ascending", with NaN after every number (as numpy's
lexsort places it) and ties broken by the smaller id. Ids are distinct, so the order is
total and the result does not depend on the input order: the same pairs come out
whether the ids were scanned ascending (an exact scan) or in a graph's order. Distances
are returned as Python floats holding the float32 value exactly (what ``tolist()`` gives).

In ``rank`` with ``pos``, every row number ``pos`` gives must lie in ``[0, rows)``: one
outside is a ValueError (nothing is read there), never a read beyond the matrix.

Complexity: O(n * dim + n log k) time, O(k) memory. The GIL is released for a scan of more
than NOGIL_ITEMS floats (the inputs are the caller's buffers, held for the call; the
caller must not resize them from another thread meanwhile, which numpy refuses while a
buffer is exported); shorter calls keep it, since releasing costs more than they take.

Arguments are taken through the buffer protocol directly (``_take``: one- or
two-dimensional, C-contiguous, the item format checked by hand), not as typed
memoryviews: acquiring a memoryview costs about half a microsecond, which for a search
over a hundred admitted rows would be a tenth of the whole query through the public API::

    numpy array --PyObject_GetBuffer(C_CONTIGUOUS | FORMAT)--> Py_buffer
        ndim == 1 (2 for a matrix), format "f" / "d" / "l" or "q" (native order, "@" or
        "=" allowed), itemsize 4 / 8 / 8             else ValueError, buffer released
        buf --cast--> const float * / const double * / const int64_t *
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

__all__ = ["top_k", "rank", "distances", "to_space", "to_space64", "rows_to_space"]

cdef enum:
    LANES = 16                  # accumulators of a distance (the summation order above)
    NOGIL_ITEMS = 1 << 16       # a scan of more floats than this releases the GIL

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


cdef int _take(object obj, Py_buffer *view, char kind, bint writable, str name,
               int ndim=1) except -1:
    """Acquire ``obj``'s buffer into ``view`` (the caller releases it): ``ndim``
    dimensions, C-contiguous, items of ``kind`` (see _is_kind), writable when asked;
    ValueError (or the buffer protocol's own error) otherwise, with nothing held."""
    cdef int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT
    if writable:
        flags |= PyBUF_WRITABLE
    PyObject_GetBuffer(obj, view, flags)
    if view.ndim != ndim or not _is_kind(view, kind):
        PyBuffer_Release(view)
        shape = "one-dimensional" if ndim == 1 else "two-dimensional"
        raise ValueError(f"{name}: expected a {shape} contiguous array of {_KINDS[kind]}")
    return 0


# ---------------------------------------------------------------- distances

cdef extern from *:
    """
    /* The two sums of the essay, LANES = 16 float32 lanes folded in a fixed tree.
       With GNU C vector types the lanes live in four 4-wide registers (SSE2 on x86-64,
       NEON on arm64): lane-wise IEEE operations, so the same roundings as the plain
       loop below, which other compilers get. */
    #include <string.h>
    #if defined(__GNUC__) || defined(__clang__)
    #define PB_VECTOR_LANES 1
    typedef float pb_f4 __attribute__((vector_size(16)));
    static inline pb_f4 pb_load4(const float *p) { pb_f4 v; memcpy(&v, p, 16); return v; }
    #endif

    static inline float pb_fold(float *acc) {
        int width, l;
        for (width = 8; width; width >>= 1)
            for (l = 0; l < width; l++)
                acc[l] = acc[l] + acc[l + width];
        return acc[0];
    }

    static float pb_dot(const float *a, const float *b, Py_ssize_t n) {
        float acc[16];
        Py_ssize_t i = 0;
        int l;
    #ifdef PB_VECTOR_LANES
        pb_f4 s0 = {0.0f, 0.0f, 0.0f, 0.0f}, s1 = s0, s2 = s0, s3 = s0;
        for (; i + 16 <= n; i += 16) {
            s0 = s0 + pb_load4(a + i) * pb_load4(b + i);
            s1 = s1 + pb_load4(a + i + 4) * pb_load4(b + i + 4);
            s2 = s2 + pb_load4(a + i + 8) * pb_load4(b + i + 8);
            s3 = s3 + pb_load4(a + i + 12) * pb_load4(b + i + 12);
        }
        memcpy(acc, &s0, 16); memcpy(acc + 4, &s1, 16);
        memcpy(acc + 8, &s2, 16); memcpy(acc + 12, &s3, 16);
    #else
        for (l = 0; l < 16; l++) acc[l] = 0.0f;
        for (; i + 16 <= n; i += 16)
            for (l = 0; l < 16; l++) acc[l] = acc[l] + a[i + l] * b[i + l];
    #endif
        for (l = 0; i + l < n; l++) acc[l] = acc[l] + a[i + l] * b[i + l];
        return pb_fold(acc);
    }

    static float pb_l2(const float *a, const float *b, Py_ssize_t n) {
        float acc[16], t;
        Py_ssize_t i = 0;
        int l;
    #ifdef PB_VECTOR_LANES
        pb_f4 s0 = {0.0f, 0.0f, 0.0f, 0.0f}, s1 = s0, s2 = s0, s3 = s0, d0, d1, d2, d3;
        for (; i + 16 <= n; i += 16) {
            d0 = pb_load4(a + i) - pb_load4(b + i);
            d1 = pb_load4(a + i + 4) - pb_load4(b + i + 4);
            d2 = pb_load4(a + i + 8) - pb_load4(b + i + 8);
            d3 = pb_load4(a + i + 12) - pb_load4(b + i + 12);
            s0 = s0 + d0 * d0;
            s1 = s1 + d1 * d1;
            s2 = s2 + d2 * d2;
            s3 = s3 + d3 * d3;
        }
        memcpy(acc, &s0, 16); memcpy(acc + 4, &s1, 16);
        memcpy(acc + 8, &s2, 16); memcpy(acc + 12, &s3, 16);
    #else
        for (l = 0; l < 16; l++) acc[l] = 0.0f;
        for (; i + 16 <= n; i += 16)
            for (l = 0; l < 16; l++) { t = a[i + l] - b[i + l]; acc[l] = acc[l] + t * t; }
    #endif
        for (l = 0; i + l < n; l++) { t = a[i + l] - b[i + l]; acc[l] = acc[l] + t * t; }
        return pb_fold(acc);
    }
    """
    float _dot "pb_dot" (const float *a, const float *b, Py_ssize_t n) noexcept nogil
    float _l2 "pb_l2" (const float *a, const float *b, Py_ssize_t n) noexcept nogil


cdef inline float _distance(const float *row, const float *q, Py_ssize_t dim,
                            bint l2) noexcept nogil:
    cdef float one = 1.0                            # float - float: single precision
    if l2:
        return _l2(row, q, dim)
    return one - _dot(row, q, dim)


cdef void _distances(const float *m, Py_ssize_t rows, Py_ssize_t dim, const float *q,
                     float *out, bint l2) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(rows):
        out[j] = _distance(m + j * dim, q, dim, l2)


def distances(vecs, q, out, bint l2):
    """Write into ``out`` (float32[rows], writable) the distance of each row of ``vecs``
    (float32[rows, dim]) to ``q`` (float32[dim]): squared L2 when ``l2``, else
    ``1 - dot`` (ip, and cosine on unit vectors)."""
    cdef Py_buffer mv, qv, ov
    cdef Py_ssize_t rows, dim
    cdef const float *m
    cdef const float *qp
    cdef float *o
    _take(vecs, &mv, b'f', False, "distances vectors", 2)
    try:
        _take(q, &qv, b'f', False, "distances query")
        try:
            _take(out, &ov, b'f', True, "distances out")
            try:
                rows, dim = mv.shape[0], mv.shape[1]
                if qv.shape[0] != dim:
                    raise ValueError(f"distances: a query of {qv.shape[0]} items against "
                                     f"vectors of {dim}")
                if ov.shape[0] != rows:
                    raise ValueError(f"distances: {rows} vectors into {ov.shape[0]} items")
                m, qp, o = <const float *>mv.buf, <const float *>qv.buf, <float *>ov.buf
                if rows * dim > NOGIL_ITEMS:
                    with nogil:
                        _distances(m, rows, dim, qp, o, l2)
                else:
                    _distances(m, rows, dim, qp, o, l2)
            finally:
                PyBuffer_Release(&ov)
        finally:
            PyBuffer_Release(&qv)
    finally:
        PyBuffer_Release(&mv)


# ---------------------------------------------------------------- selection

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




cdef inline void _push(float *hd, int64_t *hi, Py_ssize_t *size, Py_ssize_t k, float d,
                       int64_t i) noexcept nogil:
    """Offer (d, i) to the heap of at most ``k`` (>= 1) entries."""
    if size[0] < k:
        hd[size[0]] = d
        hi[size[0]] = i
        size[0] += 1
        _sift_up(hd, hi, size[0] - 1)
    elif _before(d, i, hd[0], hi[0]):
        hd[0] = d
        hi[0] = i
        _sift_down(hd, hi, size[0], 0)


cdef tuple _emit(float *hd, int64_t *hi, Py_ssize_t size):
    """The heap's pairs as (ids, distances) lists, ascending; empties the heap."""
    cdef list out_ids = PyList_New(size)
    cdef list out_d = PyList_New(size)
    cdef object item
    while size:                                     # the worst goes last
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


cdef int _heap(Py_ssize_t k, float **hd, int64_t **hi) except -1:
    """Allocate a heap of ``k`` entries (the caller frees both arrays)."""
    hd[0] = <float *>malloc((k if k else 1) * sizeof(float))
    hi[0] = <int64_t *>malloc((k if k else 1) * sizeof(int64_t))
    if hd[0] == NULL or hi[0] == NULL:
        free(hd[0])
        free(hi[0])
        raise MemoryError()
    return 0


def top_k(scores, ids, Py_ssize_t k, bint one_minus):
    """``(ids, distances)``: two lists of the ``min(k, n)`` smallest (distance, id) pairs,
    ascending, where distance is ``1 - score`` (float32) when ``one_minus`` (scores that
    are dot products), else the score itself (distances already). ``scores`` and ``ids``
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
    cdef float *hd
    cdef int64_t *hi
    _heap(k, &hd, &hi)
    cdef Py_ssize_t size = 0, j
    cdef float one = 1.0                            # float - float: single precision
    try:
        if k:
            with nogil:
                for j in range(n):
                    _push(hd, hi, &size, k, (one - scores[j]) if one_minus else scores[j],
                          ids[j])
        return _emit(hd, hi, size)
    finally:
        free(hd)
        free(hi)


def rank(vecs, q, ids, Py_ssize_t k, bint l2, pos=None):
    """``(ids, distances)`` lists of the ``min(k, n)`` best rows by distance to ``q``
    (float32[dim]; squared L2 when ``l2``, else ``1 - dot``), ascending, ties by id.
    ``vecs`` is float32[rows, dim], ``ids`` int64[n] distinct. Without ``pos``, row ``j``
    is labelled ``ids[j]`` (n == rows); with ``pos`` (int64), id ``i`` is row ``pos[i]``,
    and an id outside ``pos`` or whose ``pos`` is negative has no row and is skipped."""
    cdef Py_buffer mv, qv, iv, pv
    if k < 0:
        raise ValueError(f"rank: k must be >= 0, not {k}")
    _take(vecs, &mv, b'f', False, "rank vectors", 2)
    try:
        _take(q, &qv, b'f', False, "rank query")
        try:
            _take(ids, &iv, b'q', False, "rank ids")
            try:
                if pos is None:
                    return _rank(&mv, &qv, &iv, NULL, k, l2)
                _take(pos, &pv, b'q', False, "rank pos")
                try:
                    return _rank(&mv, &qv, &iv, &pv, k, l2)
                finally:
                    PyBuffer_Release(&pv)
            finally:
                PyBuffer_Release(&iv)
        finally:
            PyBuffer_Release(&qv)
    finally:
        PyBuffer_Release(&mv)


cdef tuple _rank(const Py_buffer *mv, const Py_buffer *qv, const Py_buffer *iv,
                 const Py_buffer *pv, Py_ssize_t k, bint l2):
    cdef Py_ssize_t rows = mv.shape[0], dim = mv.shape[1], n = iv.shape[0]
    cdef Py_ssize_t npos = pv.shape[0] if pv != NULL else 0
    if qv.shape[0] != dim:
        raise ValueError(f"rank: a query of {qv.shape[0]} items against vectors of {dim}")
    if pv == NULL and n != rows:
        raise ValueError(f"rank: {rows} vectors but {n} ids")
    cdef const float *m = <const float *>mv.buf
    cdef const float *qp = <const float *>qv.buf
    cdef const int64_t *ids = <const int64_t *>iv.buf
    cdef const int64_t *pos = <const int64_t *>pv.buf if pv != NULL else NULL
    if k > n:
        k = n
    cdef float *hd
    cdef int64_t *hi
    _heap(k, &hd, &hi)
    cdef Py_ssize_t size = 0, bad = -1
    try:
        if k:
            if n * dim > NOGIL_ITEMS:
                with nogil:
                    bad = _scan(m, rows, dim, qp, ids, n, pos, npos, l2, hd, hi, &size, k)
            else:
                bad = _scan(m, rows, dim, qp, ids, n, pos, npos, l2, hd, hi, &size, k)
        if bad >= 0:
            raise ValueError(f"rank: id {ids[bad]} is row {pos[ids[bad]]} of {rows} vectors")
        return _emit(hd, hi, size)
    finally:
        free(hd)
        free(hi)


cdef Py_ssize_t _scan(const float *m, Py_ssize_t rows, Py_ssize_t dim, const float *q,
                      const int64_t *ids, Py_ssize_t n, const int64_t *pos, Py_ssize_t npos,
                      bint l2, float *hd, int64_t *hi, Py_ssize_t *size,
                      Py_ssize_t k) noexcept nogil:
    """rank's pass (k >= 1): -1, or the index in ``ids`` of an id whose row lies outside
    the matrix (the scan stops there; nothing beyond the matrix is read)."""
    cdef Py_ssize_t j, row
    cdef int64_t rid
    for j in range(n):
        if pos == NULL:
            row = j
        else:
            rid = ids[j]
            if rid < 0 or rid >= npos:
                continue
            row = pos[rid]
            if row < 0:
                continue
            if row >= rows:
                return j
        _push(hd, hi, size, k, _distance(m + row * dim, q, dim, l2), ids[j])
    return -1


# ---------------------------------------------------------------- index space

ctypedef fused real:
    float
    double


cdef bint _to_space(const real *v, float *out, Py_ssize_t n, bint unit) noexcept nogil:
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


cdef bint _rows_to_space(const float *v, float *out, Py_ssize_t rows, Py_ssize_t dim,
                         bint unit) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(rows):
        if not _to_space(v + j * dim, out + j * dim, dim, unit):
            return False
    return True


def rows_to_space(vecs, out, bint unit):
    """to_space for each row of ``vecs`` into the same row of ``out`` (float32 matrices of
    one shape; ``out`` may be ``vecs`` itself). False when an item is not finite (``out``
    is then unspecified), else True."""
    cdef Py_buffer vv, ov
    cdef Py_ssize_t rows, dim
    cdef bint ok
    cdef const float *v
    cdef float *o
    _take(vecs, &vv, b'f', False, "rows_to_space", 2)
    try:
        _take(out, &ov, b'f', True, "rows_to_space", 2)
        try:
            rows, dim = vv.shape[0], vv.shape[1]
            if ov.shape[0] != rows or ov.shape[1] != dim:
                raise ValueError(f"rows_to_space: a ({rows}, {dim}) matrix into "
                                 f"({ov.shape[0]}, {ov.shape[1]})")
            v, o = <const float *>vv.buf, <float *>ov.buf
            if rows * dim > NOGIL_ITEMS:
                with nogil:
                    ok = _rows_to_space(v, o, rows, dim, unit)
            else:
                ok = _rows_to_space(v, o, rows, dim, unit)
            return ok
        finally:
            PyBuffer_Release(&ov)
    finally:
        PyBuffer_Release(&vv)
