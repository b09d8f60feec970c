"""``nearest()``: the vector plan operators, exact for the transaction's snapshot.

The shared HNSW index follows the newest committed state; a transaction reads an older
snapshot plus its own writes. So the index only *proposes*: the snapshot decides.

    admitted = query.matching_ids()                  (snapshot rows the filter selects)
    suspect  = admitted & (own writes | rows the index changed after the snapshot)
    trusted  = admitted - suspect                    (index vector == snapshot vector)

    trusted --plan by selectivity--> top-k candidates  --+
    suspect --read from the snapshot, exact-----------> --+--> best k, re-ranked with the
                                                             vectors of the snapshot's rows

Plans for the trusted set, chosen by estimated cost from its size ``s`` against the
index's ``n`` rows (selectivity ``s/n``; constants below):

- ``ExactVectorScan``: gather the admitted vectors from the index's dense copy and rank
  them all with numpy (exact), when ``s`` rows cost less than the graph walk would;
- ``VectorSearch`` over-fetch: ask hnswlib for ``k / selectivity * OVERFETCH_MARGIN``
  neighbours, keep the admitted ones, double until ``k`` are found or the index is
  exhausted (then scan exactly);
- ``VectorSearch`` filtered: hnswlib walks the graph with a filter callable (membership in
  the trusted id set) when over-fetching would ask for more than MAX_OVERFETCH;
- ``VectorSearch`` without a filter when the query has no predicate.

Without a vector index (no spec, hnswlib missing, or another metric asked for) the query's
own rows are scanned exactly with numpy. Results: ascending distance, ties by row id (by
order of the query's rows when there are no row ids).
"""
import math

import numpy as np

from ..errors import QueryError, VectorError
from ..query import MISSING, extract
from ..query.expr import All, split_path
from . import METRICS, as_vector
from .hnsw import distances, normalize

__all__ = ["nearest", "Hits", "EXACT_ROW_COST", "CANDIDATE_COST", "OVERFETCH_MARGIN",
           "MAX_OVERFETCH", "DEFAULT_EF"]

# Calibrated with benchmarks/vector_benchmark.py at 100k x 128 on 2 shared cores: an exact
# scan costs about EXACT_ROW_COST microseconds per admitted row (mostly gathering its vector
# from the index's dense copy), a graph walk about CANDIDATE_COST per neighbour asked for
# (the larger of ef and the over-fetch). Over-fetching beat hnswlib's filter callable at
# every selectivity measured, 0.1% to 100% (the callable pays a Python call per visited
# node), so the callable is used only where over-fetching would ask for more than
# MAX_OVERFETCH neighbours and an exact scan would still cost more.
EXACT_ROW_COST = 0.25
CANDIDATE_COST = 4.0
OVERFETCH_MARGIN = 1.5
MAX_OVERFETCH = 4096
DEFAULT_EF = 64


def nearest(query, field, vector, k=10, ef=None, metric=None):
    """The ``k`` entries selected by ``query`` whose vector at ``field`` is nearest to
    ``vector`` (order, offset and limit of the query do not apply: ``k`` is the limit)."""
    if type(k) is not int or k < 0:
        raise QueryError(f"nearest() takes k as an int >= 0, not {k!r}")
    if ef is not None and (type(ef) is not int or ef < 1):
        raise QueryError(f"nearest() takes ef as an int >= 1 or None, not {ef!r}")
    if metric is not None and metric not in METRICS:
        raise VectorError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
    if not isinstance(field, str) or not field:
        raise QueryError(f"nearest() takes a field path such as 'embedding', not {field!r}")
    return Hits(query, field, vector, k, ef, metric)


class Hits:
    """The result of ``nearest()``, computed on first use: iterating yields values in
    ascending distance; ``scored()`` yields ``(key, value, distance)``."""

    __slots__ = ("_query", "_field", "_spec", "_vector", "_k", "_ef", "_metric", "_results",
                 "_explain")

    def __init__(self, query, field, vector, k, ef, metric):
        self._query = query
        self._field = field
        self._spec = spec = _spec(query._source, field)
        self._vector = as_vector(vector, spec["dim"] if spec else None)   # refused now if bad
        self._k = k
        self._ef = ef
        self._metric = metric
        self._results = None
        self._explain = None

    def _run(self):
        if self._results is None:
            self._results, self._explain = _search(self._query, self._field, self._spec,
                                                   self._vector, self._k, self._ef, self._metric)
        return self._results

    def __iter__(self):
        return (value for _, value, _ in self._run())

    def scored(self):
        """``(key, value, distance)`` triples, ascending distance."""
        return iter(list(self._run()))

    def keys(self):
        """The keys, ascending distance."""
        return [key for key, _, _ in self._run()]

    def values(self):
        """The values, ascending distance."""
        return [value for _, value, _ in self._run()]

    def distances(self):
        """The distances, ascending."""
        return [d for _, _, d in self._run()]

    def __len__(self):
        return len(self._run())

    def __bool__(self):
        return bool(self._run())

    def explain(self):
        """The plan chosen and why, as text."""
        self._run()
        return self._explain

    def __repr__(self):
        if self._results is None:
            return f"<Hits nearest {self._field!r} k={self._k} (not run)>"
        return f"<Hits nearest {self._field!r} k={self._k}: {len(self._results)} found>"


def _spec(source, field):
    get = getattr(source, "vector_spec", None)
    return get(field) if get is not None else None


# ---------------------------------------------------------------------------- planning

def _search(query, field, spec, q, k, ef, metric):
    source = query._source
    metric = metric or (spec["metric"] if spec else "cosine")
    qs = normalize(q[None, :])[0] if metric == "cosine" else q
    parts = split_path(field)
    head = f"nearest {field!r} k={k} metric={metric}"
    index = None
    if spec is None:
        why = "no vector index on this field"
    elif metric != spec["metric"]:
        why = f"the index ranks by {spec['metric']}, {metric} was asked for"
    else:
        index = source.vector_index(field)
        why = "hnswlib is not installed"
    if index is None:
        results, ranked = _scan_items(query, parts, qs, metric, k)
        return results, (f"ExactVectorScan {head}\n  strategy: exact numpy scan of the query's "
                         f"rows\n  why: {why}\n  rows ranked: {ranked}")
    return _indexed(query, source, index, parts, qs, metric, k, ef, head)


def _indexed(query, source, index, parts, q, metric, k, ef, head):
    admitted = query.matching_ids()
    no_filter = isinstance(query._pred, All)
    written = source.written_ids() if hasattr(source, "written_ids") else None
    seq = source.snapshot_seq() if hasattr(source, "snapshot_seq") else None
    changed = index.changed_since(seq)
    ids_type = type(admitted)
    if changed is None:
        suspect, trusted = admitted, ids_type()
        note = "the index's change log does not reach this snapshot: every admitted row read"
    else:
        moved = ids_type.from_numpy(changed) if len(changed) else ids_type()
        if written is not None and len(written):
            moved = moved | written
        suspect = admitted & moved if len(moved) else ids_type()
        trusted = admitted - suspect if len(suspect) else admitted
        note = f"{len(suspect)} admitted rows read from the snapshot (own or later writes)"
    n = max(len(index), 1)
    s = len(trusted)
    sel = s / n
    ef = ef or DEFAULT_EF
    if k == 0 or s == 0:
        cand_ids, cand_d = np.empty(0, np.int64), np.empty(0, np.float32)
        name = "ExactVectorScan"
        plan = f"exact numpy scan of the {len(suspect)} admitted rows read from the snapshot"
    elif no_filter and changed is not None and not len(suspect):
        cand_ids, cand_d, plan = _overfetch(index, trusted, q, k, ef, 1.0)
        name, plan = "VectorSearch", "hnsw without filter; " + plan
    elif s * EXACT_ROW_COST <= max(ef, _fetch(k, sel)) * CANDIDATE_COST:
        cand_ids, cand_d = _exact_index(index, trusted, q, metric, k)
        name, plan = "ExactVectorScan", f"exact numpy scan of {s} admitted vectors"
    elif _fetch(k, sel) > MAX_OVERFETCH:
        cand_ids, cand_d = _filtered(index, trusted, q, k, ef)
        name, plan = "VectorSearch", f"hnsw with a filter callable (ef={max(ef, k)})"
    else:
        cand_ids, cand_d, plan = _overfetch(index, trusted, q, k, ef, sel)
        name = "VectorSearch"
    results = _finish(source, parts, q, metric, k, cand_ids, cand_d, suspect)
    text = (f"{name} {head}\n  strategy: {plan}\n"
            f"  why: {s} admitted of {len(index)} indexed rows (estimated selectivity "
            f"{100 * sel:.2f}%): exact scan ~{s * EXACT_ROW_COST:.0f}us vs graph walk "
            f"~{max(ef, _fetch(k, sel)) * CANDIDATE_COST:.0f}us"
            f"\n  snapshot: {note}")
    return results, text


def _top(ids, dist, k):
    """The k smallest by (distance, id), sorted."""
    if len(dist) > k:
        cut = np.argpartition(dist, k - 1)[:k]
        bound = dist[cut].max()
        keep = np.flatnonzero(dist <= bound)        # keep ties at the bound for the id order
        ids, dist = ids[keep], dist[keep]
    order = np.lexsort((ids, dist))[:k]
    return ids[order], dist[order]


def _exact_index(index, trusted, q, metric, k):
    ids, dist = index.scan(trusted.to_numpy(), q)
    return _top(ids, dist, k)


def _filtered(index, trusted, q, k, ef):
    labels, dist = index.search(q, k, ef=max(ef, k), filter=trusted.__contains__)
    return labels, dist


def _fetch(k, sel):
    """How many neighbours to ask for so that about k of them pass a filter admitting sel."""
    return int(math.ceil(k / max(sel, 1e-9) * OVERFETCH_MARGIN)) + 1


def _overfetch(index, trusted, q, k, ef, sel):
    n = len(index)
    fetch = min(n, _fetch(k, sel))
    while True:
        labels, dist = index.search(q, fetch, ef=max(ef, fetch))
        keep = np.fromiter(map(trusted.__contains__, labels.tolist()), dtype=bool,
                           count=len(labels))
        if keep.sum() >= k or len(labels) < fetch:
            plan = f"hnsw over-fetching {fetch} then filtering (ef={max(ef, fetch)})"
            return labels[keep], dist[keep], plan
        if fetch >= n:
            ids, d = _exact_index(index, trusted, q, index.metric, k)
            return ids, d, f"over-fetch exhausted the index at {fetch}: exact scan"
        fetch = min(n, fetch * 2)


def _snapshot_vectors(pairs, parts, metric, dim):
    """``(keys, values, mat, ok)`` for ``(key, value)`` pairs: the field's vectors in index
    space; ``ok`` marks the rows that have the field."""
    keys, values, raw, ok = [], [], [], []
    for key, value in pairs:
        v = extract(value, parts)
        keys.append(key)
        values.append(value)
        has = v is not MISSING and v is not None
        ok.append(has)
        if has:
            raw.append(v)
    mat = _stack(raw, keys, ok, dim)
    if metric == "cosine" and len(mat):
        mat = normalize(mat)
    return keys, values, mat, np.asarray(ok, dtype=bool)


def _stack(raw, keys, ok, dim):
    """The vectors as one float32 matrix: one numpy conversion when they are all good
    (written rows were checked at the write), one by one to name the bad one otherwise."""
    if not raw:
        return np.zeros((0, dim or 1), np.float32)
    try:
        mat = np.asarray(raw)
        if (mat.ndim == 2 and mat.dtype.kind in "iuf" and (dim is None or mat.shape[1] == dim)
                and mat.shape[1] and np.isfinite(mat).all()):
            mat = mat.astype(np.float32)
            if np.isfinite(mat).all():
                return mat
    except (ValueError, TypeError):
        pass
    has = [key for key, h in zip(keys, ok) if h]
    vecs = []
    for key, v in zip(has, raw):
        try:
            vecs.append(as_vector(v, dim))
        except VectorError as exc:
            raise VectorError(f"entry {key!r}: {exc}") from None
    if len({len(v) for v in vecs}) > 1:
        raise VectorError(f"the vectors have different dimensions: entry {has[0]!r} has "
                          f"{len(vecs[0])}, others differ")
    return np.stack(vecs)


def _finish(source, parts, q, metric, k, cand_ids, cand_d, suspect):
    """Merge the trusted candidates with the suspect rows, then rank the best with the
    snapshot's own vectors."""
    cand_ids, _ = _top(np.asarray(cand_ids, np.int64), np.asarray(cand_d, np.float32), k)
    ids = np.concatenate([cand_ids, suspect.to_numpy()]) if len(suspect) else cand_ids
    if not len(ids):
        return []
    ids = np.unique(ids)
    # One row per id, in the order of ids (rows() may follow key order, as a SortedDict does).
    keys, values, mat, ok = _snapshot_vectors((source.row(rid) for rid in ids.tolist()),
                                              parts, metric, len(q))
    rows = np.flatnonzero(ok)
    dist = distances(mat, q, metric)
    order = np.lexsort((ids[rows], dist))[:k]
    return [(keys[rows[j]], values[rows[j]], float(dist[j])) for j in order.tolist()]


def _scan_items(query, parts, q, metric, k):
    bare = query._derive(_order=None, _limit=None, _offset=0)
    keys, values, mat, ok = _snapshot_vectors(bare.items(), parts, metric, len(q))
    if not len(mat) or k == 0:
        return [], len(mat)
    rows = np.flatnonzero(ok)
    dist = distances(mat, q, metric)
    order = np.lexsort((rows, dist))[:k]
    return [(keys[rows[j]], values[rows[j]], float(dist[j])) for j in order.tolist()], len(mat)
