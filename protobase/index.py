"""Secondary indexes: field value -> id set of the rows holding it, kept persistent.

An index on the field path ``"a.b"`` of a collection is three persistent parts:

* ``tree``: a ``btree.SortedMap`` from each field value that is a valid btree key to the
  ``IdSet`` of row ids whose entry holds that value at the path. Keys follow the btree's
  total order, so ``1``, ``1.0`` and ``True`` are one key (as in ``dict``) and a type
  class occupies one contiguous run of keys: ranges and prefixes are runs of positions.
* ``other``: the ``IdSet`` of rows whose value at the path exists but is not a valid key
  (a list, a dict, a set...). Such values have no place in an ordered tree; every plan
  that could match them (equality with a list operand) takes ``other`` as candidates and
  re-checks the rows, so they cost speed, never correctness.
* ``missing``: the ``IdSet`` of rows where the path does not exist. ``all_ids - missing``
  answers ``F.x.exists()`` and ``F.x != v`` without touching a row.

::

    Index("price")
      tree:    None -> {7}      9.5 -> {1, 4}      12 -> {2}      "n/a" -> {5}
      other:   {3}               (price == [1, 2])
      missing: {6}               (no price at all)

Every row id of the collection is in exactly one place: one posting of ``tree``,
``other``, or ``missing``. ``_check()`` verifies that, and with the entries at hand that
the index equals one rebuilt from scratch.

Maintenance API (called by the collection layer)
------------------------------------------------
``Index.empty(field)`` / ``Index.build(field, entries)`` where ``entries`` iterates
``(rowid, value)`` pairs (whole entry values; the index extracts its field) /
``Index.from_field_values(field, rowids, values)`` (fields already read: a collection
reads one field of each stored row without decoding the rest);
``index.mutate() -> IndexMutation`` with ``insert(rowid, value)``,
``delete(rowid, value)``, ``update(rowid, old_value, new_value)`` and ``finish() ->
Index``. A mutation keeps one ``IdSetMutation`` per touched posting until ``finish()``, so
a transaction adding 100k rows under one value edits that posting in place instead of
copying a container per row; ``finish()`` turns them back into ``IdSet``s and drops
emptied postings. After ``finish()`` the mutation stays usable (the kernels give it fresh
tokens) and never changes the snapshot it returned. Queries only ever read ``Index``
snapshots: a writing transaction hands them ``mutation.finish()``.

Stored collections are refused
--------------------------------
A pb.Set/pb.List/pb.Dict inside an entry is stored as a reference: the collection can
change without its entry being written, so nothing would re-file the row. A field value
that holds one (at any depth) is refused with ``QueryError`` by ``refuse_references``:
``_build`` asks it for every value that is not a plain key (so ``create_index`` refuses
such a field), and the collection layer asks it before any change a write makes. Queries
on such a field answer by scan.

Persistence: ``index.parts()`` is ``{"tree": SortedMap, "other": IdSet, "missing": IdSet}``,
three ordinary persistent structures the collection stores beside its data (the tree's
values are ``IdSet``s, which the codec hooks encode); ``Index.from_parts(field, parts)``
puts a loaded index back together.

Statistics for the planner
--------------------------
Exact: ``len`` of one posting (equality), ``len(missing)``. Ranges and prefixes are turned
into a run of tree positions ``[p0, p1)`` with ``bisect_left/right`` (a type class's run is
found by binary search over positions with ``peekitem``, O(log² n)). A run of at most
``SAMPLE`` keys is summed exactly; a longer one is estimated as (number of keys) × (mean
posting size over ``SAMPLE`` keys spread evenly across the run), each probe O(log n).
"""
from .errors import QueryError
from ._core import load
from .state import gc_paused
from .query.expr import (MISSING, extract, key_class, split_path, values_equal,
                         LT, LE, GT, GE, BETWEEN, STARTSWITH)

__all__ = ["Index", "IndexMutation", "IndexSpec", "MISSING", "extract", "SAMPLE",
           "UNION_CACHE", "refuse_references"]

_btree = load("btree")
_idset = load("idset")
SortedMap = _btree.SortedMap
IdSet = _idset.IdSet
IdSetMutation = _idset.IdSetMutation
_type_class = _btree.type_class
_HandleCore = load("handle").HandleCore
_dumps = load("codec").dumps

SAMPLE = 32
UNION_CACHE = 8          # span unions an Index keeps (see Index.span_ids)
_EMPTY = IdSet()
# Field value types that are always hashable keys (others go through key_class first).
_HASHABLE = frozenset((str, int, float, bool, bytes, type(None)))


class _Reference(Exception):
    def __init__(self, handle):
        self.handle = handle


def _flag_reference(obj):
    # Encoder ref_hook: asked about every value that is not a plain built-in, so it sees
    # each collection the codec would store by reference, inside any container or object.
    if isinstance(obj, _HandleCore):
        raise _Reference(obj)
    return None


def _reference_in(field_value):
    """The first stored collection (a pb collection handle) inside ``field_value``, or None."""
    t = type(field_value)
    if t in _HASHABLE or field_value is MISSING:
        return None
    if isinstance(field_value, _HandleCore):
        return field_value
    try:
        _dumps(field_value, ref_hook=_flag_reference)
    except _Reference as found:
        return found.handle
    except Exception:
        return None      # not encodable at all: the write itself says so
    return None


def refuse_references(field, field_value):
    """QueryError when ``field_value`` (the value at index path ``field``) holds a stored
    collection: an index over it would go stale when that collection changes."""
    if type(field_value) in _HASHABLE:
        return
    handle = _reference_in(field_value)
    if handle is not None:
        kind = type(handle).__name__
        raise QueryError(
            f"field {field!r} holds a pb.{kind}, which is stored by reference and can change "
            f"without its entry being written, so an index on {field!r} would go stale: it "
            f"cannot be indexed. Queries on {field!r} (contains, ==, ...) answer by scan "
            f"without an index; store a plain list/set copy in the field to index it")


class IndexSpec:
    """What an index covers: a field path (``"a.b"``: dict key or attribute, nested)."""

    __slots__ = ("field", "parts", "extract")

    def __init__(self, field):
        if isinstance(field, IndexSpec):
            field = field.field
        self.parts = parts = split_path(field)
        self.field = ".".join(parts)
        if len(parts) == 1:  # a top-level key of a dict entry: one dict lookup
            part = parts[0]
            self.extract = lambda value: value.get(part, MISSING) if type(value) is dict \
                else extract(value, parts)
        else:
            self.extract = lambda value: extract(value, parts)

    def __eq__(self, other):
        return isinstance(other, IndexSpec) and other.field == self.field

    def __hash__(self):
        return hash(self.field)

    def __repr__(self):
        return f"IndexSpec({self.field!r})"


_PLAIN_CLASS = {type(None): 0, bool: 1, int: 1, float: 1, str: 2, bytes: 3}


def _btree_sorted(keys):
    """Plain keys (None, non-NaN numbers, str, bytes) in btree order: by type class, then
    Python's own order, which the btree shares within each of these classes."""
    keys = list(keys)
    cls = _PLAIN_CLASS
    first = cls[type(keys[0])] if keys else None
    if first not in (None, 0) and all(cls[type(k)] == first for k in keys):
        keys.sort()
    else:
        keys.sort(key=lambda k: (cls[type(k)], k))
    return keys


def _same_place(a, b):
    # True when field values a and b file the row under the same posting.
    if a is MISSING or b is MISSING:
        return a is b
    ca, cb = key_class(a), key_class(b)
    if ca is None or cb is None:
        return ca is cb
    return values_equal(a, ca, b, cb)


class Index:
    """A persistent snapshot of one secondary index (see the module docstring)."""

    __slots__ = ("spec", "tree", "other", "missing", "_spans", "_unions")

    def __init__(self, field, tree=None, other=None, missing=None):
        self.spec = IndexSpec(field)
        self.tree = SortedMap() if tree is None else tree
        self.other = _EMPTY if other is None else other
        self.missing = _EMPTY if missing is None else missing
        self._spans = {}
        self._unions = {}

    @classmethod
    def empty(cls, field):
        return cls(field)

    @classmethod
    def build(cls, field, entries):
        """An index over ``entries``, an iterable of ``(rowid, value)`` (whole values)."""
        spec = IndexSpec(field)
        rowids, values = [], []
        for rowid, value in entries:
            rowids.append(rowid)
            values.append(spec.extract(value))
        return cls.from_field_values(field, rowids, values)

    @classmethod
    def from_field_values(cls, field, rowids, values):
        """An index over rows whose field values are already extracted: two lists of
        equal length, ``values[i]`` the field of row ``rowids[i]`` or MISSING.

        Built in bulk: row ids are grouped per field value in one C pass
        (``IdSet.group_values``: plain hashable values, whose dict equality is the
        tree's); the groups become IdSets in one C loop (``IdSet.from_groups``) and the
        tree is built bottom-up from the sorted keys (``SortedMap.from_sorted``), all
        with the cyclic GC paused (nothing built here is garbage). Only NaNs, other keys
        (dates, tuples...) and unorderable values go through the per-row mutation path."""
        with gc_paused:
            return cls._build(IndexSpec(field), rowids, values)

    bulk = gc_paused
    """``with Index.bulk:`` around work that feeds a build (reading every row's field,
    numbering rows): it allocates only objects that survive, so the cyclic GC is paused."""

    @classmethod
    def _build(cls, spec, rowids, values):
        groups, missing, odd = IdSet.group_values(rowids, values, MISSING)
        keys = _btree_sorted(groups)
        postings = IdSet.from_groups([groups[key] for key in keys])
        try:
            tree = SortedMap.from_sorted(keys, postings)
        except ValueError:
            # Two keys a dict keeps apart are one tree key: merge their postings.
            m = SortedMap().mutate()
            for key, posting in zip(keys, postings):
                prior = m.get(key)
                m[key] = posting if prior is None else prior | posting
            tree = m.finish()
        index = cls(spec, tree, _EMPTY, IdSet(missing) if missing else _EMPTY)
        if not odd:
            return index
        field = spec.field
        for _, fv in odd:
            refuse_references(field, fv)
        m = index.mutate()
        for rowid, fv in odd:
            m._target(fv).add(rowid)
        return m.finish()

    @classmethod
    def from_parts(cls, field, parts):
        """The index whose ``parts()`` were ``parts`` (e.g. loaded back from storage)."""
        return cls(field, parts["tree"], parts["other"], parts["missing"])

    def parts(self):
        """The persistent structures that make up this index, by name."""
        return {"tree": self.tree, "other": self.other, "missing": self.missing}

    @property
    def field(self):
        return self.spec.field

    def mutate(self):
        return IndexMutation(self)

    def __len__(self):
        """Number of distinct orderable values."""
        return len(self.tree)

    def __repr__(self):
        return (f"<Index {self.field!r}: {len(self.tree)} values, {len(self.other)} unorderable, "
                f"{len(self.missing)} missing>")

    def __eq__(self, other):
        if not isinstance(other, Index) or other.spec != self.spec:
            return NotImplemented
        if len(self.tree) != len(other.tree) or self.other != other.other \
                or self.missing != other.missing:
            return False
        for (k1, v1), (k2, v2) in zip(self.tree.items(), other.tree.items()):
            if _btree.compare(k1, k2) != 0 or v1 != v2:
                return False
        return True

    __hash__ = None

    # ------------------------------------------------------------------ lookups

    def lookup(self, value):
        """Ids of rows whose field equals the orderable ``value`` (empty if none)."""
        return self.tree.get(value, _EMPTY)

    def present(self, all_ids):
        """Ids of rows where the field exists, given the collection's ``all_ids``."""
        return all_ids - self.missing if len(self.missing) else all_ids

    def class_span(self, cls):
        """Positions ``[p0, p1)`` of the keys of type class ``cls``."""
        span = self._spans.get(cls)
        if span is None:
            span = self._spans[cls] = (self._class_start(cls), self._class_start(cls + 1))
        return span

    def _class_start(self, cls):
        tree = self.tree
        lo, hi = 0, len(tree)
        while lo < hi:
            mid = (lo + hi) // 2
            if _type_class(tree.peekitem(mid)[0]) < cls:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def span(self, op, operand, operand_class):
        """Positions ``[p0, p1)`` of the keys a range or prefix term selects (p0 >= p1:
        none). ``operand``/``operand_class`` as in ``Term``."""
        tree = self.tree
        if op == BETWEEN:
            (lo, hi), (lc, hc) = operand, operand_class
            if lc != hc:
                return 0, 0
            return tree.bisect_left(lo), tree.bisect_right(hi)
        if op == STARTSWITH:
            c0, c1 = self.class_span(operand_class)
            p0 = max(tree.bisect_left(operand), c0)
            # Keys with the prefix are the first keys at or after it: binary search the end.
            lo, hi = p0, c1
            while lo < hi:
                mid = (lo + hi) // 2
                if tree.peekitem(mid)[0].startswith(operand):
                    lo = mid + 1
                else:
                    hi = mid
            return p0, lo
        c0, c1 = self.class_span(operand_class)
        if op == LT:
            return c0, tree.bisect_left(operand)
        if op == LE:
            return c0, tree.bisect_right(operand)
        if op == GT:
            return tree.bisect_right(operand), c1
        if op == GE:
            return tree.bisect_left(operand), c1
        raise QueryError(f"operator {op!r} has no index range")

    def _run(self, p0, p1, reverse=False):
        if p0 >= p1:
            return iter(())
        tree = self.tree
        if p1 - p0 == 1:  # also keeps a None key from reading as "unbounded" below
            return iter((tree.peekitem(p0),))
        return tree.irange_items(tree.peekitem(p0)[0], tree.peekitem(p1 - 1)[0], (True, True),
                                 reverse)

    def span_ids(self, p0, p1):
        """The union of the postings at positions ``[p0, p1)``.

        Up to UNION_CACHE unions are kept by span (all dropped when full): an Index is a
        snapshot that never changes (a transaction's writes go to its IndexMutation,
        whose ``finish()`` is a new Index with an empty cache), and the query layer
        reuses the Index objects of a committed state, so a range asked again on it
        costs one dict lookup."""
        if p0 >= p1:
            return _EMPTY
        if p1 - p0 == 1:
            return self.tree.peekitem(p0)[1]
        unions = self._unions
        ids = unions.get((p0, p1))
        if ids is None:
            ids = IdSet.union_many([posting for _, posting in self._run(p0, p1)])
            if len(unions) >= UNION_CACHE:
                unions.clear()       # atomic: Index objects are shared between threads
            unions[p0, p1] = ids
        return ids

    def span_estimate(self, p0, p1):
        """Estimated number of ids at positions ``[p0, p1)`` (exact up to SAMPLE keys)."""
        n = p1 - p0
        if n <= 0:
            return 0
        if n <= SAMPLE:
            return sum(len(ids) for _, ids in self._run(p0, p1))
        tree = self.tree
        step = n / SAMPLE
        total = sum(len(tree.peekitem(p0 + int(i * step))[1]) for i in range(SAMPLE))
        return int(total * n / SAMPLE)

    def postings(self, descending=False):
        """``(value, ids)`` for every orderable value, in btree order (or reversed)."""
        return self.tree.irange_items(reverse=True) if descending else iter(self.tree.items())

    # ------------------------------------------------------------------ checking

    def _check(self, entries=None):
        """Raise AssertionError on a broken invariant; with ``entries`` (an iterable of
        ``(rowid, value)``) also that the index equals one rebuilt from them."""
        check = getattr(self.tree, "_check", None)
        if check is not None:
            check()
        seen = IdSet.union_many([self.other, self.missing])
        assert len(seen) == len(self.other) + len(self.missing), "other and missing overlap"
        total = len(seen)
        for key, ids in self.tree.items():
            assert key_class(key) is not None, f"unorderable key {key!r} in the tree"
            assert isinstance(ids, IdSet) and len(ids), f"bad posting for {key!r}: {ids!r}"
            total += len(ids)
            seen = seen | ids
        assert len(seen) == total, "a row id is filed in two places"
        if entries is not None:
            rebuilt = Index.build(self.spec, entries)
            assert rebuilt == self, f"index {self!r} differs from its rebuild {rebuilt!r}"


class IndexMutation:
    """Edits an index in place for one transaction; ``finish()`` returns a snapshot."""

    __slots__ = ("spec", "_tree", "_other", "_missing", "_live")

    def __init__(self, index):
        self.spec = index.spec
        self._tree = index.tree.mutate()
        self._other = index.other.mutate()
        self._missing = index.missing.mutate()
        # Postings being edited, by field value. A dict finds them without a tree descent;
        # its equality is the tree's (docs/internals.md "Key rules"), except that a NaN
        # misses here and is found in the tree, where the live mutation also sits.
        self._live = {}

    def _target(self, field_value):
        """The id set mutation that files a row with this field value."""
        if field_value is MISSING:
            return self._missing
        ids = self._live.get(field_value) if type(field_value) in _HASHABLE else None
        if ids is not None:
            return ids
        if key_class(field_value) is None:
            return self._other
        ids = self._tree.get(field_value)
        if isinstance(ids, IdSetMutation):
            return ids
        ids = _EMPTY.mutate() if ids is None else ids.mutate()
        self._tree[field_value] = ids
        self._live[field_value] = ids
        return ids

    def insert(self, rowid, value):
        """A new entry ``value`` got row id ``rowid``."""
        self._target(self.spec.extract(value)).add(rowid)

    def delete(self, rowid, value):
        """The entry ``value`` with row id ``rowid`` was removed."""
        self._target(self.spec.extract(value)).discard(rowid)

    def update(self, rowid, old_value, new_value):
        """Entry ``rowid`` changed from ``old_value`` to ``new_value`` (whole entries)."""
        old, new = self.spec.extract(old_value), self.spec.extract(new_value)
        if not _same_place(old, new):
            self._target(old).discard(rowid)
            self._target(new).add(rowid)

    def finish(self):
        """The index as edited so far, as a persistent ``Index``."""
        tree = self._tree
        for key, live in self._live.items():
            ids = live.finish()
            if len(ids):
                tree[key] = ids
            else:
                del tree[key]
        self._live = {}
        return Index(self.spec, tree.finish(), self._other.finish(), self._missing.finish())
