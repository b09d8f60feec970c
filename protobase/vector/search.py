"""``nearest()``: the vector plan operators, exact for the transaction's snapshot.

The shared HNSW index follows the newest committed state; a transaction reads an older
snapshot plus its own writes. So the index only *proposes*: the snapshot decides.

    admitted = query.matching_ids()                  (snapshot rows the filter selects)
    suspect  = admitted & (own writes | rows the index changed after the snapshot)
    trusted  = admitted - suspect                    (index vector == snapshot vector)

    trusted --plan by selectivity--> top-k, distances from the index's copy --+
    suspect --read from the snapshot, distances from the snapshot's vectors --+--> best k

The change log proves a trusted row's vector in the index equal to the snapshot's (the
index stores it as the snapshot path computes it: float32, normalized for cosine), so its
distance is the snapshot's exactly and only the k rows returned are read: their keys at
once, their values on first use (``keys()`` decodes none). The values are read from the
structure the snapshot had when the query ran, so reading them later gives the same
answer (a collection with writes of its own in the transaction is decoded at once, its
working copy moving under later writes); after the transaction ends, reading them raises
TransactionClosedError as any read does. The index's lock is held from reading the change
log to the last vector read from the index.

Plans for the trusted set, chosen by estimated cost from its size ``s`` against the
index's ``n`` rows (selectivity ``s/n``; constants below):

- ``ExactVectorScan``: gather the admitted vectors from the index's dense copy (or reuse
  those gathered for the same set, see hnsw.py) and rank them all with numpy (exact), when
  ``s`` rows cost less than the graph walk would;
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

# Calibrated with benchmarks/vector_benchmark.py at 100k x 128 on 2 shared cores, each plan
# forced at 1% to 30%: an exact scan costs about EXACT_ROW_COST microseconds per admitted
# row (gathering its vector from the index's dense copy, then one matrix-vector product), a
# graph walk about CANDIDATE_COST per neighbour asked for (the larger of ef and the
# over-fetch; 1.5-2us each plus the walk's fixed cost, folded in). They cross near 6%
# there, where the forced plans cost the same. Over-fetching beat hnswlib's filter callable
# at every selectivity measured (the callable pays a Python call per visited node), so the
# callable is used only where over-fetching would ask for more than MAX_OVERFETCH
# neighbours and an exact scan would still cost more.
EXACT_ROW_COST = 0.13
CANDIDATE_COST = 3.0
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
    ascending distance; ``scored()`` yields ``(key, value, distance)``. Values are decoded
    on first use, each row once."""

    __slots__ = ("_query", "_field", "_spec", "_vector", "_k", "_ef", "_metric", "_results",
                 "_read", "_explain")

    def __init__(self, query, field, vector, k, ef, metric):
        self._query = query
        self._field = field
        self._spec = spec = _spec(query._source, field)
        self._vector = as_vector(vector, spec["dim"] if spec else None)   # refused now if bad
        self._k = k
        self._ef = ef
        self._metric = metric
        self._results = None
        self._read = None        # key -> value for the rows whose value is _UNREAD
        self._explain = None

    def _run(self):
        """``(key, value, distance)`` triples; a value may still be _UNREAD."""
        if self._results is None:
            self._results, self._read, self._explain = _search(
                self._query, self._field, self._spec, self._vector, self._k, self._ef,
                self._metric)
        return self._results

    def _decoded(self):
        """The triples with every value decoded (each row once, kept)."""
        results = self._run()
        read = self._read
        if read is not None:
            self._results = results = [(key, read(key) if value is _UNREAD else value, d)
                                       for key, value, d in results]
            self._read = None
        return results

    def __iter__(self):
        return (value for _, value, _ in self._decoded())

    def scored(self):
        """``(key, value, distance)`` triples, ascending distance."""
        return iter(list(self._decoded()))

    def keys(self):
        """The keys, ascending distance."""
        return [key for key, _, _ in self._run()]

    def values(self):
        """The values, ascending distance."""
        return [value for _, value, _ in self._decoded()]

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
        if callable(self._explain):          # written out on demand, not on every query
            self._explain = self._explain()
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
    qs = _unit(q) if metric == "cosine" else q
    parts = split_path(field)
    index = None
    if spec is None:
        why = "no vector index on this field"
    elif metric != spec["metric"]:
        why = f"the index ranks by {spec['metric']}, {metric} was asked for"
    else:
        index = source.vector_index(field)
        why = "hnswlib is not installed"
    head = f"nearest {field!r} k={k} metric={metric}"
    if index is None:
        results, ranked = _scan_items(query, parts, qs, metric, k)
        return results, None, (f"ExactVectorScan {head}\n  strategy: exact numpy scan of the "
                               f"query's rows\n  why: {why}\n  rows ranked: {ranked}")
    results, read, why = _indexed(query, source, index, parts, qs, metric, k, ef)
    return results, read, lambda: f"{why[0]} {head}\n{_why(*why[1:])}"


def _indexed(query, source, index, parts, q, metric, k, ef):
    """``(results, read, why)`` for a query on an indexed field (as _finish gives them);
    ``_why(*why)`` explains."""
    admitted = query.matching_ids()
    no_filter = isinstance(query._pred, All)
    written = source.written_ids() if hasattr(source, "written_ids") else None
    seq = source.snapshot_seq() if hasattr(source, "snapshot_seq") else None
    ef = ef or DEFAULT_EF
    # Held from the change log to the last vector read from the index: a commit that moved
    # a trusted row in between would make its vector differ from the snapshot's.
    with index.lock:
        changed = index.changed_since(seq)
        if changed is None:
            suspect, trusted = admitted, type(admitted)()
        else:
            moved = type(admitted).from_numpy(changed) if len(changed) else None
            if written is not None and len(written):
                moved = written if moved is None else moved | written
            suspect = admitted & moved if moved is not None else None
            trusted = admitted - suspect if suspect is not None else admitted
        if suspect is not None and not len(suspect):
            suspect = None                 # the usual case: the index is trusted throughout
        read = 0 if suspect is None else len(suspect)
        n = len(index)
        s = len(trusted)
        sel = s / max(n, 1)
        fetch = _fetch(k, sel)
        if k == 0 or s == 0:
            cand_ids, cand_d = _NO_IDS, _NO_DIST
            name = "ExactVectorScan"
            plan = f"exact numpy scan of the {read} admitted rows read from the snapshot"
        elif no_filter and changed is not None and suspect is None:
            cand_ids, cand_d, plan = _overfetch(index, trusted, q, k, ef, 1.0)
            name, plan = "VectorSearch", "hnsw without filter; " + plan
        elif s * EXACT_ROW_COST <= max(ef, fetch) * CANDIDATE_COST:
            cand_ids, cand_d = _top(*index.scan_set(trusted, q), k)
            name, plan = "ExactVectorScan", f"exact numpy scan of {s} admitted vectors"
        elif fetch > MAX_OVERFETCH:
            cand_ids, cand_d = _rescore(index, _filtered(index, trusted, q, k, ef), q, k)
            name, plan = "VectorSearch", f"hnsw with a filter callable (ef={max(ef, k)})"
        else:
            cand_ids, cand_d, plan = _overfetch(index, trusted, q, k, ef, sel)
            name = "VectorSearch"
    results, later = _finish(source, parts, q, metric, k, cand_ids, cand_d, suspect)
    return results, later, (name, plan, s, n, sel, max(ef, fetch), read, changed is None)


def _why(plan, s, n, sel, walk, read, blind):
    """The explanation of a plan chosen by _indexed (written only when asked for)."""
    if blind:
        note = "the index's change log does not reach this snapshot: every admitted row read"
    else:
        note = f"{read} admitted rows read from the snapshot (own or later writes)"
    return (f"  strategy: {plan}\n  why: {s} admitted of {n} indexed rows (estimated "
            f"selectivity {100 * sel:.2f}%): exact scan ~{s * EXACT_ROW_COST:.0f}us vs graph "
            f"walk ~{walk * CANDIDATE_COST:.0f}us\n  snapshot: {note}")


_UNREAD = object()       # a returned row's value, not decoded yet
_SORT_ALL = 256          # up to this many candidates one lexsort beats a partition first
_NO_IDS = np.empty(0, np.int64)
_NO_DIST = np.empty(0, np.float32)


def _unit(q):
    """The query at unit length (zero stays zero), as hnswlib's cosine space takes it; the
    norm in float64, where no float32 vector's squares overflow."""
    wide = q.astype(np.float64)
    return q * np.float32(1.0 / (math.sqrt(wide.dot(wide)) + 1e-30))


def _top(ids, dist, k):
    """The k smallest by (distance, id), sorted."""
    if len(dist) > max(k, _SORT_ALL):
        bound = np.partition(dist, k - 1)[k - 1]
        keep = dist <= bound                        # keep ties at the bound for the id order
        ids, dist = ids[keep], dist[keep]
    order = np.lexsort((ids, dist))[:k]
    return ids[order], dist[order]


def _rescore(index, labels, q, k):
    """The best k of hnswlib's candidates with numpy's distances from the index's copy, the
    same figures an exact scan gives (so ties and the suspect rows compare alike)."""
    return _top(*index.scan(np.asarray(labels, np.int64), q), k)


def _filtered(index, trusted, q, k, ef):
    return index.search(q, k, ef=max(ef, k), filter=trusted.__contains__)[0]


def _fetch(k, sel):
    """How many neighbours to ask for so that about k of them pass a filter admitting sel."""
    return int(math.ceil(k / max(sel, 1e-9) * OVERFETCH_MARGIN)) + 1


def _overfetch(index, trusted, q, k, ef, sel):
    n = len(index)
    fetch = min(n, _fetch(k, sel))
    while True:
        labels = index.search(q, fetch, ef=max(ef, fetch))[0]
        keep = np.fromiter(map(trusted.__contains__, labels.tolist()), dtype=bool,
                           count=len(labels))
        if keep.sum() >= k or len(labels) < fetch:
            plan = f"hnsw over-fetching {fetch} then filtering (ef={max(ef, fetch)})"
            return (*_rescore(index, labels[keep], q, k), plan)
        if fetch >= n:
            ids, d = _top(*index.scan(trusted.to_numpy(), q), k)
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
    """Merge the trusted candidates (ids and exact distances from the index's copy, which
    equals the snapshot's vector for rows unchanged since the snapshot) with the suspect
    rows (an IdSet, or None), ranked with the snapshot's own vectors. ``(results, read)``:
    the k rows returned as ``(key, value, distance)``, a trusted row's value _UNREAD when
    the source can read it later through ``read`` (key -> value; None: all decoded)."""
    if k == 0:
        return [], None
    rows = {}
    if suspect is not None:
        pairs = [source.row(rid) for rid in suspect]
        keys, values, mat, ok = _snapshot_vectors(pairs, parts, metric, len(q))
        have = np.flatnonzero(ok)
        sus_ids = suspect.to_numpy()[have]
        for j, rid in zip(have.tolist(), sus_ids.tolist()):
            rows[rid] = (keys[j], values[j])
        cand_ids = np.concatenate([cand_ids, sus_ids])
        cand_d = np.concatenate([cand_d, distances(mat, q, metric)])
        cand_ids, cand_d = _top(cand_ids, cand_d, k)
    reader = getattr(source, "value_reader", None)
    read = reader() if reader is not None else None
    out = []
    for rid, d in zip(cand_ids.tolist(), cand_d.tolist()):
        if rid in rows:
            key, value = rows[rid]
        elif read is not None:
            key, value = source.key(rid), _UNREAD
        else:
            key, value = source.row(rid)
        out.append((key, value, d))
    return out, (read if any(value is _UNREAD for _, value, _ in out) else None)


def _scan_items(query, parts, q, metric, k):
    bare = query._derive(_order=None, _limit=None, _offset=0)
    keys, values, mat, ok = _snapshot_vectors(bare.items(), parts, metric, len(q))
    if not len(mat) or k == 0:
        return [], len(mat)
    rows = np.flatnonzero(ok)
    dist = distances(mat, q, metric)
    order = np.lexsort((rows, dist))[:k]
    return [(keys[rows[j]], values[rows[j]], float(dist[j])) for j in order.tolist()], len(mat)
