"""Persistent vector: a counted B-tree of leaf arrays, plus a tail buffer (pb.List's kernel).

Why this structure
------------------
pb.List needs what Python's list gives (index, assign, append, pop) *and* what a list
cannot give cheaply: old versions that never change, O(log n) slices and concatenation,
and nodes that can be written to a log file and loaded back one at a time. A Clojure-style
bit-partitioned trie is fast for index and append, but inserting or deleting in the
middle, slicing and concatenating all cost O(n) there (or need the RRB relaxation). A
*counted B-tree* (a rope whose leaves are small arrays) gives every operation in O(log n):
each branch records how many items lie under each child, so finding index i is a descent
that subtracts counts, and split/join are the classic B-tree algorithms.

Layout
------
::

        Vector: root ─────────────────────────┐                tail (a loose leaf)
                                              ▼               ┌────────────────┐
                         Branch  cum = [64, 128, 160]         │ x x x x x      │
                         children   │     │     │             └────────────────┘
                    ┌───────────────┘     │     └──────────┐
                    ▼                     ▼                ▼
               Leaf [64 items]      Leaf [64 items]   Leaf [32 items]

* ``_Leaf.items``: a Python list of LEAF_MIN..LEAF_MAX items (0..LEAF_MAX in a root leaf).
* ``_Branch.children`` (BRANCH_MIN..BRANCH_MAX nodes, 2..BRANCH_MAX in the root) and the C array
  ``cum``: ``cum[j]`` = items under ``children[0..j]``. Index lookup is a binary search of
  ``cum``; an insert adds one to the entries right of the path.
* Every leaf sits at the same depth, ``height`` levels below the root (0: the root is a leaf).
* The **tail** is a leaf of 0..LEAF_MAX items kept beside the tree, holding the last items.
  ``append`` writes into it (amortized O(1): a list append), and a full tail joins the tree
  as one full leaf, so an append-only vector has completely full leaves. ``pop()`` takes from
  the tail, and when it is empty pulls the tree's last leaf out as the new tail.
* Each node carries ``owner`` (a token) and ``ptr`` (its atom pointer once persisted, -1
  before). A mutation edits in place exactly the nodes whose owner is its token and that
  were never persisted; any other node is copied once on the path (path copying) and the
  copy is owned. ``finish()`` hands out the tree and takes a fresh token, so the snapshot's
  nodes are never edited again. The functional methods of ``Vector`` run the same in-place
  code under a token used once.

Invariants (``_check()`` asserts them all)
------------------------------------------
1. Branch ``cum`` is the running sum of the true item counts of its children; ``n ==
   len(children)``; the root's total plus the tail length is ``len()``.
2. Fill: non-root leaves LEAF_MIN..LEAF_MAX items, non-root branches BRANCH_MIN..BRANCH_MAX
   children, a root branch >= 2 children, a root leaf 0..LEAF_MAX, the tail 0..LEAF_MAX.
3. All leaves at depth ``height``; an empty tree is an empty root leaf at height 0.
4. A node owned by a live mutation's token has ``ptr < 0``; a persisted node is never edited.

Algorithms
----------
* join(A, B), heights hA >= hB: walk down A's right spine to height hB and put B's root
  beside the spine node there; when either of the two is underfull (only a root can be),
  their entries are merged into one node, or two halves when they exceed the maximum.
  An overflowing parent splits in halves, up to a new root. Mirror image when hA < hB.
  Cost O(|hA - hB| + 1) node copies.
* split(T, i): descend to index i; at each level the children left of the path form a
  tree (a branch, or a lone child, or nothing) and so do those right of it; the left tree
  is the join of the left parts from the top down, the right likewise. The joins telescope
  to O(log n). ``v[a:b]`` is two splits; ``del m[a:b]`` two splits and a join.
* insert/delete descend once; an overflowing node splits in halves (each >= MIN), an
  underfull child is merged with or rebalanced against a sibling.

Complexity (n items, B = 64): index, assign, insert, delete, slice, concatenation:
O(log_B n) node visits, each O(B); append and pop at the end amortized O(1) (a list
operation on the tail, plus one O(log n) tree step per B items); len O(1); iteration
O(n), leaf by leaf (the items of each leaf go through a C list iterator). A slice with a
step other than 1 is O(n). Reading a slice from a mutation snapshots it (fresh token), so
its next edits copy their paths once more.

Persistence
-----------
``_persist(io)`` writes, children first, each node with ``ptr < 0`` as ``io.encode(...)``
of a plain list, then a header atom, and returns the header's pointer::

    leaf    [1, [item, ...]]
    branch  [2, [count_0, ..., count_k], [ptr_0, ..., ptr_k]]     per-child item counts
    header  ["pvec", tree_count, height, root_ptr, tail_count, tail_ptr]

``Vector._load(ptr, io)`` reads the header only. Root, tail and branch children stay int
pointers until first touched; then the node is read, checked against what its parent says
(kind for its height, item count, fill bounds) and stored in the slot. A node that fails
those checks raises ``CorruptionError(offset=ptr)``.
"""
from itertools import chain

from protobase.errors import CorruptionError

from libc.string cimport memmove, memcpy

cdef extern from *:
    const char *PB_SOURCE_DIGEST

__source_digest__ = PB_SOURCE_DIGEST.decode("ascii")

__all__ = ["Vector", "VectorMutation"]

cdef str _HEADER_TAG = "pvec"
cdef int _KIND_LEAF = 1
cdef int _KIND_BRANCH = 2
cdef Py_ssize_t _MAX_HEIGHT = 48
cdef object _MAX_COUNT = 2 ** 62


cdef class _Node:
    pass


cdef class _Leaf(_Node):
    pass


cdef class _Branch(_Node):
    pass


# ---------------------------------------------------------------------------------------
# Node helpers. `tok` is the editing token; `io` resolves lazily loaded children.

cdef inline _Leaf _new_leaf(list items, object tok):
    cdef _Leaf leaf = _Leaf.__new__(_Leaf)
    leaf.owner = tok
    leaf.ptr = -1
    leaf.items = items
    return leaf


cdef inline _Branch _new_branch(object tok):
    cdef _Branch b = _Branch.__new__(_Branch)
    b.owner = tok
    b.ptr = -1
    b.children = []
    b.n = 0
    return b


cdef inline Py_ssize_t _size(_Node node, int h):
    if h == 0:
        return len((<_Leaf>node).items)
    return (<_Branch>node).cum[(<_Branch>node).n - 1]


cdef inline Py_ssize_t _entries(_Node node, int h):
    if h == 0:
        return len((<_Leaf>node).items)
    return (<_Branch>node).n


cdef inline Py_ssize_t _child_size(_Branch b, Py_ssize_t j):
    return b.cum[j] - (b.cum[j - 1] if j else 0)


cdef inline Py_ssize_t _find(_Branch b, Py_ssize_t i) noexcept:
    # First child j with cum[j] > i (given i < cum[n - 1]). The answer stays in
    # [base, base + size); the loop body has no data-dependent branch (a cmov), because
    # a mispredicted branch per level cost more than the search itself.
    cdef Py_ssize_t base = 0, size = b.n, half
    while size > 1:
        half = size >> 1
        base = base + half if b.cum[base + half - 1] <= i else base
        size -= half
    return base


cdef int _br_push(_Branch b, object child, Py_ssize_t size) except -1:
    b.children.append(child)
    b.cum[b.n] = (b.cum[b.n - 1] if b.n else 0) + size
    b.n += 1
    return 0


cdef int _br_splice(_Branch b, Py_ssize_t lo, Py_ssize_t hi, list nodes, int ch) except -1:
    # Replace children[lo:hi] by the (loaded) nodes, keeping cum exact; n may reach MAX + 1.
    cdef Py_ssize_t k = len(nodes), rest = b.n - hi, t, s
    cdef Py_ssize_t base = b.cum[lo - 1] if lo else 0
    cdef Py_ssize_t old_end = b.cum[hi - 1] if hi else base
    if rest:
        memmove(&b.cum[lo + k], &b.cum[hi], rest * sizeof(Py_ssize_t))
    s = base
    for t in range(k):
        s += _size(<_Node>nodes[t], ch)
        b.cum[lo + t] = s
    for t in range(lo + k, lo + k + rest):
        b.cum[t] += s - old_end
    b.children[lo:hi] = nodes
    b.n = lo + k + rest
    return 0


cdef _Node _copy(_Node node, int h, object tok):
    cdef _Branch b, c
    if h == 0:
        return _new_leaf((<_Leaf>node).items[:], tok)
    b = <_Branch>node
    c = _new_branch(tok)
    c.children = b.children[:]
    c.n = b.n
    memcpy(c.cum, b.cum, b.n * sizeof(Py_ssize_t))
    return c


cdef inline _Node _own(_Node node, int h, object tok):
    if node.owner is tok and node.ptr < 0:
        return node
    return _copy(node, h, tok)


cdef inline _Node _child(_Branch b, Py_ssize_t j, int ch, object io):
    cdef object c = b.children[j]
    if type(c) is not int:   # a slot holds a node or, until first touched, an int pointer
        return <_Node>c
    return _load_child(b, j, ch, io)


cdef _Node _load_child(_Branch b, Py_ssize_t j, int ch, object io):
    cdef _Node node = _load_node(io, b.children[j], ch, _child_size(b, j), False)
    b.children[j] = node   # benign write: the logical content is unchanged
    return node


cdef inline _Node _own_child(_Branch b, Py_ssize_t j, int ch, object tok, object io):
    # b is owned by tok
    cdef _Node node = _child(b, j, ch, io)
    if node.owner is not tok or node.ptr >= 0:
        node = _copy(node, ch, tok)
        b.children[j] = node
    return node


cdef _Branch _split_branch(_Branch b, object tok):
    # b has MAX + 1 children: keep the left half, return the right half (both >= MIN)
    cdef Py_ssize_t half = b.n // 2, t, base = b.cum[half - 1]
    cdef _Branch r = _new_branch(tok)
    r.children = b.children[half:]
    r.n = b.n - half
    for t in range(r.n):
        r.cum[t] = b.cum[half + t] - base
    del b.children[half:]
    b.n = half
    return r


cdef _Branch _build_branch(list children, Py_ssize_t *sizes, Py_ssize_t lo, Py_ssize_t hi, object tok):
    cdef _Branch b = _new_branch(tok)
    cdef Py_ssize_t t, s = 0
    b.children = children[lo:hi]
    b.n = hi - lo
    for t in range(lo, hi):
        s += sizes[t]
        b.cum[t - lo] = s
    return b


cdef tuple _pair(_Node a, _Node b, int h, object tok):
    """Two adjacent nodes of height h as (x, y): themselves when both are full enough,
    else their entries merged into one node (y None) or two balanced halves."""
    cdef Py_ssize_t mn = LEAF_MIN if h == 0 else BRANCH_MIN
    cdef Py_ssize_t mx = LEAF_MAX if h == 0 else BRANCH_MAX
    cdef Py_ssize_t ea = _entries(a, h), eb = _entries(b, h), total = ea + eb, t, half
    cdef Py_ssize_t sizes[2 * BRANCH_MAX + 2]
    cdef list items, children
    cdef _Branch ba, bb
    if ea >= mn and eb >= mn:
        return a, b
    half = total // 2
    if h == 0:
        items = (<_Leaf>a).items + (<_Leaf>b).items
        if total <= mx:
            return _new_leaf(items, tok), None
        return _new_leaf(items[:half], tok), _new_leaf(items[half:], tok)
    ba = <_Branch>a
    bb = <_Branch>b
    children = ba.children + bb.children
    for t in range(ea):
        sizes[t] = _child_size(ba, t)
    for t in range(eb):
        sizes[ea + t] = _child_size(bb, t)
    if total <= mx:
        return _build_branch(children, sizes, 0, total, tok), None
    return (_build_branch(children, sizes, 0, half, tok),
            _build_branch(children, sizes, half, total, tok))


cdef tuple _join_right(_Node a, int ha, _Node b, int hb, object tok, object io):
    # ha >= hb: b goes to the right end of a; returns (x, y) at height ha
    cdef _Branch br
    cdef Py_ssize_t j
    if ha == hb:
        return _pair(a, b, ha, tok)
    br = <_Branch>_own(a, ha, tok)
    j = br.n - 1
    x, y = _join_right(_child(br, j, ha - 1, io), ha - 1, b, hb, tok, io)
    _br_splice(br, j, j + 1, [x] if y is None else [x, y], ha - 1)
    if br.n > BRANCH_MAX:
        return br, _split_branch(br, tok)
    return br, None


cdef tuple _join_left(_Node a, int ha, _Node b, int hb, object tok, object io):
    # ha <= hb: a goes to the left end of b; returns (x, y) at height hb
    cdef _Branch br
    if ha == hb:
        return _pair(a, b, hb, tok)
    br = <_Branch>_own(b, hb, tok)
    x, y = _join_left(a, ha, _child(br, 0, hb - 1, io), hb - 1, tok, io)
    _br_splice(br, 0, 1, [x] if y is None else [x, y], hb - 1)
    if br.n > BRANCH_MAX:
        return br, _split_branch(br, tok)
    return br, None


cdef tuple _join(_Node a, int ha, _Node b, int hb, object tok, object io):
    """The tree of a's items followed by b's, as (root, height)."""
    cdef _Branch root
    cdef int h
    if _size(b, hb) == 0:
        return a, ha
    if _size(a, ha) == 0:
        return b, hb
    if ha >= hb:
        x, y = _join_right(a, ha, b, hb, tok, io)
        h = ha
    else:
        x, y = _join_left(a, ha, b, hb, tok, io)
        h = hb
    if y is None:
        return x, h
    root = _new_branch(tok)
    _br_push(root, x, _size(<_Node>x, h))
    _br_push(root, y, _size(<_Node>y, h))
    return root, h + 1


cdef tuple _part(_Branch b, Py_ssize_t lo, Py_ssize_t hi, int h, object tok, object io):
    # children[lo:hi] of b (height h) as a tree (root, height)
    cdef Py_ssize_t t
    cdef _Branch p
    if hi <= lo:
        return _new_leaf([], tok), 0
    if hi - lo == 1:
        return _child(b, lo, h - 1, io), h - 1
    p = _new_branch(tok)
    p.children = b.children[lo:hi]
    p.n = hi - lo
    for t in range(lo, hi):
        p.cum[t - lo] = b.cum[t] - (b.cum[lo - 1] if lo else 0)
    return p, h


cdef tuple _split(_Node node, int h, Py_ssize_t i, object tok, object io):
    """(left_root, left_height, right_root, right_height): items [0, i) and [i, n)."""
    cdef Py_ssize_t size = _size(node, h), j, off
    cdef list items
    cdef _Branch b
    if i <= 0:
        return _new_leaf([], tok), 0, node, h
    if i >= size:
        return node, h, _new_leaf([], tok), 0
    if h == 0:
        items = (<_Leaf>node).items
        return _new_leaf(items[:i], tok), 0, _new_leaf(items[i:], tok), 0
    b = <_Branch>node
    j = _find(b, i)
    off = b.cum[j - 1] if j else 0
    cl, clh, cr, crh = _split(_child(b, j, h - 1, io), h - 1, i - off, tok, io)
    lp, lph = _part(b, 0, j, h, tok, io)
    rp, rph = _part(b, j + 1, b.n, h, tok, io)
    left, lh = _join(lp, lph, cl, clh, tok, io)
    right, rh = _join(cr, crh, rp, rph, tok, io)
    return left, lh, right, rh


cdef object _tree_insert(_Node node, int h, Py_ssize_t i, object x, object tok, object io):
    # node is owned by tok; returns the new right sibling when node split, else None
    cdef _Leaf leaf
    cdef _Branch b
    cdef Py_ssize_t j, off, k
    cdef _Node c
    if h == 0:
        leaf = <_Leaf>node
        leaf.items.insert(i, x)
        if len(leaf.items) > LEAF_MAX:
            k = len(leaf.items) // 2
            right = _new_leaf(leaf.items[k:], tok)
            del leaf.items[k:]
            return right
        return None
    b = <_Branch>node
    j = _find(b, i) if i < b.cum[b.n - 1] else b.n - 1
    off = b.cum[j - 1] if j else 0
    c = _own_child(b, j, h - 1, tok, io)
    extra = _tree_insert(c, h - 1, i - off, x, tok, io)
    if extra is None:
        for k in range(j, b.n):
            b.cum[k] += 1
        return None
    _br_splice(b, j, j + 1, [c, extra], h - 1)
    if b.n > BRANCH_MAX:
        return _split_branch(b, tok)
    return None


cdef object _tree_delete(_Node node, int h, Py_ssize_t i, object tok, object io):
    # node is owned by tok; removes and returns item i, leaving node possibly underfull
    cdef _Branch b
    cdef Py_ssize_t j, off, k
    cdef _Node c
    if h == 0:
        return (<_Leaf>node).items.pop(i)
    b = <_Branch>node
    j = _find(b, i)
    off = b.cum[j - 1] if j else 0
    c = _own_child(b, j, h - 1, tok, io)
    item = _tree_delete(c, h - 1, i - off, tok, io)
    for k in range(j, b.n):
        b.cum[k] -= 1
    if _entries(c, h - 1) < (LEAF_MIN if h == 1 else BRANCH_MIN):
        k = j - 1 if j else j
        x, y = _pair(_child(b, k, h - 1, io), _child(b, k + 1, h - 1, io), h - 1, tok)
        _br_splice(b, k, k + 2, [x] if y is None else [x, y], h - 1)
    return item


cdef object _append_leaf(_Branch b, int h, _Leaf leaf, object tok, object io):
    # b (owned, height h >= 1) is on the right spine: add leaf (>= LEAF_MIN items) as the
    # last leaf under it; returns b's new right sibling when b split, else None.
    cdef Py_ssize_t j
    cdef _Node c
    if h > 1:
        j = b.n - 1
        c = _own_child(b, j, h - 1, tok, io)
        extra = _append_leaf(<_Branch>c, h - 1, leaf, tok, io)
        b.cum[j] = (b.cum[j - 1] if j else 0) + _size(c, h - 1)
        if extra is None:
            return None
        _br_push(b, extra, _size(<_Node>extra, h - 1))
    else:
        _br_push(b, leaf, len(leaf.items))
    if b.n > BRANCH_MAX:
        return _split_branch(b, tok)
    return None


cdef _Leaf _remove_last_leaf(_Branch b, int h, object tok, object io):
    # b (owned, height h >= 1) is on the right spine: detach and return its last leaf,
    # merging an underfull last child with its left sibling on the way back up.
    cdef Py_ssize_t j = b.n - 1
    cdef _Node c
    cdef _Leaf leaf
    if h == 1:
        leaf = <_Leaf>_child(b, j, 0, io)
        del b.children[j]
        b.n = j
        return leaf
    c = _own_child(b, j, h - 1, tok, io)
    leaf = _remove_last_leaf(<_Branch>c, h - 1, tok, io)
    b.cum[j] -= len(leaf.items)
    if (<_Branch>c).n < BRANCH_MIN:
        x, y = _pair(_child(b, j - 1, h - 1, io), c, h - 1, tok)
        _br_splice(b, j - 1, j + 1, [x] if y is None else [x, y], h - 1)
    return leaf


cdef tuple _build_tree(list items, Py_ssize_t n, object tok):
    """A tree of items[:n] (root, height): leaves filled evenly, every node within bounds."""
    cdef Py_ssize_t k, q, r, t, pos, m
    cdef list level, nxt
    cdef Py_ssize_t *sizes
    cdef int h = 0
    cdef _Branch b
    if n <= LEAF_MAX:
        return _new_leaf(items[:n], tok), 0
    k = (n + LEAF_MAX - 1) // LEAF_MAX
    q, r = n // k, n % k
    level = []
    pos = 0
    for t in range(k):
        m = q + (1 if t < r else 0)
        level.append(_new_leaf(items[pos:pos + m], tok))
        pos += m
    while len(level) > 1:
        n = len(level)
        k = (n + BRANCH_MAX - 1) // BRANCH_MAX
        q, r = n // k, n % k
        nxt = []
        pos = 0
        for t in range(k):
            m = q + (1 if t < r else 0)
            b = _new_branch(tok)
            for node in level[pos:pos + m]:
                _br_push(b, node, _size(<_Node>node, h))
            nxt.append(b)
            pos += m
        level = nxt
        h += 1
    return level[0], h


# ---------------------------------------------------------------------------------------
# Persistence

cdef Py_ssize_t _persist_node(_Node node, int h, object io) except -2:
    cdef _Branch b
    cdef Py_ssize_t j
    cdef list counts, ptrs
    if node.ptr >= 0:
        return node.ptr
    if h == 0:
        data = io.encode([_KIND_LEAF, (<_Leaf>node).items])
    else:
        b = <_Branch>node
        counts = []
        ptrs = []
        for j in range(b.n):
            c = b.children[j]
            ptrs.append(_persist_node(<_Node>c, h - 1, io) if isinstance(c, _Node) else c)
            counts.append(_child_size(b, j))
        data = io.encode([_KIND_BRANCH, counts, ptrs])
    ptr = io.write_atom(data)
    node.ptr = ptr
    return node.ptr


cdef _corrupt(object ptr, str what):
    return CorruptionError(f"damaged persistent vector node at offset {ptr}: {what}; "
                           "run `protobase check` and restore from a backup", offset=ptr)


cdef bint _is_count(object x):
    # a count or pointer read from the file: a plain int that fits comfortably in Py_ssize_t
    return type(x) is int and 0 <= x <= _MAX_COUNT


cdef _Node _load_node(object io, object ptr, int h, Py_ssize_t expected, bint is_root):
    """Read the node at ptr, which its parent says has height h and `expected` items."""
    cdef _Branch b
    cdef Py_ssize_t m, t, total = 0
    if io is None:
        raise RuntimeError("a lazily loaded vector node was touched without an atom I/O")
    raw = io.read_atom(ptr)
    try:
        data = io.decode(raw)
    except CorruptionError:
        raise
    except Exception as exc:
        raise _corrupt(ptr, f"cannot decode ({exc})") from exc
    if not isinstance(data, (list, tuple)) or not data or type(data[0]) is not int:
        raise _corrupt(ptr, "not a node")
    if h == 0:
        if len(data) != 2 or data[0] != _KIND_LEAF or not isinstance(data[1], (list, tuple)):
            raise _corrupt(ptr, "expected a leaf")
        m = len(data[1])
        if m != expected:
            raise _corrupt(ptr, f"leaf holds {m} items, its parent counts {expected}")
        if m > LEAF_MAX or (not is_root and m < LEAF_MIN):
            raise _corrupt(ptr, f"leaf fill {m} out of bounds")
        leaf = _new_leaf(list(data[1]), None)
        leaf.ptr = ptr
        return leaf
    if (len(data) != 3 or data[0] != _KIND_BRANCH or not isinstance(data[1], (list, tuple))
            or not isinstance(data[2], (list, tuple)) or len(data[1]) != len(data[2])):
        raise _corrupt(ptr, "expected a branch")
    m = len(data[1])
    if m > BRANCH_MAX or m < (2 if is_root else BRANCH_MIN):
        raise _corrupt(ptr, f"branch fill {m} out of bounds")
    b = _new_branch(None)
    b.ptr = ptr
    for t in range(m):
        count = data[1][t]
        child = data[2][t]
        if not _is_count(count) or count == 0 or count > expected or not _is_count(child):
            raise _corrupt(ptr, "bad child count or pointer")
        total += <Py_ssize_t>count
        b.cum[t] = total
    if total != expected:
        raise _corrupt(ptr, f"branch holds {total} items, its parent counts {expected}")
    b.children = list(data[2])
    b.n = m
    return b


cdef _Node _detached(_Node node, int h, object io):
    # A fresh copy of a whole subtree, every child loaded and no node persisted: its
    # pointers belong to another atom I/O and mean nothing to ours.
    cdef _Branch b, c
    cdef Py_ssize_t j
    if h == 0:
        return _new_leaf((<_Leaf>node).items[:], None)
    b = <_Branch>node
    c = <_Branch>_copy(b, h, None)
    for j in range(b.n):
        c.children[j] = _detached(_child(b, j, h - 1, io), h - 1, io)
    return c


cdef int _require(bint ok, str what) except -1:
    # _check() must raise even in release builds, where Cython drops `assert`
    if not ok:
        raise AssertionError(what)
    return 0


cdef Py_ssize_t _check_node(_Node node, int h, bint is_root, object io, object tok) except -1:
    cdef _Branch b
    cdef Py_ssize_t j, m, prev = 0
    if tok is not None and node.owner is tok:
        _require(node.ptr < 0, "a node owned by a live mutation was persisted")
    if h == 0:
        _require(type(node) is _Leaf, "a branch where a leaf belongs")
        m = len((<_Leaf>node).items)
        _require(m <= LEAF_MAX, f"leaf overfull: {m}")
        _require(is_root or m >= LEAF_MIN, f"leaf underfull: {m}")
        return m
    _require(type(node) is _Branch, "a leaf above the leaf level")
    b = <_Branch>node
    _require(b.n == len(b.children), "branch n differs from its child list")
    _require(b.n <= BRANCH_MAX, f"branch overfull: {b.n}")
    _require(b.n >= (2 if is_root else BRANCH_MIN), f"branch underfull: {b.n}")
    for j in range(b.n):
        m = _check_node(_child(b, j, h - 1, io), h - 1, False, io, tok)
        _require(b.cum[j] - prev == m, f"count of child {j}: {b.cum[j] - prev} recorded, {m} held")
        prev = b.cum[j]
    return prev


# ---------------------------------------------------------------------------------------
# The shared body of Vector and VectorMutation: every edit runs in place under a token.

cdef inline Py_ssize_t _norm(Py_ssize_t i, Py_ssize_t n) except -1:
    if i < 0:
        i += n
    if i < 0 or i >= n:
        raise IndexError("vector index out of range")
    return i


cdef class _VectorBase:

    cdef _Node _rootnode(self):
        if type(self._root) is int:
            self._root = _load_node(self._io, self._root, self._height, self._tcount, True)
        return <_Node>self._root

    cdef _Leaf _tailnode(self):
        if type(self._tail) is int:
            self._tail = _load_node(self._io, self._tail, 0, self._tlen, True)
        return <_Leaf>self._tail

    cdef object _get(self, Py_ssize_t i):
        cdef _Node node
        cdef _Branch b
        cdef Py_ssize_t j
        cdef int h = self._height
        if i >= self._tcount:
            return self._tailnode().items[i - self._tcount]
        node = self._rootnode()
        while h > 0:
            b = <_Branch>node
            j = _find(b, i)
            if j:
                i -= b.cum[j - 1]
            h -= 1
            node = _child(b, j, h, self._io)
        return (<_Leaf>node).items[i]

    cdef int _set(self, Py_ssize_t i, object x, object tok) except -1:
        cdef _Node node
        cdef _Branch b
        cdef Py_ssize_t j
        cdef int h = self._height
        if i >= self._tcount:
            self._tail = _own(self._tailnode(), 0, tok)
            (<_Leaf>self._tail).items[i - self._tcount] = x
            return 0
        node = _own(self._rootnode(), h, tok)
        self._root = node
        while h > 0:
            b = <_Branch>node
            j = _find(b, i)
            if j:
                i -= b.cum[j - 1]
            h -= 1
            node = _own_child(b, j, h, tok, self._io)
        (<_Leaf>node).items[i] = x
        return 0

    cdef int _append(self, object x, object tok) except -1:
        cdef _Leaf tail = self._tailnode()
        if self._tlen >= LEAF_MAX:
            self._push_leaf(tail, tok)
            self._tail = _new_leaf([x], tok)
            self._tlen = 1
            return 0
        if tail.owner is not tok or tail.ptr >= 0:
            tail = _copy(tail, 0, tok)
            self._tail = tail
        tail.items.append(x)
        self._tlen += 1
        return 0

    cdef int _insert(self, Py_ssize_t i, object x, object tok) except -1:
        # 0 <= i <= len
        cdef _Leaf tail
        cdef _Node root
        if i >= self._tcount:
            tail = <_Leaf>_own(self._tailnode(), 0, tok)
            tail.items.insert(i - self._tcount, x)
            self._tlen += 1
            if self._tlen > LEAF_MAX:
                self._push_leaf(_new_leaf(tail.items[:LEAF_MAX], tok), tok)
                del tail.items[:LEAF_MAX]
                self._tlen -= LEAF_MAX
            self._tail = tail
            return 0
        root = _own(self._rootnode(), self._height, tok)
        extra = _tree_insert(root, self._height, i, x, tok, self._io)
        if extra is not None:
            top = _new_branch(tok)
            _br_push(top, root, _size(root, self._height))
            _br_push(top, extra, _size(<_Node>extra, self._height))
            root = top
            self._height += 1
        self._root = root
        self._tcount += 1
        return 0

    cdef object _delete(self, Py_ssize_t i, object tok):
        # 0 <= i < len
        cdef _Leaf tail
        cdef _Node root
        if i >= self._tcount:
            tail = <_Leaf>_own(self._tailnode(), 0, tok)
            self._tail = tail
            self._tlen -= 1
            return tail.items.pop(i - self._tcount)
        root = _own(self._rootnode(), self._height, tok)
        item = _tree_delete(root, self._height, i, tok, self._io)
        while self._height > 0 and (<_Branch>root).n == 1:
            root = _child(<_Branch>root, 0, self._height - 1, self._io)
            self._height -= 1
        self._root = root
        self._tcount -= 1
        return item

    cdef int _push_leaf(self, _Leaf leaf, object tok) except -1:
        # leaf has >= LEAF_MIN items
        cdef _Node root
        cdef Py_ssize_t m = len(leaf.items)
        if self._height == 0:   # the root leaf may be underfull: a general join
            self._root, self._height = _join(self._rootnode(), 0, leaf, 0, tok, self._io)
        else:
            root = _own(self._rootnode(), self._height, tok)
            extra = _append_leaf(<_Branch>root, self._height, leaf, tok, self._io)
            if extra is not None:
                top = _new_branch(tok)
                _br_push(top, root, _size(root, self._height))
                _br_push(top, extra, _size(<_Node>extra, self._height))
                root = top
                self._height += 1
            self._root = root
        self._tcount += m
        return 0

    cdef int _pull_tail(self, object tok) except -1:
        # The tail is empty: make the tree's last leaf the tail (O(log n), once per leaf).
        cdef _Node root
        if self._height == 0:
            self._tail = self._rootnode()
            self._root = _new_leaf([], tok)
        else:
            root = _own(self._rootnode(), self._height, tok)
            self._tail = _remove_last_leaf(<_Branch>root, self._height, tok, self._io)
            while self._height > 0 and (<_Branch>root).n == 1:
                root = _child(<_Branch>root, 0, self._height - 1, self._io)
                self._height -= 1
            self._root = root
        self._tlen = len((<_Leaf>self._tail).items)
        self._tcount -= self._tlen
        return 0

    cdef int _flush(self, object tok) except -1:
        # Move the tail into the tree, so that the whole vector is one tree.
        if self._tlen:
            root, h = _join(self._rootnode(), self._height, self._tailnode(), 0, tok, self._io)
            self._root = root
            self._height = h
            self._tcount += self._tlen
            self._tail = _new_leaf([], tok)
            self._tlen = 0
        return 0

    cdef int _join_with(self, _VectorBase other, object tok) except -1:
        # Append other's items (other is frozen: a Vector); O(log n).
        cdef _VectorBase o = other
        if not (o._tcount + o._tlen):
            return 0
        if self._io is None:
            self._io = o._io
        elif o._io is not None and o._io is not self._io:
            o = (<Vector>other)._derive()
            o._root = _detached(o._rootnode(), o._height, o._io)
            o._tail = _detached(o._tailnode(), 0, o._io)
            o._io = None
        self._flush(tok)
        root, h = _join(self._rootnode(), self._height, o._rootnode(), o._height, tok, self._io)
        self._root = root
        self._height = h
        self._tcount += o._tcount
        if o._tlen:
            self._tail = o._tailnode()
            self._tlen = o._tlen
        return 0

    cdef int _keep_range(self, Py_ssize_t a, Py_ssize_t b, object tok) except -1:
        self._flush(tok)
        left, lh, right, rh = _split(self._rootnode(), self._height, b, tok, self._io)
        left, lh, right, rh = _split(left, lh, a, tok, self._io)
        self._root = right
        self._height = rh
        self._tcount = b - a
        return 0

    cdef int _replace_range(self, Py_ssize_t a, Py_ssize_t b, list items, object tok) except -1:
        self._flush(tok)
        left, lh, rest, rsh = _split(self._rootnode(), self._height, b, tok, self._io)
        left, lh, gone, gh = _split(left, lh, a, tok, self._io)
        if items:
            mid, mh = _build_tree(items, len(items), tok)
            left, lh = _join(left, lh, mid, mh, tok, self._io)
        self._root, self._height = _join(left, lh, rest, rsh, tok, self._io)
        self._tcount += len(items) - (b - a)
        return 0

    # -- reading ---------------------------------------------------------------------------

    def __len__(self):
        return self._tcount + self._tlen

    def __bool__(self):
        return (self._tcount + self._tlen) > 0

    def _leaf_lists(self):
        """The item lists of the leaves, left to right (tail last)."""
        if self._tcount:
            yield from _leaves(self._rootnode(), self._height, self._io)
        if self._tlen:
            yield self._tailnode().items

    def _leaf_lists_reversed(self):
        if self._tlen:
            yield self._tailnode().items
        if self._tcount:
            yield from _leaves_reversed(self._rootnode(), self._height, self._io)

    def __iter__(self):
        return chain.from_iterable(self._leaf_lists())

    def __reversed__(self):
        return chain.from_iterable(map(reversed, self._leaf_lists_reversed()))

    def __contains__(self, x):
        for items in self._leaf_lists():
            if x in items:
                return True
        return False

    def count(self, x):
        """Number of items equal to x."""
        cdef Py_ssize_t total = 0
        for items in self._leaf_lists():
            total += items.count(x)
        return total

    def index(self, x, start=0, stop=None):
        """Index of the first item equal to x in [start, stop); ValueError if absent."""
        cdef Py_ssize_t n = self._tcount + self._tlen, lo, hi, off = 0, m
        lo, hi, _ = slice(start, stop).indices(n)
        for items in self._leaf_lists():
            m = len(items)
            if off + m > lo and off < hi:
                try:
                    return off + items.index(x, max(lo - off, 0), min(hi - off, m))
                except ValueError:
                    pass
            off += m
            if off >= hi:
                break
        raise ValueError(f"{x!r} is not in vector")

    def __eq__(self, other):
        cdef Py_ssize_t n = self._tcount + self._tlen, off = 0, m
        if isinstance(other, list):
            if len(other) != n:
                return False
            for items in self._leaf_lists():
                m = len(items)
                if items != other[off:off + m]:
                    return False
                off += m
            return True
        if isinstance(other, _VectorBase):
            if len(other) != n:
                return False
            for a, b in zip(self, other):
                if not (a is b or a == b):
                    return False
            return True
        return NotImplemented

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __repr__(self):
        cdef Py_ssize_t n = self._tcount + self._tlen
        head = [self._get(i) for i in range(min(n, 10))]
        body = ", ".join(map(repr, head)) + (f", ... ({n} items)" if n > 10 else "")
        return f"{type(self).__name__}([{body}])"

    def _check(self):
        """Walk the whole structure and raise AssertionError on any broken invariant."""
        tok = getattr(self, "_live_token", None)
        root = self._rootnode()
        tail = self._tailnode()
        _require(0 <= self._tlen <= LEAF_MAX, f"tail length {self._tlen}")
        _require(len(tail.items) == self._tlen, "tail length differs from its leaf")
        _check_node(tail, 0, True, self._io, tok)
        _require(_check_node(root, self._height, True, self._io, tok) == self._tcount,
                 "tree count differs from the root's")
        _require(self._tcount or self._height == 0, "an empty tree above height 0")


def _leaves(_Node node, int h, io):
    cdef Py_ssize_t j
    if h == 0:
        yield (<_Leaf>node).items
        return
    for j in range((<_Branch>node).n):
        yield from _leaves(_child(<_Branch>node, j, h - 1, io), h - 1, io)


def _leaves_reversed(_Node node, int h, io):
    cdef Py_ssize_t j
    if h == 0:
        yield (<_Leaf>node).items
        return
    for j in range((<_Branch>node).n - 1, -1, -1):
        yield from _leaves_reversed(_child(<_Branch>node, j, h - 1, io), h - 1, io)


cdef _init_from(_VectorBase v, object iterable, object tok):
    # items is only sliced, never kept: a caller's list is not aliased
    cdef list items = [] if iterable is None else _as_list(iterable)
    cdef Py_ssize_t n = len(items), keep = n - n % LEAF_MAX   # full leaves; the rest: tail
    if n <= LEAF_MAX:
        keep = 0
    v._root, v._height = _build_tree(items, keep, tok)
    v._tcount = keep
    v._tail = _new_leaf(items[keep:], tok)
    v._tlen = n - keep


cdef Vector _vector_of(_VectorBase src):
    cdef Vector v = Vector.__new__(Vector)
    v._root = src._root
    v._height = src._height
    v._tcount = src._tcount
    v._tail = src._tail
    v._tlen = src._tlen
    v._io = src._io
    return v


cdef Vector _slice_of(Vector v, object index):
    cdef Py_ssize_t n = v._tcount + v._tlen, a, b, step
    cdef Vector r
    a, b, step = index.indices(n)
    if step != 1:
        return Vector(list(v)[index])   # O(n), but at C speed: a k-step walk is rarely faster
    if b <= a:
        return Vector()
    if a == 0 and b == n:
        return v
    r = v._derive()
    r._keep_range(a, b, object())
    return r


cdef list _as_list(object value):
    return value if type(value) is list else list(value)


cdef class Vector(_VectorBase):
    """An immutable sequence; every "edit" returns a new Vector sharing all untouched nodes."""

    def __init__(self, iterable=None):
        _init_from(self, iterable, None)

    cdef Vector _derive(self):
        return _vector_of(self)

    @classmethod
    def _load(cls, ptr, io):
        """The vector whose header atom is at ptr; nodes load lazily through io."""
        cdef Vector v
        raw = io.read_atom(ptr)
        try:
            data = io.decode(raw)
        except CorruptionError:
            raise
        except Exception as exc:
            raise _corrupt(ptr, f"cannot decode the vector header ({exc})") from exc
        if (not isinstance(data, (list, tuple)) or len(data) != 6 or data[0] != _HEADER_TAG
                or not all(_is_count(x) for x in data[1:])):
            raise _corrupt(ptr, "not a vector header")
        if (data[2] > _MAX_HEIGHT or data[4] > LEAF_MAX
                or (data[1] == 0 and data[2] != 0)):
            raise _corrupt(ptr, "vector header out of bounds")
        v = Vector.__new__(Vector)
        v._tcount = data[1]
        v._height = data[2]
        v._root = data[3]
        v._tlen = data[4]
        v._tail = data[5]
        v._io = io
        return v

    def _persist(self, io):
        """Write every node not yet written (children first), then a header; its pointer."""
        cdef Py_ssize_t rptr, tptr
        rptr = self._root if not isinstance(self._root, _Node) else \
            _persist_node(<_Node>self._root, self._height, io)
        tptr = self._tail if not isinstance(self._tail, _Node) else \
            _persist_node(<_Node>self._tail, 0, io)
        return io.write_atom(io.encode([_HEADER_TAG, self._tcount, self._height, rptr,
                                        self._tlen, tptr]))

    def __getitem__(self, index):
        if type(index) is not int and isinstance(index, slice):
            return _slice_of(self, index)
        return self._get(_norm(index, self._tcount + self._tlen))

    def set(self, i, x):
        """A new vector with item i replaced by x."""
        cdef Vector v = self._derive()
        v._set(_norm(i, self._tcount + self._tlen), x, object())
        return v

    def append(self, x):
        cdef Vector v = self._derive()
        v._append(x, object())
        return v

    def insert(self, i, x):
        """A new vector with x inserted before index i (clamped like list.insert)."""
        cdef Py_ssize_t n = self._tcount + self._tlen, j = i
        cdef Vector v = self._derive()
        if j < 0:
            j = max(j + n, 0)
        v._insert(min(j, n), x, object())
        return v

    def delete(self, i):
        """A new vector without item i."""
        cdef Vector v = self._derive()
        v._delete(_norm(i, self._tcount + self._tlen), object())
        return v

    def pop(self, i=-1):
        """(new_vector, item): the vector without item i, and the item."""
        cdef Py_ssize_t n = self._tcount + self._tlen
        cdef Vector v
        if n == 0:
            raise IndexError("pop from empty vector")
        v = self._derive()
        return v, _pop(v, _norm(i, n), object())

    def extend(self, iterable):
        cdef Vector v = self._derive()
        _extend(v, _frozen(iterable), object())
        return v

    def __add__(self, other):
        if not isinstance(other, (_VectorBase, list)):
            return NotImplemented
        return self.extend(other)

    def __radd__(self, other):
        if not isinstance(other, list):
            return NotImplemented
        return Vector(other).extend(self)

    def mutate(self):
        """A VectorMutation starting from this vector, which it never changes."""
        cdef VectorMutation m = VectorMutation.__new__(VectorMutation)
        m._root = self._root
        m._height = self._height
        m._tcount = self._tcount
        m._tail = self._tail
        m._tlen = self._tlen
        m._io = self._io
        m._token = object()
        return m


cdef object _frozen(object x):
    return (<VectorMutation>x)._snapshot() if isinstance(x, VectorMutation) else x


cdef object _pop(_VectorBase v, Py_ssize_t i, object tok):
    if i == v._tcount + v._tlen - 1 and v._tlen == 0:
        v._pull_tail(tok)
    return v._delete(i, tok)


cdef int _extend(_VectorBase v, object iterable, object tok) except -1:
    # A VectorMutation argument must already be a snapshot (see _frozen): its token
    # changes when it is snapshotted, which must happen before `tok` is read.
    cdef list items
    if isinstance(iterable, Vector):
        v._join_with(<Vector>iterable, tok)
        return 0
    items = _as_list(iterable)
    if len(items) <= 2 * LEAF_MAX:
        for x in items:
            v._append(x, tok)
        return 0
    v._join_with(Vector(items), tok)
    return 0


cdef class VectorMutation(_VectorBase):
    """A vector edited in place like a list; finish() returns a Vector snapshot."""

    def __init__(self, iterable=None):
        self._token = object()
        _init_from(self, iterable, self._token)

    @property
    def _live_token(self):
        return self._token

    cdef Vector _snapshot(self):
        # The snapshot shares every node: take a fresh token so none is edited again.
        self._token = object()
        return _vector_of(self)

    def finish(self):
        """A Vector of the current contents; later edits here never change it."""
        return self._snapshot()

    def __getitem__(self, index):
        if type(index) is not int and isinstance(index, slice):
            return _slice_of(self._snapshot(), index)
        return self._get(_norm(index, self._tcount + self._tlen))

    def __setitem__(self, index, value):
        cdef Py_ssize_t n = self._tcount + self._tlen, a, b, step
        cdef list items
        if not isinstance(index, slice):
            self._set(_norm(index, n), value, self._token)
            return
        a, b, step = index.indices(n)
        items = list(value)
        if step == 1:
            self._replace_range(a, max(a, b), items, self._token)
            return
        positions = range(a, b, step)
        if len(items) != len(positions):
            raise ValueError(f"attempt to assign sequence of size {len(items)} "
                             f"to extended slice of size {len(positions)}")
        for pos, x in zip(positions, items):
            self._set(pos, x, self._token)

    def __delitem__(self, index):
        cdef Py_ssize_t n = self._tcount + self._tlen, a, b, step
        if not isinstance(index, slice):
            self._delete(_norm(index, n), self._token)
            return
        a, b, step = index.indices(n)
        if step == 1:
            if b > a:
                self._replace_range(a, b, [], self._token)
            return
        positions = range(a, b, step)
        if step > 0:
            positions = reversed(positions)
        for pos in positions:   # from the right, so the positions stay valid
            self._delete(pos, self._token)

    def append(self, x):
        self._append(x, self._token)

    def extend(self, iterable):
        iterable = _frozen(iterable)
        _extend(self, iterable, self._token)

    def __iadd__(self, other):
        other = _frozen(other)
        _extend(self, other, self._token)
        return self

    def insert(self, i, x):
        cdef Py_ssize_t n = self._tcount + self._tlen, j = i
        if j < 0:
            j = max(j + n, 0)
        self._insert(min(j, n), x, self._token)

    def pop(self, i=-1):
        cdef Py_ssize_t n = self._tcount + self._tlen
        if n == 0:
            raise IndexError("pop from empty vector")
        return _pop(self, _norm(i, n), self._token)

    def remove(self, x):
        self._delete(self.index(x), self._token)

    def clear(self):
        _init_from(self, None, self._token)
