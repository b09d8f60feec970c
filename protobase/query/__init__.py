"""Queries: ``F`` expressions, the planner, plan nodes and the lazy ``Query``.

``coll.where(F.price < 10, category="books")`` gives a :class:`Query`; the collection
layer builds it as ``Query(source, make_predicate(*preds, **kw))`` over a
:class:`QuerySource` (one collection in one transaction snapshot). Indexes
(protobase/index.py) change a query's speed, never its answer.
"""
from .expr import F, Field, Predicate, Term, And, Or, Not, All, MISSING, extract
from .query import Query, QuerySource, make_predicate
from .plans import (PlanNode, IndexedSearchPlan, AndMerge, OrMerge, Complement, FullScan,
                    Fetch, Filter, OrderBy, Offset, Limit, Count)
from .planner import build_plan

__all__ = ["F", "Field", "Predicate", "Term", "And", "Or", "Not", "All", "MISSING", "extract",
           "Query", "QuerySource", "make_predicate", "build_plan", "PlanNode",
           "IndexedSearchPlan", "AndMerge", "OrMerge", "Complement", "FullScan", "Fetch",
           "Filter", "OrderBy", "Offset", "Limit", "Count"]
