"""Plan nodes: the executable tree the planner builds, and its explain() text.

Two kinds of node. *Id nodes* compute an ``IdSet`` of row ids from indexes alone
(``IndexedSearchPlan``, ``AndMerge``, ``OrMerge``, ``Complement``); each says whether its
set is ``exact`` (precisely the rows its predicate matches) or a superset to re-check.
*Row nodes* yield ``(key, value)`` pairs (``FullScan``, ``Fetch``, ``Filter``,
``OrderBy``, ``Offset``, ``Limit``); only they materialize values.

::

    Limit(10)
      OrderBy(F.price, via index)      walks the price index in order, stops at 10 rows
        AndMerge                        smallest estimate first, stops early when empty
          IndexedSearchPlan(F.category == 'books')
          IndexedSearchPlan(F.stock > 0)

Each node carries ``estimate`` (rows, from index statistics) and, once executed,
``actual`` (rows it produced; a row node stopped early by a Limit shows what it yielded).

Ordering: rows sort by the field under btree order (``btree.compare``), rows whose field
is unorderable (a list...) after them, rows missing the field last; ties, and the rows in
those two tail groups, are in ascending key order. ``descending`` reverses only the
orderable values. Both the sort and the index walk produce exactly this order.
"""
import math
from functools import cmp_to_key

from .._core import load
from .expr import MISSING, extract, key_class

__all__ = ["PlanNode", "IndexedSearchPlan", "AndMerge", "OrMerge", "Complement",
           "FullScan", "Fetch", "Filter", "OrderBy", "Offset", "Limit", "Count", "sort_rows",
           "sort_by_key"]

_btree = load("btree")
_idset = load("idset")
IdSet = _idset.IdSet
_KEY = cmp_to_key(_btree.compare)


def _first(pair):
    return pair[0]


# Exact types whose Python order is the btree order (no NaN, one class at a time).
_NATIVE = {str: 2, bytes: 3, int: 1, bool: 1, float: 1}


def _native_class(items):
    """The one type class all ``items`` share if Python can order them as btree does
    (plain str, bytes or non-NaN numbers), else None."""
    classes = set()
    for item in items:
        c = _NATIVE.get(type(item))
        if c is None or (c == 1 and item != item):
            return None
        classes.add(c)
    return classes.pop() if len(classes) == 1 else None


def _sort_pairs(pairs, descending=False):
    # Stable sort of (sort value, row) pairs by btree order of the sort value.
    if _native_class(p[0] for p in pairs) is not None:
        pairs.sort(key=_first, reverse=descending)
    else:
        pairs.sort(key=lambda p: _KEY(p[0]), reverse=descending)


def sort_by_key(rows):
    """``(key, value)`` rows in ascending btree order of their keys."""
    pairs = [(row[0], row) for row in rows]
    _sort_pairs(pairs)
    return [row for _, row in pairs]


def sort_rows(rows, parts, descending):
    """Sort ``(key, value)`` rows by the field ``parts`` in the documented order."""
    rows = sort_by_key(rows)
    ordered, unordered, missing = [], [], []
    for row in rows:
        v = extract(row[1], parts)
        if v is MISSING:
            missing.append(row)
        elif key_class(v) is None:
            unordered.append(row)
        else:
            ordered.append((v, row))
    # sort() is stable, also with reverse=True: equal values keep ascending key order.
    _sort_pairs(ordered, descending)
    return [row for _, row in ordered] + unordered + missing


class PlanNode:
    """A node of a plan tree."""

    __slots__ = ("children", "estimate", "actual")

    def __init__(self, children=(), estimate=0):
        self.children = tuple(children)
        self.estimate = math.ceil(estimate)
        self.actual = None

    def label(self):
        return type(self).__name__

    def explain(self, indent=0):
        actual = "" if self.actual is None else f" actual={self.actual}"
        lines = ["  " * indent + f"{self.label()}  [est={self.estimate}{actual}]"]
        for child in self.children:
            lines.append(child.explain(indent + 1))
        return "\n".join(lines)

    def __repr__(self):
        return f"<{self.label()} est={self.estimate}>"


# ------------------------------------------------------------------------------ id nodes

class IdNode(PlanNode):
    """A node whose result is an IdSet; ``predicate`` is what it answers."""

    __slots__ = ("predicate", "cost", "exact")

    def __init__(self, predicate, children=(), estimate=0, cost=1, exact=True):
        super().__init__(children, estimate)
        self.predicate = predicate
        self.cost = cost
        self.exact = exact

    def ids(self, source):
        result = self._ids(source)
        self.actual = len(result)
        return result


class IndexedSearchPlan(IdNode):
    """Ids for one term on one indexed field, from a single index.

    ``fetch(source)`` computes the set; the planner supplies it with its statistics."""

    __slots__ = ("field", "_fetch")

    def __init__(self, predicate, field, fetch, estimate, cost, exact=True):
        super().__init__(predicate, (), estimate, cost, exact)
        self.field = field
        self._fetch = fetch

    def _ids(self, source):
        return self._fetch(source)

    def label(self):
        recheck = "" if self.exact else ", re-checked"
        return f"IndexedSearchPlan({self.predicate!r}{recheck})"


class AndMerge(IdNode):
    """Intersection of its children, computed smallest estimate first."""

    __slots__ = ()

    def _ids(self, source):
        acc = None
        for child in self.children:  # the planner ordered them by estimate
            ids = child.ids(source)
            acc = ids if acc is None else acc & ids
            if not len(acc):
                break
        return acc


class OrMerge(IdNode):
    """Union of its children."""

    __slots__ = ()

    def _ids(self, source):
        return IdSet.union_many([child.ids(source) for child in self.children])


class Complement(IdNode):
    """Every row of the collection not in its child (``~p`` on an indexed ``p``)."""

    __slots__ = ()

    def _ids(self, source):
        return source.all_ids() - self.children[0].ids(source)


# ----------------------------------------------------------------------------- row nodes

class RowNode(PlanNode):
    """A node yielding ``(key, value)`` pairs."""

    __slots__ = ()

    def rows(self, source):
        self.actual = 0
        for row in self._rows(source):
            self.actual += 1
            yield row


class FullScan(RowNode):
    """Every entry of the collection, filtered by ``predicate`` (None: all)."""

    __slots__ = ("predicate",)

    def __init__(self, predicate, estimate):
        super().__init__((), estimate)
        self.predicate = predicate

    def _rows(self, source):
        pred = self.predicate
        if pred is None:
            return source.scan()
        return pred.row_filter()(source.scan())

    def label(self):
        return "FullScan" if self.predicate is None else f"FullScan(filter {self.predicate!r})"


class Fetch(RowNode):
    """Materializes the rows of an id set, in ascending row id order."""

    __slots__ = ()

    def __init__(self, child):
        super().__init__((child,), child.estimate)

    def _rows(self, source):
        ids = self.children[0].ids(source)
        return source.rows(ids) if len(ids) else iter(())


class Filter(RowNode):
    """Keeps the rows of its child that match ``predicate`` (the residual terms)."""

    __slots__ = ("predicate",)

    def __init__(self, child, predicate, estimate):
        super().__init__((child,), estimate)
        self.predicate = predicate

    def _rows(self, source):
        return self.predicate.row_filter()(self.children[0].rows(source))

    def label(self):
        return f"Filter({self.predicate!r})"


class OrderBy(RowNode):
    """Rows in the order of a field: either sorts its child's rows, or (``index`` set)
    walks that field's index in order, materializing one posting at a time, so a Limit
    above stops the walk after the rows it needs.

    Walk mode: ``children`` holds the candidate id node if there is one, and
    ``residual`` is re-checked on every materialized row."""

    __slots__ = ("parts", "descending", "index", "residual")

    def __init__(self, child, parts, descending, estimate, index=None, residual=None):
        super().__init__(() if child is None else (child,), estimate)
        self.parts = parts
        self.descending = descending
        self.index = index
        self.residual = residual

    def label(self):
        how = ", via index" if self.index is not None else ""
        order = " descending" if self.descending else ""
        check = f", filter {self.residual!r}" if self.residual is not None else ""
        return f"OrderBy(F.{'.'.join(self.parts)}{order}{how}{check})"

    def _rows(self, source):
        if self.index is None:
            return iter(sort_rows(self.children[0].rows(source), self.parts, self.descending))
        return self._walk(source)

    def _walk(self, source):
        index = self.index
        cand = self.children[0].ids(source) if self.children else None
        match = self.residual.matcher() if self.residual is not None else None

        def group(ids):
            if cand is not None:
                ids = ids & cand
            if not len(ids):
                return []
            rows = source.rows(ids)
            if match is not None:
                rows = [row for row in rows if match(row[1])]
            return sort_by_key(rows)

        for _, ids in index.postings(self.descending):
            yield from group(ids)
        yield from group(index.other)
        yield from group(index.missing)


class Offset(RowNode):
    """Skips the first ``n`` rows of its child."""

    __slots__ = ("n",)

    def __init__(self, child, n):
        super().__init__((child,), max(0, child.estimate - n))
        self.n = n

    def _rows(self, source):
        it = self.children[0].rows(source)
        for _ in zip(range(self.n), it):
            pass
        return it

    def label(self):
        return f"Offset({self.n})"


class Limit(RowNode):
    """At most ``n`` rows of its child; stops pulling from it after the last."""

    __slots__ = ("n",)

    def __init__(self, child, n):
        super().__init__((child,), min(n, child.estimate))
        self.n = n

    def _rows(self, source):
        if self.n <= 0:
            return iter(())
        it = self.children[0].rows(source)
        return (row for _, row in zip(range(self.n), it))

    def label(self):
        return f"Limit({self.n})"


class Count(PlanNode):
    """The number of matches: the size of an exact id set (no row materialized), the
    rows of a row node counted, or (no child) the collection's own O(1) count."""

    __slots__ = ()

    def run(self, source):
        if not self.children:
            self.actual = source.count()
        else:
            child = self.children[0]
            if isinstance(child, IdNode):
                self.actual = len(child.ids(source))
            else:
                self.actual = sum(1 for _ in child.rows(source))
        return self.actual

    def label(self):
        if not self.children:
            return "Count(collection size)"
        if isinstance(self.children[0], IdNode):
            return "Count(id set, no rows materialized)"
        return "Count(rows)"
