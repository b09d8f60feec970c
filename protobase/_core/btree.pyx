# cython: language_level=3, auto_pickle=False
"""A persistent ordered map: a B+tree with path copying and subtree counts.

Why a B+tree
------------
`SortedDict` and every secondary index (field value -> posting list) need ordered
keys, range scans and rank/select, and they must be persistent: a snapshot is one root,
and a transaction that edits the tree copies only the nodes on the paths it touches.
A wide B+tree fits all of that. With 32..64 entries per node a million keys sit four
levels deep, so a lookup touches four nodes, a commit of one edit writes four small
atoms, and a range scan walks leaves that each hold dozens of neighbouring keys.

Layout
------
Two node kinds, both Python objects so a frozen node can be shared by any number of
snapshots (reference counting frees it with the last one)::

                         _Inner (level 2)
            keys:   [   40   ,   90   ]            separators
            kids:   [  c0    ,  c1    ,  c2  ]     _Node or int pointer (lazy)
            counts: [  120   ,  75    ,  88  ]     entries under each child
                    /         |           \\
        _Inner (1)      _Inner (1)       _Inner (1)
        ...             ...              keys [95, 130], kids [l0, l1, l2]
                                                 |
                                        _Leaf: keys [90, 91, 93 ...]
                                               vals [v,  v,  v  ...]

- `_Leaf.keys` / `_Leaf.vals`: parallel Python lists, sorted by `compare`.
- `_Inner.keys`: `len(kids) - 1` separators with, for every child i,
  `keys[i-1] <= every key under kids[i] < keys[i]`. A separator is a bound, not
  necessarily a present key: deleting the smallest key of a leaf leaves its separator
  in place, still a valid bound.
- `_Inner.counts`: a C array with the number of entries under each child. Rank
  (`bisect_left`), select (`peekitem`) and range sizes follow one path and add
  counts, and a child that is still an unloaded pointer is never read to be counted.
- `_Inner.level`: 1 when the children are leaves; all leaves are at the same depth.
- `ik` / `ikn` / `ikstate` (both kinds): an int64 shadow of `keys`, built on the first
  search after an edit when every key is an exact int that fits in 64 bits. An int
  probe then binary-searches a packed C array inside the node instead of dereferencing
  one int object per step, which on a tree larger than the CPU cache halves the memory
  traffic of a lookup. Any edit of `keys` marks the shadow stale; mixed or huge keys
  mark it unusable and take the general path.

Invariants (`_check()` walks them all): keys strictly increasing inside every leaf and
across leaves; separators bound their subtrees as above; every node but the root holds
MIN_FILL..WIDTH entries (the root: a leaf of 1..WIDTH, or an inner node of 2..WIDTH
children); counts equal the real subtree sizes and sum to `len()`; all leaves share one
depth; a node owned by a live mutation has never been persisted, and a persisted node
has only persisted children.

Ownership (path copying)
------------------------
Every node records the `owner` token of the mutation that created it. A mutation edits
a node in place only when `node.owner is self.owner`; otherwise it copies the node once
(shallow: lists are copied, children are shared) and links the copy into its parent,
which it already owns, all the way from the root. `finish()` hands the root to a new
`SortedMap` and gives the mutation a fresh token, so nothing reachable from the returned
snapshot is ever edited again. `SortedMap.set()` is a one-edit mutation whose token is
dropped at once. Old versions never change.

Inserts may leave one node with WIDTH + 1 entries for an instant; its parent splits it
in two halves (>= MIN_FILL each) on the way back up, and a root split grows the tree by
one level. A delete that leaves a child with MIN_FILL - 1 entries makes the parent move
one entry over from a sibling that can spare one, or merge the child with a sibling
(at most 2 * MIN_FILL - 1 <= WIDTH entries); an inner root left with one child hands
the root down.

Key order
---------
`compare(a, b)` is one total order over every allowed key (docs/internals.md, Key
rules): first the type class (`type_class`), then the value within the class:

    None(0) < numbers(1) < str(2) < bytes(3) < date(4) < naive datetime(5)
    < aware datetime(6) < time(7) < timedelta(8) < UUID(9) < tuple(10)
    < frozenset(11) < Enum(12)

Numbers (bool, int, float, Decimal, Fraction) compare exactly as Python compares them
(so 1, 1.0, True and Decimal(1) are one key, and 2**63 + 1 > 2.0**63 is kept), with
every NaN after all other numbers and equal to every NaN. A signaling NaN
(`Decimal('sNaN')`) is no key, nor is a value of any other type: both are a
SerializationError (a TypeError) naming the type, raised before a tree is touched. Naive times sort before aware
ones. Tuples compare lexicographically by this order, frozensets as the tuple of their
elements sorted by this order, Enum members by class `__qualname__` then by value.
The same-type int/float/str/bytes case is decided first with C-level type checks, so a
homogeneous tree pays for one rich comparison per probe (ints: none, see `ik`).

Persistence and lazy loading
----------------------------
`_persist(io)` writes, children first, every node whose `ptr < 0`, then a header atom;
nodes already written are skipped, so a commit writes only the paths it copied.
Atoms are `io.encode` of plain lists::

    header  [2, count, root_ptr, root_level]      root_ptr -1 when empty
    leaf    [0, keys, vals]
    inner   [1, level, separators, child_ptrs, counts]

`SortedMap._load(ptr, io)` reads the header only. Child slots hold ints until first
touched; the kernel then reads, decodes and validates the child (kind, shape, level one
below its parent, fill, count equal to the parent's count, keys sorted and inside the
parent's separators) and stores it in the slot. Anything malformed raises
`CorruptionError(offset=ptr)`.

Bulk builds
-----------
`SortedMap.from_sorted(keys, values)` (an index build's postings, already in key order)
builds the tree bottom-up instead of descending once per key: leaves of about BULK_FILL
(48) keys, then each level of inner nodes over the one below, so every node but the root
holds MIN_FILL..WIDTH entries and later inserts rarely split at once. O(n) plus one
comparison per key to check the order.

Complexity
----------
get / in / set / delete / bisect / peekitem: O(log n) node visits, each a binary
search of O(log WIDTH) comparisons; len: O(1); a range of m keys: O(log n + m) -- the
bounds become ranks first, so the scan itself walks leaves without comparing keys.
A persistent edit copies O(log n) nodes of O(WIDTH) each.
"""
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport Py_LT, PyObject_RichCompareBool
from libc.string cimport memcpy, memmove

import collections.abc
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from fractions import Fraction
from functools import cmp_to_key
from uuid import UUID

from protobase.errors import CorruptionError, SerializationError

cdef extern from *:
    const char *PB_SOURCE_DIGEST
__source_digest__ = PB_SOURCE_DIGEST.decode("ascii")

__all__ = ["SortedMap", "SortedMapMutation", "compare", "type_class"]

cdef object _MISSING = object()
cdef object _PTR_LIMIT = 1 << 62     # pointers and counts beyond this are damage, not data

cdef enum:
    KIND_LEAF = 0
    KIND_INNER = 1
    KIND_HEADER = 2


# ---------------------------------------------------------------------------------------
# Key order

cdef object _Decimal = Decimal
cdef object _Fraction = Fraction
cdef object _Enum = Enum
cdef object _datetime = datetime
cdef object _date = date
cdef object _time = time
cdef object _timedelta = timedelta
cdef object _UUID = UUID


cpdef int type_class(object x) except -1:
    """Rank of x's type class in the key order; TypeError for a type that cannot be a key."""
    cdef type t = type(x)
    if x is None:
        return 0
    if t is int or t is float or t is bool:
        return 1
    if t is str:
        return 2
    if t is bytes:
        return 3
    if isinstance(x, _Enum):     # before int/str: IntEnum and StrEnum members are Enums
        return 12
    if isinstance(x, (int, float, _Decimal, _Fraction)):
        return 1
    if isinstance(x, str):
        return 2
    if isinstance(x, bytes):
        return 3
    if isinstance(x, _datetime):  # before date: datetime is a date subclass
        return 6 if x.utcoffset() is not None else 5
    if isinstance(x, _date):
        return 4
    if isinstance(x, _time):
        return 7
    if isinstance(x, _timedelta):
        return 8
    if isinstance(x, _UUID):
        return 9
    if isinstance(x, tuple):
        return 10
    if isinstance(x, frozenset):
        return 11
    raise SerializationError(f"unsupported key type: {type(x).__name__!r} (keys must be None, "
                             "bool, int, float, Decimal, Fraction, str, bytes, "
                             "date/time/datetime, timedelta, UUID, Enum, or tuples/frozensets "
                             "of those)", type_name=type(x).__name__)


cdef int _check_key(object x) except -1:
    """Reject a key that could never be ordered, looking inside tuples and frozensets."""
    cdef type t = type(x)
    if t is int or t is str or t is float or t is bytes or x is None:
        return 0
    cdef int c = type_class(x)
    if c == 10 or c == 11:
        for e in x:
            _check_key(e)
    elif c == 12:
        _check_key(x.value)
    elif c == 1 and isinstance(x, _Decimal) and x.is_snan():
        raise SerializationError("Decimal('sNaN') cannot be a key: a signaling NaN cannot be "
                                 "compared (dict refuses it too); use Decimal('NaN') or "
                                 "float('nan'), which are one key", type_name="Decimal")
    return 0


cdef inline bint _is_nan(object x):
    if type(x) is float or isinstance(x, float):
        return x != x
    if isinstance(x, _Decimal):
        return x.is_nan()
    return False


cdef inline int _native(object a, object b) except -2:
    if a < b:
        return -1
    if b < a:
        return 1
    return 0


cdef object _sort_key = None   # cmp_to_key(_cmp_py), built once at import below


def _cmp_py(a, b):
    return _cmp(a, b)


cdef int _cmp(object a, object b) except -2:
    """Three-way comparison in the key order (keys already known to be allowed)."""
    cdef type ta = type(a)
    cdef double da, db
    if ta is type(b):
        if ta is int or ta is str or ta is bytes:
            if PyObject_RichCompareBool(a, b, Py_LT):
                return -1
            return 1 if PyObject_RichCompareBool(b, a, Py_LT) else 0
        if ta is float:
            da = PyFloat_AS_DOUBLE(a)
            db = PyFloat_AS_DOUBLE(b)
            if da == da and db == db:
                return -1 if da < db else (1 if db < da else 0)
    cdef int ca = type_class(a)
    cdef int cb = type_class(b)
    if ca != cb:
        return -1 if ca < cb else 1
    if ca == 0:
        return 0
    if ca == 1:
        if _is_nan(a):
            return 0 if _is_nan(b) else 1
        if _is_nan(b):
            return -1
        return _native(a, b)
    if ca == 7:
        ea = a.utcoffset() is not None
        eb = b.utcoffset() is not None
        if ea != eb:
            return 1 if ea else -1
        return _native(a, b)
    if ca == 10:
        return _cmp_seq(a, b)
    if ca == 11:
        return _cmp_seq(sorted(a, key=_sort_key), sorted(b, key=_sort_key))
    if ca == 12:
        c = _native(type(a).__qualname__, type(b).__qualname__)
        return c if c else _cmp(a.value, b.value)
    return _native(a, b)


cdef int _cmp_seq(object a, object b) except -2:
    cdef Py_ssize_t i, na = len(a), nb = len(b)
    cdef int c
    for i in range(min(na, nb)):
        c = _cmp(a[i], b[i])
        if c:
            return c
    return -1 if na < nb else (1 if na > nb else 0)


_sort_key = cmp_to_key(_cmp_py)


cpdef int compare(object a, object b) except? -2:
    """-1, 0 or 1 as a sorts before, equal to or after b in the key order."""
    _check_key(a)
    _check_key(b)
    return _cmp(a, b)


cdef inline bint _lt(object a, object b) except -1:
    """a < b in the key order; the homogeneous int/float/str cases skip the general rule."""
    cdef type ta = type(a)
    cdef double da, db
    if ta is type(b):
        if ta is int or ta is str or ta is bytes:
            return PyObject_RichCompareBool(a, b, Py_LT)
        if ta is float:
            da = PyFloat_AS_DOUBLE(a)
            db = PyFloat_AS_DOUBLE(b)
            if da == da and db == db:
                return da < db
    return _cmp(a, b) < 0


cdef inline Py_ssize_t _bisect_left(list a, object k) except -1:
    cdef Py_ssize_t lo = 0, hi = PyList_GET_SIZE(a), mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if _lt(a[mid], k):
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline Py_ssize_t _bisect_right(list a, object k) except -1:
    cdef Py_ssize_t lo = 0, hi = PyList_GET_SIZE(a), mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if _lt(k, a[mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef inline bint _small_int(object k, long long *out) except -1:
    """True (and the value in *out) when k is an exact int that fits in 64 bits."""
    cdef int overflow = 0
    if type(k) is not int:
        return False
    out[0] = PyLong_AsLongLongAndOverflow(k, &overflow)
    return overflow == 0


cdef bint _ik_ready(_Node node) except -1:
    """Make node's int64 shadow current; True when every key is a 64-bit exact int.

    Built on first search after an edit (a benign write even into a frozen node: the
    logical content is unchanged), so a homogeneous int tree is searched over a packed C
    array instead of chasing one int object per probe."""
    cdef Py_ssize_t i, n
    cdef list keys
    if node.ikstate == 0:
        keys = node.keys
        n = PyList_GET_SIZE(keys)
        for i in range(n):
            if not _small_int(keys[i], &node.ik[i]):
                node.ikstate = 2
                return False
        node.ikn = n
        node.ikstate = 1      # published last: a reader never sees a half-filled shadow
    return node.ikstate == 1


cdef inline Py_ssize_t _ibisect(const long long *a, Py_ssize_t n, long long k, bint right) noexcept:
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < k or (right and a[mid] == k):
            lo = mid + 1
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------
# Nodes

cdef class _Node:
    pass


cdef class _Leaf(_Node):
    pass


cdef class _Inner(_Node):
    pass


cdef inline _Leaf _new_leaf(list keys, list vals, object owner):
    cdef _Leaf n = _Leaf.__new__(_Leaf)
    n.keys = keys
    n.vals = vals
    n.owner = owner
    n.ptr = -1
    return n


cdef inline _Inner _new_inner(list keys, list kids, Py_ssize_t level, object owner):
    cdef _Inner n = _Inner.__new__(_Inner)
    n.keys = keys
    n.kids = kids
    n.level = level
    n.owner = owner
    n.ptr = -1
    return n


cdef _Node _copy(_Node node, object owner):
    cdef _Inner src, dst
    if isinstance(node, _Leaf):
        return _new_leaf(list(node.keys), list((<_Leaf>node).vals), owner)
    src = <_Inner>node
    dst = _new_inner(list(src.keys), list(src.kids), src.level, owner)
    memcpy(dst.counts, src.counts, PyList_GET_SIZE(src.kids) * sizeof(Py_ssize_t))
    return dst


cdef inline Py_ssize_t _fill(_Node node):
    if isinstance(node, _Leaf):
        return PyList_GET_SIZE(node.keys)
    return PyList_GET_SIZE((<_Inner>node).kids)


cdef Py_ssize_t _total(_Node node):
    cdef Py_ssize_t i, s = 0
    if isinstance(node, _Leaf):
        return PyList_GET_SIZE(node.keys)
    for i in range(PyList_GET_SIZE((<_Inner>node).kids)):
        s += (<_Inner>node).counts[i]
    return s


# ---------------------------------------------------------------------------------------
# Loading (lazy child slots)

cdef _corrupt(Py_ssize_t ptr, str why):
    return CorruptionError(f"damaged B-tree node at offset {ptr}: {why}", offset=ptr)


cdef bint _is_int(object x):
    return isinstance(x, int) and not isinstance(x, bool)


cdef _Node _load_node(object io, Py_ssize_t ptr, Py_ssize_t level, Py_ssize_t expected,
                      object lo, object hi, bint is_root):
    """Read, decode and validate the node at ptr (see the essay for what is checked)."""
    cdef Py_ssize_t i, n, total
    cdef _Inner inner
    cdef _Node node
    data = io.read_atom(ptr)
    try:
        obj = io.decode(data)
    except Exception as exc:
        raise _corrupt(ptr, f"undecodable ({exc!r})") from exc
    if not isinstance(obj, (list, tuple)) or len(obj) < 3 or not _is_int(obj[0]):
        raise _corrupt(ptr, "not a node")
    kind = obj[0]
    try:
        if kind == KIND_LEAF:
            if len(obj) != 3 or level != 0:
                raise _corrupt(ptr, "leaf where an inner node was expected" if level else
                               "malformed leaf")
            keys, vals = obj[1], obj[2]
            if not isinstance(keys, list) or not isinstance(vals, list):
                keys, vals = list(keys), list(vals)
            n = len(keys)
            if n != len(vals) or n != expected or n > WIDTH or n < (1 if is_root else MIN_FILL):
                raise _corrupt(ptr, f"leaf holds {n} keys and {len(vals)} values, "
                                    f"its parent counted {expected}")
            _check_sorted(keys, lo, hi, ptr)
            node = _new_leaf(keys, vals, None)
        elif kind == KIND_INNER:
            if len(obj) != 5 or not _is_int(obj[1]) or obj[1] != level or level < 1:
                raise _corrupt(ptr, f"inner node is not at level {level}")
            keys, ptrs, counts = list(obj[2]), list(obj[3]), list(obj[4])
            n = len(ptrs)
            if (n > WIDTH or n < (2 if is_root else MIN_FILL) or len(counts) != n
                    or len(keys) != n - 1):
                raise _corrupt(ptr, f"inner node with {n} children, {len(counts)} counts, "
                                    f"{len(keys)} separators")
            inner = _new_inner(keys, ptrs, level, None)
            total = 0
            for i in range(n):
                if (not _is_int(ptrs[i]) or not 0 <= ptrs[i] < _PTR_LIMIT
                        or not _is_int(counts[i]) or not 1 <= counts[i] < _PTR_LIMIT):
                    raise _corrupt(ptr, f"bad child pointer or count at slot {i}")
                inner.counts[i] = counts[i]
                total += inner.counts[i]
            if total != expected:
                raise _corrupt(ptr, f"children hold {total} entries, the parent counted {expected}")
            _check_sorted(keys, lo, hi, ptr)
            node = inner
        else:
            raise _corrupt(ptr, f"unknown node kind {kind!r}")
    except TypeError as exc:       # a key of a type that cannot be ordered
        raise _corrupt(ptr, f"bad key ({exc})") from exc
    except OverflowError as exc:   # a count too large for the platform
        raise _corrupt(ptr, f"bad count ({exc})") from exc
    node.ptr = ptr
    return node


cdef int _check_sorted(list keys, object lo, object hi, Py_ssize_t ptr) except -1:
    cdef Py_ssize_t i, n = len(keys)
    for i in range(n):
        _check_key(keys[i])
        if i and not _lt(keys[i - 1], keys[i]):
            raise _corrupt(ptr, "keys out of order")
    if n and ((lo is not _MISSING and _lt(keys[0], lo)) or
              (hi is not _MISSING and not _lt(keys[n - 1], hi))):
        raise _corrupt(ptr, "keys outside the parent's separators")
    return 0


cdef _Node _child(_Inner parent, Py_ssize_t i, object io):
    """Child i of parent, loading it on first touch (a benign write into a frozen node)."""
    c = parent.kids[i]
    if isinstance(c, _Node):
        return <_Node>c
    if io is None:
        raise RuntimeError("B-tree child is an unloaded pointer but the map has no atom io")
    n = PyList_GET_SIZE(parent.kids)
    node = _load_node(io, c, parent.level - 1, parent.counts[i],
                      parent.keys[i - 1] if i > 0 else _MISSING,
                      parent.keys[i] if i < n - 1 else _MISSING, False)
    parent.kids[i] = node
    return node


cdef _Node _own_child(_Inner parent, Py_ssize_t i, object owner, object io):
    cdef _Node c = _child(parent, i, io)
    if c.owner is not owner:
        c = _copy(c, owner)
        parent.kids[i] = c
    return c


# ---------------------------------------------------------------------------------------
# Edits (the node passed in is owned by `owner`)

cdef inline Py_ssize_t _inner_slot(_Inner inner, object key) except -1:
    """The child of inner whose key range holds key. Separators change only on splits and
    merges, so the int shadow stays valid across most edits below them."""
    cdef long long q = 0
    if _small_int(key, &q) and _ik_ready(inner):
        return _ibisect(inner.ik, inner.ikn, q, True)
    return _bisect_right(inner.keys, key)


cdef int _insert(_Node node, object key, object val, object owner, object io) except -1:
    """Insert or replace key; returns 1 when the map grew. May leave node over-full."""
    cdef Py_ssize_t i
    cdef _Leaf leaf
    cdef _Inner inner
    cdef _Node child
    cdef int added
    if isinstance(node, _Leaf):
        leaf = <_Leaf>node
        i = _bisect_left(leaf.keys, key)
        if i < PyList_GET_SIZE(leaf.keys) and not _lt(key, leaf.keys[i]):
            leaf.vals[i] = val      # dict keeps the first key object of equal keys; so do we
            return 0
        leaf.keys.insert(i, key)
        leaf.ikstate = 0
        leaf.vals.insert(i, val)
        return 1
    inner = <_Inner>node
    i = _inner_slot(inner, key)
    child = _own_child(inner, i, owner, io)
    added = _insert(child, key, val, owner, io)
    inner.counts[i] += added
    if _fill(child) > WIDTH:
        _split_child(inner, i, owner)
    return added


cdef int _split_child(_Inner parent, Py_ssize_t i, object owner) except -1:
    cdef _Node child = <_Node>parent.kids[i]
    cdef _Node right
    cdef _Inner ic, ir
    cdef Py_ssize_t n, h, j, rc = 0, nk = PyList_GET_SIZE(parent.kids)
    if isinstance(child, _Leaf):
        n = PyList_GET_SIZE(child.keys)
        h = n // 2
        right = _new_leaf(child.keys[h:], (<_Leaf>child).vals[h:], owner)
        del child.keys[h:]
        del (<_Leaf>child).vals[h:]
        sep = right.keys[0]
        rc = n - h
    else:
        ic = <_Inner>child
        n = PyList_GET_SIZE(ic.kids)
        h = n // 2
        ir = _new_inner(ic.keys[h:], ic.kids[h:], ic.level, owner)
        for j in range(n - h):
            ir.counts[j] = ic.counts[h + j]
            rc += ir.counts[j]
        sep = ic.keys[h - 1]
        del ic.keys[h - 1:]
        del ic.kids[h:]
        right = ir
    parent.keys.insert(i, sep)
    parent.ikstate = 0
    child.ikstate = 0
    parent.kids.insert(i + 1, right)
    memmove(&parent.counts[i + 2], &parent.counts[i + 1], (nk - i - 1) * sizeof(Py_ssize_t))
    parent.counts[i] -= rc
    parent.counts[i + 1] = rc
    return 0


cdef object _delete(_Node node, object key, object owner, object io):
    """Remove key (known to be present) and return its value. May leave node under-full."""
    cdef Py_ssize_t i
    cdef _Leaf leaf
    cdef _Inner inner
    cdef _Node child
    if isinstance(node, _Leaf):
        leaf = <_Leaf>node
        i = _bisect_left(leaf.keys, key)
        val = leaf.vals[i]
        del leaf.keys[i]
        leaf.ikstate = 0
        del leaf.vals[i]
        return val
    inner = <_Inner>node
    i = _inner_slot(inner, key)
    child = _own_child(inner, i, owner, io)
    val = _delete(child, key, owner, io)
    inner.counts[i] -= 1
    if _fill(child) < MIN_FILL:
        _rebalance(inner, i, owner, io)
    return val


cdef int _rebalance(_Inner parent, Py_ssize_t i, object owner, object io) except -1:
    """Child i fell to MIN_FILL - 1: borrow one entry from a sibling, or merge with one."""
    cdef Py_ssize_t nk = PyList_GET_SIZE(parent.kids)
    if i > 0 and _fill(_child(parent, i - 1, io)) > MIN_FILL:
        _borrow_left(parent, i, owner, io)
    elif i + 1 < nk and _fill(_child(parent, i + 1, io)) > MIN_FILL:
        _borrow_right(parent, i, owner, io)
    elif i > 0:
        _merge(parent, i - 1, owner, io)
    else:
        _merge(parent, i, owner, io)
    return 0


cdef int _borrow_left(_Inner parent, Py_ssize_t i, object owner, object io) except -1:
    cdef _Node left = _own_child(parent, i - 1, owner, io)
    cdef _Node child = <_Node>parent.kids[i]
    cdef _Inner il, ic
    cdef Py_ssize_t moved, nl, nc
    if isinstance(child, _Leaf):
        child.keys.insert(0, left.keys.pop())
        (<_Leaf>child).vals.insert(0, (<_Leaf>left).vals.pop())
        parent.keys[i - 1] = child.keys[0]
        moved = 1
    else:
        il = <_Inner>left
        ic = <_Inner>child
        nl = PyList_GET_SIZE(il.kids)
        nc = PyList_GET_SIZE(ic.kids)
        moved = il.counts[nl - 1]
        ic.kids.insert(0, il.kids.pop())
        ic.keys.insert(0, parent.keys[i - 1])
        parent.keys[i - 1] = il.keys.pop()
        memmove(&ic.counts[1], &ic.counts[0], nc * sizeof(Py_ssize_t))
        ic.counts[0] = moved
    parent.counts[i - 1] -= moved
    parent.counts[i] += moved
    parent.ikstate = left.ikstate = child.ikstate = 0
    return 0


cdef int _borrow_right(_Inner parent, Py_ssize_t i, object owner, object io) except -1:
    cdef _Node right = _own_child(parent, i + 1, owner, io)
    cdef _Node child = <_Node>parent.kids[i]
    cdef _Inner ir, ic
    cdef Py_ssize_t moved, nr, nc
    if isinstance(child, _Leaf):
        child.keys.append(right.keys.pop(0))
        (<_Leaf>child).vals.append((<_Leaf>right).vals.pop(0))
        parent.keys[i] = right.keys[0]
        moved = 1
    else:
        ir = <_Inner>right
        ic = <_Inner>child
        nr = PyList_GET_SIZE(ir.kids)
        nc = PyList_GET_SIZE(ic.kids)
        moved = ir.counts[0]
        ic.kids.append(ir.kids.pop(0))
        ic.keys.append(parent.keys[i])
        parent.keys[i] = ir.keys.pop(0)
        ic.counts[nc] = moved
        memmove(&ir.counts[0], &ir.counts[1], (nr - 1) * sizeof(Py_ssize_t))
    parent.counts[i + 1] -= moved
    parent.counts[i] += moved
    parent.ikstate = right.ikstate = child.ikstate = 0
    return 0


cdef int _merge(_Inner parent, Py_ssize_t j, object owner, object io) except -1:
    """Fold child j + 1 into child j and drop it (their total fits in WIDTH)."""
    cdef _Node a = _own_child(parent, j, owner, io)
    cdef _Node b = _child(parent, j + 1, io)
    cdef _Inner ia, ib
    cdef Py_ssize_t na, nb, nk = PyList_GET_SIZE(parent.kids)
    if isinstance(a, _Leaf):
        a.keys.extend(b.keys)
        (<_Leaf>a).vals.extend((<_Leaf>b).vals)
    else:
        ia = <_Inner>a
        ib = <_Inner>b
        na = PyList_GET_SIZE(ia.kids)
        nb = PyList_GET_SIZE(ib.kids)
        ia.keys.append(parent.keys[j])
        ia.keys.extend(ib.keys)
        ia.kids.extend(ib.kids)
        memcpy(&ia.counts[na], &ib.counts[0], nb * sizeof(Py_ssize_t))
    del parent.keys[j]
    parent.ikstate = a.ikstate = 0
    del parent.kids[j + 1]
    parent.counts[j] += parent.counts[j + 1]
    memmove(&parent.counts[j + 1], &parent.counts[j + 2], (nk - j - 2) * sizeof(Py_ssize_t))
    return 0


# ---------------------------------------------------------------------------------------
# Reads

cdef object _find(object root, object key, object io):
    """The value stored under key, or _MISSING."""
    cdef _Node node = <_Node>root
    cdef _Leaf leaf
    cdef Py_ssize_t i
    cdef long long q = 0
    cdef bint qint = _small_int(key, &q)
    while not isinstance(node, _Leaf):
        if qint and _ik_ready(node):
            i = _ibisect(node.ik, node.ikn, q, True)
        else:
            i = _bisect_right(node.keys, key)
        node = _child(<_Inner>node, i, io)
    leaf = <_Leaf>node
    if qint and _ik_ready(leaf):
        i = _ibisect(leaf.ik, leaf.ikn, q, False)
        if i < leaf.ikn and leaf.ik[i] == q:
            return leaf.vals[i]
        return _MISSING
    i = _bisect_left(leaf.keys, key)
    if i < PyList_GET_SIZE(leaf.keys) and not _lt(key, leaf.keys[i]):
        return leaf.vals[i]
    return _MISSING


cdef Py_ssize_t _rank(object root, object key, bint right, object io) except -1:
    """Number of keys < key (right: <= key)."""
    cdef _Node node = <_Node>root
    cdef _Inner inner
    cdef Py_ssize_t i, j, r = 0
    cdef long long q = 0
    cdef bint qint = _small_int(key, &q)
    while not isinstance(node, _Leaf):
        inner = <_Inner>node
        if qint and _ik_ready(inner):
            i = _ibisect(inner.ik, inner.ikn, q, True)
        else:
            i = _bisect_right(inner.keys, key)
        for j in range(i):
            r += inner.counts[j]
        node = _child(inner, i, io)
    if qint and _ik_ready(node):
        return r + _ibisect(node.ik, node.ikn, q, right)
    if right:
        return r + _bisect_right(node.keys, key)
    return r + _bisect_left(node.keys, key)


cdef _Leaf _leaf_at(object root, Py_ssize_t pos, object io, Py_ssize_t *offset):
    """The leaf holding the entry of rank pos (0 <= pos < len); *offset gets its index."""
    cdef _Node node = <_Node>root
    cdef _Inner inner
    cdef Py_ssize_t i
    while not isinstance(node, _Leaf):
        inner = <_Inner>node
        i = 0
        while pos >= inner.counts[i]:
            pos -= inner.counts[i]
            i += 1
        node = _child(inner, i, io)
    offset[0] = pos
    return <_Leaf>node


cdef class _Walk:
    """Iterator over the entries of rank start..stop-1 (or backwards), one leaf at a time."""
    cdef _Base owner
    cdef Py_ssize_t version
    cdef object io
    cdef list path                      # the nodes from the root down to the current leaf
    cdef Py_ssize_t idx[MAX_DEPTH]      # the child index taken at each inner level
    cdef Py_ssize_t depth               # index of the leaf in path
    cdef list keys, vals                # the current leaf's lists
    cdef Py_ssize_t li, lim, remaining  # position in the leaf, the leaf's length
    cdef int mode                       # 0 keys, 1 values, 2 items
    cdef bint reverse

    def __iter__(self):
        return self

    def __length_hint__(self):
        return self.remaining

    def __next__(self):
        cdef Py_ssize_t i
        cdef object out
        if self.remaining <= 0:
            raise StopIteration
        if self.owner.version != self.version:
            self.remaining = 0
            raise RuntimeError("SortedMapMutation changed size or shape during iteration")
        i = self.li
        if self.mode == 0:
            out = self.keys[i]
        elif self.mode == 1:
            out = self.vals[i]
        else:
            out = (self.keys[i], self.vals[i])
        self.remaining -= 1
        if self.reverse:
            self.li = i - 1
            if i == 0 and self.remaining:
                self._step(-1)
        else:
            self.li = i + 1
            if self.li == self.lim and self.remaining:
                self._step(1)
        return out

    cdef inline void _enter(self, _Leaf leaf):
        self.keys = leaf.keys
        self.vals = leaf.vals
        self.lim = PyList_GET_SIZE(leaf.keys)

    cdef int _step(self, int d) except -1:
        """Move to the next leaf in direction d (the current one is used up)."""
        cdef Py_ssize_t lvl = self.depth - 1
        cdef _Inner inner
        cdef _Node node
        while True:
            inner = <_Inner>self.path[lvl]
            if 0 <= self.idx[lvl] + d < PyList_GET_SIZE(inner.kids):
                break
            lvl -= 1
        self.idx[lvl] += d
        node = _child(inner, self.idx[lvl], self.io)
        while lvl + 1 < self.depth:
            lvl += 1
            self.path[lvl] = node
            self.idx[lvl] = 0 if d > 0 else PyList_GET_SIZE((<_Inner>node).kids) - 1
            node = _child(<_Inner>node, self.idx[lvl], self.io)
        self.path[self.depth] = node
        self._enter(<_Leaf>node)
        self.li = 0 if d > 0 else self.lim - 1
        return 0


cdef _Walk _walk(_Base m, Py_ssize_t start, Py_ssize_t stop, bint reverse, int mode):
    cdef _Walk w = _Walk.__new__(_Walk)
    cdef _Node node
    cdef _Inner inner
    cdef Py_ssize_t pos, i, d = 0
    w.owner = m
    w.version = m.version
    w.io = m.io
    w.mode = mode
    w.reverse = reverse
    w.path = []
    w.remaining = stop - start if stop > start else 0
    if w.remaining == 0:
        return w
    pos = stop - 1 if reverse else start
    node = <_Node>m._root()
    while not isinstance(node, _Leaf):
        inner = <_Inner>node
        w.path.append(inner)
        i = 0
        while pos >= inner.counts[i]:
            pos -= inner.counts[i]
            i += 1
        w.idx[d] = i
        d += 1
        node = _child(inner, i, m.io)
    w.path.append(node)
    w.depth = d
    w._enter(<_Leaf>node)
    w.li = pos
    return w


cdef class _View:
    """keys() / values() / items() of a map: sized, iterable, reversible, with `in`."""
    cdef _Base m
    cdef int mode

    def __len__(self):
        return self.m.count

    def __iter__(self):
        return _walk(self.m, 0, self.m.count, False, self.mode)

    def __reversed__(self):
        return _walk(self.m, 0, self.m.count, True, self.mode)

    def __contains__(self, x):
        if self.mode == 0:
            return x in self.m
        if self.mode == 2:
            if not isinstance(x, tuple) or len(x) != 2:
                return False
            v = self.m.get(x[0], _MISSING)
            return v is not _MISSING and (v is x[1] or v == x[1])
        for v in self:
            if v is x or v == x:
                return True
        return False

    def __repr__(self):
        name = ("keys", "values", "items")[self.mode]
        return f"SortedMap_{name}({list(self)!r})"


cdef _View _view(_Base m, int mode):
    cdef _View v = _View.__new__(_View)
    v.m = m
    v.mode = mode
    return v


# ---------------------------------------------------------------------------------------
# Invariant walker

cdef Py_ssize_t _check_node(_Node node, Py_ssize_t level, object lo, object hi, bint is_root,
                            object live, object io) except -1:
    cdef Py_ssize_t i, n, total = 0, sub
    cdef _Inner inner
    cdef _Node child
    if not (node.ptr >= -1):
        raise AssertionError("bad ptr")
    if live is not None and node.owner is live:
        if not (node.ptr < 0):
            raise AssertionError("a node owned by a live mutation was persisted")
    keys = node.keys
    for i in range(1, len(keys)):
        if not (_cmp(keys[i - 1], keys[i]) < 0):
            raise AssertionError(f"keys out of order at {i}: {keys[i-1]!r}, {keys[i]!r}")
    if len(keys):
        if not (lo is _MISSING or _cmp(lo, keys[0]) <= 0):
            raise AssertionError("key below its lower separator")
        if not (hi is _MISSING or _cmp(keys[len(keys) - 1], hi) < 0):
            raise AssertionError("key at or above its upper separator")
    if isinstance(node, _Leaf):
        if not (level == 0):
            raise AssertionError("leaves at different depths")
        n = len(keys)
        if not (n == len((<_Leaf>node).vals)):
            raise AssertionError("keys and values differ in length")
        if not (n <= WIDTH):
            raise AssertionError(f"leaf over-full ({n})")
        if not (n >= (1 if is_root else MIN_FILL)):
            raise AssertionError(f"leaf under-full ({n})")
        return n
    inner = <_Inner>node
    if not (inner.level == level):
        raise AssertionError(f"inner level {inner.level} at depth level {level}")
    n = len(inner.kids)
    if not (len(keys) == n - 1):
        raise AssertionError("separator count is not children - 1")
    if not (n <= WIDTH):
        raise AssertionError(f"inner node over-full ({n})")
    if not (n >= (2 if is_root else MIN_FILL)):
        raise AssertionError(f"inner node under-full ({n})")
    for i in range(n):
        if node.ptr >= 0 and isinstance(inner.kids[i], _Node):
            if not ((<_Node>inner.kids[i]).ptr >= 0):
                raise AssertionError("a persisted node has an unpersisted child")
        child = _child(inner, i, io)
        sub = _check_node(child, level - 1, keys[i - 1] if i > 0 else lo,
                          keys[i] if i < n - 1 else hi, False, live, io)
        if not (sub == inner.counts[i]):
            raise AssertionError(f"count {inner.counts[i]} for a subtree of {sub}")
        total += sub
    return total


# ---------------------------------------------------------------------------------------
# Persistence

cdef Py_ssize_t _persist_node(_Node node, object io) except -2:
    cdef Py_ssize_t i, n
    cdef _Inner inner
    if node.ptr >= 0:
        return node.ptr
    if isinstance(node, _Leaf):
        data = io.encode([KIND_LEAF, node.keys, (<_Leaf>node).vals])
    else:
        inner = <_Inner>node
        n = PyList_GET_SIZE(inner.kids)
        ptrs = []
        for i in range(n):
            c = inner.kids[i]
            ptrs.append(_persist_node(<_Node>c, io) if isinstance(c, _Node) else c)
        data = io.encode([KIND_INNER, inner.level, inner.keys, ptrs,
                          [inner.counts[i] for i in range(n)]])
    node.ptr = io.write_atom(data)
    return node.ptr


# ---------------------------------------------------------------------------------------
# The maps

cdef class _Base:
    """What SortedMap and SortedMapMutation share: every read."""

    cdef object _root(self):
        if self.root is None or isinstance(self.root, _Node):
            return self.root
        self.root = _load_node(self.io, self.root, self.root_level, self.count,
                               _MISSING, _MISSING, True)
        return self.root

    def __len__(self):
        return self.count

    def __bool__(self):
        return self.count > 0

    def __getitem__(self, key):
        _check_key(key)
        if self.count == 0:
            raise KeyError(key)
        v = _find(self._root(), key, self.io)
        if v is _MISSING:
            raise KeyError(key)
        return v

    def get(self, key, default=None):
        """The value of key, or default."""
        _check_key(key)
        if self.count == 0:
            return default
        v = _find(self._root(), key, self.io)
        return default if v is _MISSING else v

    def __contains__(self, key):
        _check_key(key)
        return self.count > 0 and _find(self._root(), key, self.io) is not _MISSING

    def __iter__(self):
        return _walk(self, 0, self.count, False, 0)

    def __reversed__(self):
        return _walk(self, 0, self.count, True, 0)

    def keys(self):
        return _view(self, 0)

    def values(self):
        return _view(self, 1)

    def items(self):
        return _view(self, 2)

    cdef tuple _span(self, minimum, maximum, inclusive):
        cdef Py_ssize_t lo = 0, hi = self.count
        lo_inc, hi_inc = inclusive
        if self.count == 0:
            return 0, 0
        root = self._root()
        if minimum is not None:
            _check_key(minimum)
            lo = _rank(root, minimum, not lo_inc, self.io)
        if maximum is not None:
            _check_key(maximum)
            hi = _rank(root, maximum, bool(hi_inc), self.io)
        return lo, hi

    def irange(self, minimum=None, maximum=None, inclusive=(True, True), reverse=False):
        """Keys from minimum to maximum (None: unbounded), in order or reversed."""
        lo, hi = self._span(minimum, maximum, inclusive)
        return _walk(self, lo, hi, bool(reverse), 0)

    def irange_items(self, minimum=None, maximum=None, inclusive=(True, True), reverse=False):
        """(key, value) pairs from minimum to maximum (None: unbounded)."""
        lo, hi = self._span(minimum, maximum, inclusive)
        return _walk(self, lo, hi, bool(reverse), 2)

    def bisect_left(self, key):
        """Number of keys sorting before key."""
        _check_key(key)
        return _rank(self._root(), key, False, self.io) if self.count else 0

    def bisect_right(self, key):
        """Number of keys sorting before or equal to key."""
        _check_key(key)
        return _rank(self._root(), key, True, self.io) if self.count else 0

    def peekitem(self, Py_ssize_t index=-1):
        """(key, value) at position index (negative counts from the end); IndexError if none."""
        cdef Py_ssize_t off
        cdef _Leaf leaf
        if index < 0:
            index += self.count
        if index < 0 or index >= self.count:
            raise IndexError("SortedMap index out of range")
        leaf = _leaf_at(self._root(), index, self.io, &off)
        return leaf.keys[off], leaf.vals[off]

    def min_key(self):
        """The smallest key; ValueError when empty."""
        if self.count == 0:
            raise ValueError("min_key() of an empty SortedMap")
        return self.peekitem(0)[0]

    def max_key(self):
        """The largest key; ValueError when empty."""
        if self.count == 0:
            raise ValueError("max_key() of an empty SortedMap")
        return self.peekitem(-1)[0]

    def __eq__(self, other):
        if isinstance(other, _Base):
            if len(self) != len(other):
                return False
            for (a, x), (b, y) in zip(self.items(), other.items()):
                if _cmp(a, b) != 0 or not (x is y or x == y):
                    return False
            return True
        if isinstance(other, collections.abc.Mapping):
            if len(self) != len(other):
                return False
            for k, v in other.items():
                mine = self.get(k, _MISSING)
                if mine is _MISSING or not (mine is v or mine == v):
                    return False
            return True
        return NotImplemented

    def __ne__(self, other):
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    def __repr__(self):
        parts = []
        for i, (k, v) in enumerate(self.items()):
            if i == 10:
                parts.append("...")
                break
            parts.append(f"{k!r}: {v!r}")
        return f"{type(self).__name__}({{{', '.join(parts)}}})"

    def _check(self, live=None):
        """Walk the whole tree and raise AssertionError on any broken invariant."""
        root = self._root()
        if root is None:
            if not (self.count == 0):
                raise AssertionError(f"empty tree with count {self.count}")
            return
        if not (isinstance(root, _Node)):
            raise AssertionError("root is not a node")
        level = 0 if isinstance(root, _Leaf) else (<_Inner>root).level
        if not (level < MAX_DEPTH):
            raise AssertionError("tree too deep")
        n = _check_node(<_Node>root, level, _MISSING, _MISSING, True, live, self.io)
        if not (n == self.count):
            raise AssertionError(f"len() is {self.count} but the tree holds {n}")


cdef Py_ssize_t _bulk_parts(Py_ssize_t n):
    """How many nodes a bulk build spreads n entries over: about BULK_FILL each (room
    for later inserts without an immediate split), never fewer than MIN_FILL nor more
    than WIDTH; n <= WIDTH is one node (a root may hold fewer than MIN_FILL)."""
    cdef Py_ssize_t k = (n + BULK_FILL - 1) // BULK_FILL
    if k > 1 and n // k < MIN_FILL:
        k = (n + WIDTH - 1) // WIDTH
    return k if k > 0 else 1


cdef _Node _bulk_root(list keys, list vals):
    """A tree over sorted keys built level by level: leaves of even fill first, then each
    level of inner nodes over the one below, its separators the first key under each
    child after the first, until one node is left (the invariants of the essay hold:
    fill, counts, one depth for every leaf)."""
    cdef Py_ssize_t n = len(keys), k, i, j, lo, hi, total, level = 0
    cdef list nodes = [], firsts = [], sizes = [], kids, up_nodes, up_firsts, up_sizes
    cdef _Inner inner
    k = _bulk_parts(n)
    for i in range(k):
        lo, hi = n * i // k, n * (i + 1) // k
        nodes.append(_new_leaf(keys[lo:hi], vals[lo:hi], None))
        firsts.append(keys[lo])
        sizes.append(hi - lo)
    while len(nodes) > 1:
        level += 1
        n = len(nodes)
        k = _bulk_parts(n)
        up_nodes, up_firsts, up_sizes = [], [], []
        for i in range(k):
            lo, hi = n * i // k, n * (i + 1) // k
            kids = nodes[lo:hi]
            inner = _new_inner(firsts[lo + 1:hi], kids, level, None)
            total = 0
            for j in range(hi - lo):
                inner.counts[j] = sizes[lo + j]
                total += sizes[lo + j]
            up_nodes.append(inner)
            up_firsts.append(firsts[lo])
            up_sizes.append(total)
        nodes, firsts, sizes = up_nodes, up_firsts, up_sizes
    return <_Node>nodes[0]


cdef SortedMap _new_map(object root, Py_ssize_t count, object io):
    cdef SortedMap m = SortedMap.__new__(SortedMap)
    m.root = root
    m.count = count
    m.io = io
    m.root_level = 0
    return m


cdef object _grown_root(_Node root, object owner):
    """Give an over-full root a parent and split it: the tree grows one level."""
    cdef _Inner top
    if _fill(root) <= WIDTH:
        return root
    top = _new_inner([], [root], 1 if isinstance(root, _Leaf) else (<_Inner>root).level + 1,
                     owner)
    top.counts[0] = _total(root)
    _split_child(top, 0, owner)
    return top


cdef object _shrunk_root(_Node root, object io):
    """Collapse a root left with one child (inner) or no keys (leaf)."""
    while isinstance(root, _Inner) and PyList_GET_SIZE((<_Inner>root).kids) == 1:
        root = _child(<_Inner>root, 0, io)
    if isinstance(root, _Leaf) and PyList_GET_SIZE(root.keys) == 0:
        return None
    return root


cdef class SortedMap(_Base):
    """An immutable ordered map; set()/delete() return new maps sharing untouched nodes."""

    def __init__(self, mapping_or_iterable=None):
        cdef SortedMapMutation mut
        self.root = None
        self.count = 0
        self.io = None
        if mapping_or_iterable is not None:
            mut = self.mutate()
            mut.update(mapping_or_iterable)
            self.root = mut.root
            self.count = mut.count

    def mutate(self):
        """A SortedMapMutation starting from this map."""
        cdef SortedMapMutation m = SortedMapMutation.__new__(SortedMapMutation)
        m.root = self._root()
        m.count = self.count
        m.io = self.io
        m.owner = object()
        return m

    def set(self, key, value):
        """A new map with key set to value."""
        cdef SortedMapMutation m = self.mutate()
        m.set(key, value)
        return _new_map(m.root, m.count, self.io)

    def delete(self, key):
        """A new map without key; KeyError if absent."""
        cdef SortedMapMutation m
        _check_key(key)
        if self.count == 0 or _find(self._root(), key, self.io) is _MISSING:
            raise KeyError(key)
        m = self.mutate()
        m._remove(key)
        return _new_map(m.root, m.count, self.io)

    def discard(self, key):
        """A new map without key (this map itself when key is absent)."""
        cdef SortedMapMutation m
        _check_key(key)
        if self.count == 0 or _find(self._root(), key, self.io) is _MISSING:
            return self
        m = self.mutate()
        m._remove(key)
        return _new_map(m.root, m.count, self.io)

    @staticmethod
    def from_sorted(keys, values):
        """The map of ``keys[i] -> values[i]``, built bottom-up in O(n) (no descent per
        key). ``keys`` must be strictly ascending in ``compare`` order: ValueError if not,
        TypeError for a key that is not allowed."""
        cdef list ks = list(keys), vs = list(values)
        cdef Py_ssize_t n = len(ks), i
        if len(vs) != n:
            raise ValueError(f"from_sorted() got {n} keys and {len(vs)} values")
        for i in range(n):
            _check_key(ks[i])
            if i and not _lt(ks[i - 1], ks[i]):
                raise ValueError(f"from_sorted() needs strictly ascending keys; "
                                 f"{ks[i - 1]!r} is followed by {ks[i]!r}")
        if n == 0:
            return _new_map(None, 0, None)
        return _new_map(_bulk_root(ks, vs), n, None)

    def _persist(self, io):
        """Write every unwritten node (children first), then a header; returns its pointer."""
        root = self._root()
        if self.io is None:
            self.io = io
        if root is None:
            return io.write_atom(io.encode([KIND_HEADER, 0, -1, 0]))
        ptr = _persist_node(<_Node>root, io)
        level = 0 if isinstance(root, _Leaf) else (<_Inner>root).level
        return io.write_atom(io.encode([KIND_HEADER, self.count, ptr, level]))

    @classmethod
    def _load(cls, ptr, io):
        """The map whose header atom is at ptr; nodes are read lazily as they are touched."""
        try:
            obj = io.decode(io.read_atom(ptr))
        except CorruptionError:
            raise
        except Exception as exc:
            raise _corrupt(ptr, f"undecodable header ({exc!r})") from exc
        if (not isinstance(obj, (list, tuple)) or len(obj) != 4 or not all(_is_int(x) for x in obj)
                or obj[0] != KIND_HEADER or not 0 <= obj[1] < _PTR_LIMIT
                or not -1 <= obj[2] < _PTR_LIMIT or not 0 <= obj[3] < MAX_DEPTH
                or (obj[1] == 0) != (obj[2] == -1)):
            raise _corrupt(ptr, "not a SortedMap header")
        cdef SortedMap m = _new_map(None if obj[2] == -1 else obj[2], obj[1], io)
        m.root_level = obj[3]
        return m


cdef class SortedMapMutation(_Base):
    """An ordered map edited in place; finish() returns an immutable snapshot."""

    def __init__(self, *args, **kwargs):
        raise TypeError("use SortedMap(...).mutate() to get a SortedMapMutation")

    cdef _Node _owned_root(self):
        cdef _Node r = <_Node>self._root()
        if r.owner is not self.owner:
            r = _copy(r, self.owner)
            self.root = r
        return r

    def set(self, key, value):
        """Set key to value in place."""
        cdef int added
        _check_key(key)
        if self.root is None:
            self.version += 1
            self.root = _new_leaf([key], [value], self.owner)
            self.count = 1
            return
        added = _insert(self._owned_root(), key, value, self.owner, self.io)
        if added:   # replacing a value moves nothing: iterators stay valid, as with dict
            self.version += 1
            self.count += 1
            self.root = _grown_root(<_Node>self.root, self.owner)

    def __setitem__(self, key, value):
        self.set(key, value)

    cdef object _remove(self, key):
        self.version += 1
        val = _delete(self._owned_root(), key, self.owner, self.io)
        self.count -= 1
        self.root = _shrunk_root(<_Node>self.root, self.io)
        return val

    def __delitem__(self, key):
        self.delete(key)

    def delete(self, key):
        """Remove key; KeyError if absent."""
        _check_key(key)
        if self.count == 0 or _find(self._root(), key, self.io) is _MISSING:
            raise KeyError(key)
        self._remove(key)

    def discard(self, key):
        """Remove key if present."""
        _check_key(key)
        if self.count and _find(self._root(), key, self.io) is not _MISSING:
            self._remove(key)

    def pop(self, key, default=_MISSING):
        """Remove key and return its value (default, or KeyError, when absent)."""
        _check_key(key)
        if self.count == 0 or _find(self._root(), key, self.io) is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return self._remove(key)

    def update(self, other=(), **kwargs):
        """Set every pair of a mapping (or an iterable of pairs), then of kwargs."""
        if isinstance(other, (_Base, collections.abc.Mapping)):
            other = other.items()
        elif hasattr(other, "keys"):
            other = [(k, other[k]) for k in other.keys()]
        for k, v in other:
            self.set(k, v)
        for k, v in kwargs.items():
            self.set(k, v)

    def setdefault(self, key, default=None):
        """The value of key, first setting it to default when absent."""
        v = self.get(key, _MISSING)
        if v is _MISSING:
            self.set(key, default)
            return default
        return v

    def popitem(self, last=True):
        """Remove and return the (key, value) pair with the largest (last=False: smallest) key."""
        if self.count == 0:
            raise KeyError("popitem(): SortedMapMutation is empty")
        k, v = self.peekitem(-1 if last else 0)
        self._remove(k)
        return k, v

    def clear(self):
        """Remove every entry."""
        self.version += 1
        self.root = None
        self.count = 0

    def finish(self):
        """An immutable snapshot of the current content; later edits never touch it."""
        cdef SortedMap snap = _new_map(self.root, self.count, self.io)
        snap.root_level = self.root_level
        self.owner = object()
        return snap

    def _check(self):
        _Base._check(self, self.owner)


collections.abc.Mapping.register(SortedMap)
collections.abc.MutableMapping.register(SortedMapMutation)
