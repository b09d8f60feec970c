"""The planner: predicate tree + index statistics -> plan tree (plans.py).

``id_plan(pred)`` returns ``(node, residual)``: an id node whose set contains every row
``pred`` matches (None when no index can bound it) and the predicate still to re-check
on the materialized rows (None when the set is exact). The rules, per predicate:

* a ``Term`` on an indexed field: ``IndexedSearchPlan`` (equality, ``in_``, ranges,
  ``between``, ``startswith``, ``exists``, and ``!=`` as present − equal). Equality with an
  unorderable operand (a list) can only use the index's unorderable rows, re-checked.
  ``contains`` and terms on unindexed fields are not indexable.
* ``And``: ``AndMerge`` of its indexable children, cheapest estimate first. A child whose
  cost (index keys to union, plus words of set algebra) exceeds the rows still left to
  filter is not worth computing: it joins the residual ``Filter`` with the unindexable
  children.
* ``Or``: ``OrMerge`` when every branch is indexable (re-checked as a whole if any branch
  is inexact); one unindexable branch makes the whole ``Or`` unindexable (``FullScan``).
* ``Not``: ``Complement`` (all rows − child) when the child's set is exact.

Before any of that, ``few_rows`` answers the commonest query outright: a conjunction of
terms whose indexed equalities intersect to at most ``_FEW`` row ids is those rows,
filtered by the other terms; nothing is estimated and the plan tree is only built if
``explain()`` asks for it.

Estimates come from the indexes (exact for equality; sampled for long ranges, see
protobase/index.py); predicates with no index get fixed textbook selectivities (1/10 for
equality, 1/3 otherwise). ``build_plan`` adds the row nodes: ``Fetch`` (+ ``Filter``) or
``FullScan``, then ``OrderBy`` (walking the order field's index when a limit makes that
cheaper than sorting every match), ``Offset`` and ``Limit``.
"""
import operator

from .expr import (All, And, Or, Not, Term, EQ, NE, LT, LE, GT, GE, IN, EXISTS, CONTAINS,
                   RANGE_OPS, STARTSWITH, MISSING, extract)
from .plans import (IndexedSearchPlan, AndMerge, OrMerge, Complement, FullScan, Fetch,
                    Filter, OrderBy, Offset, Limit)
from .._core import load

__all__ = ["Planner", "build_plan", "normalize", "guess_selectivity", "few_rows",
           "FewRowsPlan"]

IdSet = load("idset").IdSet
_WORDS = 4096  # row ids per unit of set-algebra cost (64 words of 64 bits)
_FEW = 64  # candidate rows below which filtering beats estimating more index terms


def guess_selectivity(pred):
    """Fraction of rows a predicate keeps, when no index can tell."""
    if isinstance(pred, Term):
        return 0.1 if pred.op in (EQ, IN) else 1 / 3
    if isinstance(pred, And):
        s = 1.0
        for child in pred.children:
            s *= guess_selectivity(child)
        return s
    if isinstance(pred, Or):
        return min(1.0, sum(guess_selectivity(child) for child in pred.children))
    if isinstance(pred, Not):
        return 1.0 - guess_selectivity(pred.child)
    return 1.0


def _and(preds):
    if not preds:
        return None
    return preds[0] if len(preds) == 1 else And(preds)


class Planner:
    """Plans against one source snapshot (indexes and count read once)."""

    def __init__(self, source):
        self.source = source
        self.indexes = source.indexes() or {}
        self.total = source.count()

    # ------------------------------------------------------------------ id plans

    def id_plan(self, pred):
        if isinstance(pred, Term):
            return self._term(pred)
        if isinstance(pred, And):
            return self._and(pred)
        if isinstance(pred, Or):
            return self._or(pred)
        if isinstance(pred, Not):
            node, residual = self.id_plan(pred.child)
            if node is None or residual is not None:
                return None, pred
            return Complement(pred, (node,), self.total - node.estimate,
                              node.cost + self.total // _WORDS + 1), None
        return None, pred

    def _term(self, term):
        index = self.indexes.get(term.path)
        if index is None or term.op == CONTAINS:
            return None, term
        op, v, vc = term.op, term.operand, term.operand_class
        field = index.field

        def node(fetch, estimate, cost, exact=True):
            return IndexedSearchPlan(term, field, fetch, estimate, cost, exact)

        if op == EQ:
            if vc is None:
                other = index.other
                return node(lambda s: other, len(other), 1, False), term
            ids = index.lookup(v)
            return node(lambda s: ids, len(ids), 1), None
        if op == IN:
            sets = [index.lookup(item) for item, c in zip(v, vc) if c is not None]
            exact = None not in vc
            if not exact:
                sets.append(index.other)
            ids = IdSet.union_many(sets) if sets else IdSet()
            return node(lambda s: ids, len(ids), len(sets) + 1, exact), \
                (None if exact else term)
        present = self.total - len(index.missing)
        algebra = self.total // _WORDS + 1  # set algebra over every row id
        if op == EXISTS:
            return node(lambda s: index.present(s.all_ids()), present, algebra), None
        if op == NE:
            if vc is None:
                return None, term
            eq = index.lookup(v)
            return node(lambda s: index.present(s.all_ids()) - eq, present - len(eq),
                        algebra), None
        if op in RANGE_OPS or op == STARTSWITH:
            p0, p1 = index.span(op, v, vc)
            return node(lambda s: index.span_ids(p0, p1), index.span_estimate(p0, p1),
                        max(1, p1 - p0)), None
        return None, term

    def _and(self, pred):
        # Equality terms first: their estimates are exact and cost one tree lookup. When
        # together they leave at most _FEW rows, filtering those rows is cheaper than even
        # estimating the other terms (a range estimate probes up to SAMPLE keys), so the
        # others go straight to the residual.
        eq, others = [], []
        for child in pred.children:
            (eq if type(child) is Term and child.op == EQ and child.operand_class is not None
             and child.path in self.indexes else others).append(child)
        planned = [(self._term(child), child) for child in eq]
        deferred = []
        if others:
            if planned and self._merged_estimate(sorted(n.estimate for (n, _), _ in planned)) \
                    <= _FEW:
                deferred = others
            else:
                planned.extend((self.id_plan(child), child) for child in others)
        usable = sorted((item for item in planned if item[0][0] is not None),
                        key=lambda item: item[0][0].estimate)
        residual = [child for (node, _), child in planned if node is None]
        residual.extend(deferred)
        if not usable:
            return None, pred
        chosen = []
        estimate = self.total
        for (node, rest), child in usable:
            # Worth computing when cheaper than filtering the rows it could remove.
            if chosen and node.cost > estimate:
                residual.append(child)
                continue
            chosen.append(node)
            if rest is not None:
                residual.append(rest)
            estimate = node.estimate if len(chosen) == 1 else \
                estimate * node.estimate / max(self.total, 1)
        if len(chosen) == 1:
            merged = chosen[0]
        else:
            merged = AndMerge(_and([n.predicate for n in chosen]), chosen, estimate,
                              sum(n.cost for n in chosen), all(n.exact for n in chosen))
        return merged, _and(residual)

    def _merged_estimate(self, estimates):
        # The estimate _and gives the intersection of exact sets of these sizes.
        estimate = estimates[0]
        for e in estimates[1:]:
            estimate = estimate * e / max(self.total, 1)
        return estimate

    def _or(self, pred):
        nodes = []
        inexact = False
        for child in pred.children:
            node, rest = self.id_plan(child)
            if node is None:
                return None, pred
            inexact = inexact or rest is not None
            nodes.append(node)
        estimate = min(self.total, sum(n.estimate for n in nodes))
        merged = OrMerge(pred, nodes, estimate, sum(n.cost for n in nodes), not inexact)
        return merged, (pred if inexact else None)

    # ------------------------------------------------------------------ whole plans

    def rows_plan(self, pred):
        """``(row node, id node or None, residual)`` for the rows matching ``pred``."""
        if pred is None:
            return FullScan(None, self.total), None, None
        node, residual = (None, pred)
        if self.indexes:
            node, residual = self.id_plan(pred)
        if node is None:
            return FullScan(pred, self.total * guess_selectivity(pred)), None, pred
        rows = Fetch(node)
        if residual is not None:
            rows = Filter(rows, residual, node.estimate * guess_selectivity(residual))
        return rows, node, residual


class FewRowsPlan:
    """What ``few_rows`` did, turned into plan nodes only when ``explain()`` asks."""

    __slots__ = ("postings", "ids", "rest", "fetched", "kept")

    def __init__(self, postings, ids, rest, fetched, kept):
        self.postings = postings   # [(term, IdSet)] in the order they were intersected
        self.ids = ids
        self.rest = rest           # the terms re-checked on the fetched rows
        self.fetched = fetched
        self.kept = kept

    def tree(self):
        nodes = []
        for term, ids in self.postings:
            node = IndexedSearchPlan(term, term.path, lambda s, ids=ids: ids, len(ids), 1)
            node.actual = len(ids)
            nodes.append(node)
        top = nodes[0]
        if len(nodes) > 1:
            top = AndMerge(_and([n.predicate for n in nodes]), nodes, len(self.ids), len(nodes))
            top.actual = len(self.ids)
        rows = Fetch(top)
        rows.actual = self.fetched
        if self.rest:
            rows = Filter(rows, _and(self.rest), self.kept)
            rows.actual = self.kept
        return rows

    def explain(self):
        return self.tree().explain()


def few_rows(source, pred):
    """The rows matching ``pred`` when its indexed equality terms leave at most ``_FEW``
    candidates: ``(rows, FewRowsPlan)``, else None (plan it in full).

    The common shape ``a == x AND b == y AND lo < c < hi`` needs no estimates at all:
    the equality postings are exact sets, so intersecting them (smallest first) and
    filtering the few rows left by the other terms answers exactly what the full plan
    (AndMerge -> Fetch -> Filter) would, in the same row order, without building it."""
    terms = pred.children if type(pred) is And else (pred,)
    indexes = source.indexes()
    if not indexes:
        return None
    postings, rest = [], []
    for term in terms:
        if type(term) is not Term:
            return None
        if term.op == EQ and term.operand_class is not None:
            parts = term.parts   # Term.path, without the property call
            index = indexes.get(parts[0] if len(parts) == 1 else ".".join(parts))
            if index is not None:
                postings.append((term, index.lookup(term.operand)))
                continue
        rest.append(term)
    n = len(postings)
    if not n:
        return None
    if n == 2:
        if len(postings[1][1]) < len(postings[0][1]):
            postings.reverse()
    elif n > 2:
        postings.sort(key=_posting_size)
    ids = postings[0][1]
    used = 1
    for _, other in postings[1:]:
        if not len(ids):
            break
        ids = ids & other
        used += 1
    n = len(ids)
    if n > _FEW:
        return None
    rows = list(source.rows(ids)) if n else []
    fetched = len(rows)
    if rest and rows:
        # A handful of rows: testing each term directly beats compiling a matcher.
        checks = [_check_of(term) for term in rest]
        rows = [row for row in rows if _holds(row[1], checks)]
    return rows, FewRowsPlan(postings[:used], ids, rest, fetched, len(rows))


def _posting_size(item):
    return len(item[1])


_OPERATORS = {EQ: operator.eq, NE: operator.ne, LT: operator.lt, LE: operator.le,
              GT: operator.gt, GE: operator.ge}
_NUMBERS = frozenset((int, float, bool))


def _check_of(term):
    """``(parts, fast, operand, term)``: ``fast(x, operand)`` is Python's own operator,
    used when it agrees with the rule (the fast paths of ``Term._emit``): operand and
    field both plain str, or both non-NaN plain numbers; ``term.general_test()`` decides
    otherwise (built only when a row needs it: most never do)."""
    fast = _OPERATORS.get(term.op)
    v = term.operand
    if fast is not None:
        if type(v) is str:
            fast = (fast, str)
        elif type(v) in _NUMBERS and v == v:
            fast = (fast, float)
        else:
            fast = None
    return term.parts, fast, v, term


def _holds(value, checks):
    for parts, fast, v, term in checks:
        x = value.get(parts[0], MISSING) if type(value) is dict and len(parts) == 1 \
            else extract(value, parts)
        if x is MISSING:
            return False
        if fast is not None and (type(x) is str if fast[1] is str
                                 else type(x) in _NUMBERS and x == x):
            if not fast[0](x, v):
                return False
        elif not term.general_test()(x):
            return False
    return True


def normalize(pred):
    """None for "everything", else the predicate."""
    if pred is None or isinstance(pred, All) or (isinstance(pred, And) and not pred.children):
        return None
    return pred


def build_plan(source, pred, order=None, descending=False, limit=None, offset=0):
    """The plan tree answering a query; ``order`` is a tuple of path segments or None."""
    planner = Planner(source)
    pred = normalize(pred)
    rows, node, residual = planner.rows_plan(pred)
    if order is not None:
        index = planner.indexes.get(".".join(order))
        estimate = max(rows.estimate, 1)
        if index is not None and limit is not None and \
                (offset + limit) * planner.total / estimate < estimate:
            # Walking the index visits about (wanted rows) × (rows per match) postings.
            rows = OrderBy(node, order, descending, rows.estimate, index, residual)
        else:
            rows = OrderBy(rows, order, descending, rows.estimate)
    if offset:
        rows = Offset(rows, offset)
    if limit is not None:
        rows = Limit(rows, limit)
    return rows
