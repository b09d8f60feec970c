"""The lazy ``Query`` a user gets from ``coll.where(...)``, and the source it reads.

A ``Query`` is an immutable description (predicate, order, offset, limit) bound to a
``QuerySource``. Nothing runs until it is iterated or asked for ``count()``/``first()``/
``items()``/``keys()``; every run plans afresh against what the source holds then, so a
query is re-runnable and sees the transaction's own later writes. ``where``,
``order_by``, ``limit`` and ``offset`` return new queries.

The hook for vector search: ``protobase.vector`` builds ``nearest(...)`` on
``Query.matching_ids()`` (the exact row ids the filter selects, computed from indexes when
possible) and the source's ``row``/``rows``; nothing here knows about vectors.
"""
from typing import TYPE_CHECKING, Any, Generic, Iterator, List, Optional, Protocol, Tuple, TypeVar, runtime_checkable

from ..errors import QueryError
from .expr import All, And, Field, Predicate, Term, EQ, split_path, _as_predicate
from .planner import Planner, build_plan, few_rows, normalize
from .plans import Count

__all__ = ["Query", "QuerySource", "make_predicate"]

if TYPE_CHECKING:
    from ..vector.search import Hits

_K = TypeVar("_K")   # the keys of the queried collection (a List's are positions)
_V = TypeVar("_V")   # its values


@runtime_checkable
class QuerySource(Protocol):
    """One collection as seen by one transaction snapshot (implemented by collections.py).

    Its methods are called afresh on every run of a query."""

    def scan(self) -> Iterator[Tuple[object, object]]:
        """Every entry as ``(key, value)``, values decoded (no index used)."""

    def indexes(self) -> dict:
        """Field path (str) -> ``protobase.index.Index`` snapshot; may be empty."""

    def all_ids(self):
        """The ``IdSet`` of every entry's row id (asked only when there are indexes)."""

    def row(self, rowid) -> Tuple[object, object]:
        """``(key, value)`` of the entry with row id ``rowid``."""

    def rows(self, ids) -> Iterator[Tuple[object, object]]:
        """``(key, value)`` of the entries of the ``IdSet`` ``ids``, ascending row id."""

    def count(self) -> int:
        """Number of entries, O(1)."""

    # Optional, used by protobase.vector when present: ``key(rowid)`` (the key alone, no
    # value decoded) and ``keys_of(rowids)`` (a list of them), ``value_reader()`` (key ->
    # value as of now, or None), ``unwritten()`` (open and no writes of its own), and
    # ``vector_spec/vector_index/snapshot_seq/written_ids`` (see collections._Source).


def make_predicate(*preds: Any, **equalities: Any) -> Predicate:
    """AND of ``preds`` and of ``field == value`` for each keyword; All() when empty."""
    if not equalities and len(preds) > 1:
        for p in preds:
            if type(p) is not Term:
                break
        else:  # the usual where(F.a == 1, F.b < 2): nothing to check or flatten
            return And._of_terms(preds)
    terms = [_as_predicate(p) for p in preds]
    terms.extend(Term(split_path(name), EQ, value) for name, value in equalities.items())
    if not terms:
        return All()
    return terms[0] if len(terms) == 1 else And(terms)


def _count_arg(name, n):
    if type(n) is not int or n < 0:
        raise QueryError(f"{name}() takes an int >= 0, not {n!r}")
    return n


class Query(Generic[_K, _V]):
    """A lazy, re-runnable query over one collection snapshot.

    ``list(q)`` values, ``q.items()``, ``q.keys()``, ``q.count()``, ``q.first()``,
    ``q.explain()``; ``q.matching_ids()`` is the hook a later ``nearest(...)`` uses."""

    __slots__ = ("_source", "_pred", "_order", "_descending", "_limit", "_offset", "_plan",
                 "_memo")

    def __init__(self, source: Any, predicate: Any = None) -> None:
        self._source = source
        self._pred = All() if predicate is None else _as_predicate(predicate)
        self._order = None
        self._descending = False
        self._limit = None
        self._offset = 0
        self._plan = None  # the tree of the last run, for explain()
        self._memo = None  # what a layer above keeps between runs of this query (vector)

    def _derive(self, **changes):
        q = Query.__new__(Query)
        for name in Query.__slots__:
            setattr(q, name, changes.get(name, getattr(self, name)))
        q._plan = q._memo = None
        return q

    # ------------------------------------------------------------------ building

    def where(self, *preds: Any, **equalities: Any) -> "Query[_K, _V]":
        """This query further restricted (AND) by ``preds`` and keyword equalities."""
        extra = make_predicate(*preds, **equalities)
        return self._derive(_pred=And((self._pred, extra)))

    def order_by(self, field: Any, descending: bool = False) -> "Query[_K, _V]":
        """Sorted by ``field`` (a path such as ``"a.b"``). Values of different types sort
        by type first, in SortedDict's key order; entries whose field is unorderable (a
        list, a dict...) come after them and entries missing the field last, each of
        those two groups in key order. ``descending`` reverses only the orderable values."""
        if isinstance(field, Field):
            field = ".".join(field._parts)
        if not isinstance(field, str):
            raise QueryError(f"order_by() takes a field path such as 'price', not "
                             f"{type(field).__name__}")
        if type(descending) is not bool:
            raise QueryError("order_by(descending=...) takes True or False")
        return self._derive(_order=split_path(field), _descending=descending)

    def limit(self, n: int) -> "Query[_K, _V]":
        """At most ``n`` results."""
        return self._derive(_limit=_count_arg("limit", n))

    def offset(self, n: int) -> "Query[_K, _V]":
        """Skip the first ``n`` results."""
        return self._derive(_offset=_count_arg("offset", n))

    # ------------------------------------------------------------------ running

    def _rows(self, limit=None):
        if limit is not None and (self._limit is None or limit < self._limit):
            lim = limit
        else:
            lim = self._limit
        if lim is None and self._order is None and not self._offset:
            few = few_rows(self._source, self._pred)
            if few is not None:
                rows, self._plan = few
                return iter(rows)
        plan = build_plan(self._source, self._pred, self._order, self._descending, lim,
                          self._offset)
        self._plan = plan
        return plan.rows(self._source)

    def __iter__(self) -> Iterator[_V]:
        """The values of the matching entries."""
        return (value for _, value in self._rows())

    def items(self) -> List[Tuple[_K, _V]]:
        """``[(key, value), ...]`` of the matching entries."""
        return list(self._rows())

    def keys(self) -> List[_K]:
        """``[key, ...]`` of the matching entries."""
        return [key for key, _ in self._rows()]

    def first(self) -> Optional[_V]:
        """The first matching value, or None when there is none."""
        for _, value in self._rows(limit=1):
            return value
        return None

    def count(self) -> int:
        """The number of results; from id sets alone when the predicate is indexable."""
        source = self._source
        planner = Planner(source)
        pred = normalize(self._pred)
        if pred is None:
            node = Count((), source.count())
        else:
            rows, ids, residual = planner.rows_plan(pred)
            child = ids if ids is not None and residual is None else rows
            node = Count((child,), child.estimate)
        self._plan = node
        n = max(0, node.run(source) - self._offset)
        return n if self._limit is None else min(n, self._limit)

    def __bool__(self) -> bool:
        """Whether anything matches (after offset and limit): from id sets alone when the
        predicate is indexable, else by running the query to its first result."""
        if self._limit == 0:
            return False
        source = self._source
        pred = normalize(self._pred)
        if pred is None:
            return source.count() > self._offset
        rows, ids, residual = Planner(source).rows_plan(pred)
        if ids is not None and residual is None:
            node = self._plan = Count((ids,), ids.estimate)
            return node.run(source) > self._offset
        for _ in self._rows(limit=1):
            return True
        return False

    def matching_ids(self):
        """The ``IdSet`` of row ids of every entry the predicate matches, ignoring order,
        offset and limit: the hook ``nearest()`` builds on."""
        source = self._source
        planner = Planner(source)
        pred = normalize(self._pred)
        if pred is None:
            return source.all_ids()
        node, residual = planner.id_plan(pred) if planner.indexes else (None, pred)
        ids = node.ids(source) if node is not None else source.all_ids()
        if residual is None:
            return ids
        match = residual.matcher()
        keep = ids.mutate()
        for rowid in ids:
            if not match(source.row(rowid)[1]):
                keep.discard(rowid)
        return keep.finish()

    # The vector layer (protobase.vector, which sits above this one) installs the
    # implementation at import; the query layer itself knows nothing about vectors.
    _nearest: Any = None

    def nearest(self, field: str, vector: Any, k: int = 10, ef: Optional[int] = None) -> "Hits[_K, _V]":
        """The k matching entries whose vector at `field` is nearest to `vector`, in
        ascending distance: ``list(hits)`` values, ``hits.scored()`` (key, value, distance)."""
        if Query._nearest is None:
            raise QueryError("nearest() needs protobase.vector, which installs it when "
                             "imported (import protobase does)")
        return Query._nearest(self, field, vector, k=k, ef=ef)

    def explain(self) -> str:
        """The plan as text: node types with estimated rows and, once run, actual rows."""
        plan = self._plan
        if plan is None:
            plan = build_plan(self._source, self._pred, self._order, self._descending,
                              self._limit, self._offset)
        return plan.explain()

    def __repr__(self) -> str:
        parts = [f"where {self._pred!r}"]
        if self._order is not None:
            parts.append(f"order_by {'.'.join(self._order)!r}"
                         + (" descending" if self._descending else ""))
        if self._offset:
            parts.append(f"offset {self._offset}")
        if self._limit is not None:
            parts.append(f"limit {self._limit}")
        return f"<Query {' '.join(parts)}>"
