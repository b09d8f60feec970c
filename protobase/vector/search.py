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

A Query object run again while its collection has no writes in the transaction reuses
what its runs found in the (then frozen) snapshot, kept on the query (``Query._memo``, a
_Memo; a derived query starts without): the admitted ids, the keys of rows returned, the
field's spec, the value reader, and, for a set scanned exactly while the change log showed
none of its rows moved after the snapshot, the vectors gathered then. Those are the
snapshot's own vectors, and the snapshot does not change, so later runs rank them without
asking the index or its change log (``_Memo.scans``; small sets only, see _MEMO_BYTES). The
snapshot is frozen while ``unwritten()`` holds: a collection's first write ends it for the
rest of the transaction, and ``where()`` recorded the read already. Runs without such a
scan still ask the change log, so rows a later commit moved in the shared index are read
from the snapshot as above.

Plans for the trusted set, chosen by estimated cost from its size ``s`` against the
index's ``n`` rows (selectivity ``s/n``; constants below):

- ``ExactVectorScan``: gather the admitted vectors from the index's dense copy (or reuse
  those gathered for the same set, see hnsw.py), their distances in one C pass
  (``_core.vkernel.distances``, the one computation of every distance), the k best
  picked in another (``_core.vkernel.top_k``), when ``s`` rows cost less
  than the graph walk would;
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
from typing import Any, Generic, Iterator, List, Tuple, TypeVar

import numpy as np

from ..errors import MissingDependencyError, QueryError, VectorError
from ..query import MISSING, extract
from ..query.expr import All, split_path
from .._core import load
from . import METRICS, as_vector, require_hnswlib
from .hnsw import _BLOCK, distances, normalize

_vk = load("vkernel")

__all__ = ["nearest", "Hits", "EXACT_ROW_COST", "EXACT_WARM_ROW_COST", "CANDIDATE_COST",
           "OVERFETCH_MARGIN", "MAX_OVERFETCH", "DEFAULT_EF"]

# Calibrated with benchmarks/vector_benchmark.py at 100k x 128 on 2 shared cores, each plan
# forced at 1% to 30%: an exact scan costs about EXACT_ROW_COST microseconds per admitted
# row (gathering its vector from the index's dense copy, then one matrix-vector product;
# 0.1-0.4us measured), EXACT_WARM_ROW_COST when the set's vectors are gathered already
# (0.013-0.023us measured, 1k-20k rows), a graph walk about CANDIDATE_COST per neighbour
# asked for (the larger of ef and the over-fetch; 1.5-2us each plus the walk's fixed cost,
# folded in). Cold, they cross near 6% there; warm, near 15%. Over-fetching beat hnswlib's
# filter callable at every selectivity measured (the callable pays a Python call per
# visited node), so the callable is used only where over-fetching would ask for more than
# MAX_OVERFETCH neighbours and an exact scan would still cost more.
EXACT_ROW_COST = 0.13
EXACT_WARM_ROW_COST = 0.02
CANDIDATE_COST = 3.0
OVERFETCH_MARGIN = 1.5
MAX_OVERFETCH = 4096
DEFAULT_EF = 64
# A query object keeps the vectors of an exactly scanned set up to this size (1000 rows of
# 128 floats use half of it); larger sets are left to the index's own gathers.
_MEMO_BYTES = 1 << 20


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


class _Memo:
    """What the runs of one Query object keep while its collection has no writes in the
    transaction (its snapshot is frozen then; see the module's docstring)."""

    __slots__ = ("admitted", "read", "seq", "keys", "specs", "indexes", "scans")

    def __init__(self, admitted, read, seq):
        self.admitted = admitted     # query.matching_ids()
        self.read = read             # the source's value_reader()
        self.seq = seq               # the source's snapshot_seq()
        self.keys = {}               # rowid -> key, the rows returned so far
        self.specs = {}              # field -> vector_spec(field)
        self.indexes = {}            # field -> vector_index(field)
        self.scans = {}              # field -> (metric, index, rowids, vectors, plans): the
                                     # snapshot's vectors; plans: (k, ef, n) -> exact wins

    def keys_of(self, source, ids):
        """The keys of the row ids ``ids`` (a sequence), each looked up once per query
        object."""
        keys = self.keys
        try:
            return [keys[rid] for rid in ids]
        except KeyError:
            missing = [rid for rid in ids if rid not in keys]
            keys.update(zip(missing, source.keys_of(missing)))
            return [keys[rid] for rid in ids]


def _frozen(query):
    """The query's _Memo when its snapshot is still frozen, else None."""
    memo = query._memo
    if memo is not None and query._source.unwritten():
        return memo
    return None


_K = TypeVar("_K")
_V = TypeVar("_V")


class Hits(Generic[_K, _V]):
    """The result of ``nearest()``, computed on first use: iterating yields values in
    ascending distance; ``scored()`` yields ``(key, value, distance)``. Values are decoded
    on first use, each row once."""

    __slots__ = ("_query", "_field", "_spec", "_vector", "_k", "_ef", "_metric", "_keys",
                 "_values", "_dists", "_read", "_explain")

    def __init__(self, query, field, vector, k, ef, metric):
        self._query = query
        self._field = field
        memo = _frozen(query)
        if memo is None:
            spec = _spec(query._source, field)
        else:
            specs = memo.specs
            spec = specs[field] if field in specs else specs.setdefault(
                field, _spec(query._source, field))
        self._spec = spec
        self._metric = metric = metric or (spec["metric"] if spec else "cosine")
        self._vector = _in_space(vector, spec["dim"] if spec else None, metric)  # refused now
        self._k = k
        self._ef = ef
        self._keys = None        # set by the run, with _values, _dists, _read, _explain
        self._values = None      # None: every value still to be read through _read
        self._dists = None
        self._read = None        # key -> value for the rows whose value is not decoded yet
        self._explain = None

    def _run(self):
        """The keys, ascending distance (the search runs on the first call)."""
        if self._keys is None:
            (self._keys, self._values, self._dists, self._read,
             self._explain) = _search(self._query, self._field, self._spec, self._vector,
                                      self._k, self._ef, self._metric)
        return self._keys

    def _decoded(self):
        """The values, each row decoded once and kept."""
        keys = self._run()
        read = self._read
        if read is not None:
            values = self._values
            self._values = ([read(key) for key in keys] if values is None else
                            [read(key) if value is _UNREAD else value
                             for key, value in zip(keys, values)])
            self._read = None
        return self._values

    def __iter__(self) -> Iterator[_V]:
        return iter(self._decoded())

    def scored(self) -> Iterator[Tuple[_K, _V, float]]:
        """``(key, value, distance)`` triples, ascending distance."""
        values = self._decoded()
        return iter(list(zip(self._keys, values, self._dists)))

    def keys(self) -> List[_K]:
        """The keys, ascending distance."""
        return list(self._run())

    def values(self) -> List[_V]:
        """The values, ascending distance."""
        return list(self._decoded())

    def distances(self) -> List[float]:
        """The distances, ascending."""
        self._run()
        return list(self._dists)

    def __len__(self) -> int:
        return len(self._run())

    def __bool__(self) -> bool:
        return bool(self._run())

    def explain(self) -> str:
        """The plan chosen and why, as text."""
        self._run()
        if callable(self._explain):          # written out on demand, not on every query
            self._explain = self._explain()
        return self._explain

    def __repr__(self):
        if self._keys is None:
            return f"<Hits nearest {self._field!r} k={self._k} (not run)>"
        return f"<Hits nearest {self._field!r} k={self._k}: {len(self._keys)} found>"


def _spec(source, field):
    get = getattr(source, "vector_spec", None)
    return get(field) if get is not None else None


# ---------------------------------------------------------------------------- planning

_F32 = np.dtype(np.float32)       # a native float32 array's dtype is this very object


def _in_space(vector, dim, metric):
    """The query vector checked (VectorError when bad) and in index space: a new float32
    array, at unit length for cosine (``_core.vkernel.to_space``: one C call for a float32
    vector of the right shape, the usual case)."""
    if (type(vector) is np.ndarray and vector.dtype is _F32 and vector.ndim == 1
            and len(vector) and (dim is None or len(vector) == dim)):
        out = np.empty(len(vector), np.float32)
        try:
            if _vk.to_space(vector, out, metric == "cosine"):
                return out
        except ValueError:                 # not contiguous: converted below
            pass
    q = as_vector(vector, dim)             # names the bad item, or converts what it may
    out = np.empty(len(q), np.float32)
    _vk.to_space(q, out, metric == "cosine")
    return out


def _search(query, field, spec, qs, k, ef, metric):
    memo = _frozen(query)
    if memo is not None and k:
        scan = memo.scans.get(field)
        if scan is not None and scan[0] == metric:
            found = _rescan(query, memo, scan, field, qs, k, ef or DEFAULT_EF)
            if found is not None:
                return found
    source = query._source
    index = None
    if spec is None:
        why = "no vector index on this field"
    elif metric != spec["metric"]:
        why = f"the index ranks by {spec['metric']}, {metric} was asked for"
    else:
        if memo is None:
            index = source.vector_index(field)
        else:
            indexes = memo.indexes
            index = indexes[field] if field in indexes else indexes.setdefault(
                field, source.vector_index(field))
        why = "hnswlib is not installed"
        if index is None:
            try:
                require_hnswlib()
                why = "the vector index is not committed yet"
            except MissingDependencyError:
                pass
    if index is None:
        keys, values, dists, ranked = _scan_items(query, split_path(field), qs, metric, k)
        if not ranked and spec is None:
            fields = source.vector_fields() if hasattr(source, "vector_fields") else []
            indexed = (f"the fields with a vector index are {', '.join(map(repr, fields))}"
                       if fields else "this collection has no vector index")
            raise QueryError(f"nearest({field!r}): no entry the query selects holds a vector "
                             f"in {field!r} and it has no vector index; {indexed}")
        return keys, values, dists, None, (
            f"ExactVectorScan nearest {field!r} k={k} metric={metric}\n"
            f"  strategy: exact numpy scan of the query's rows\n"
            f"  why: {why}\n  rows ranked: {ranked}")
    keys, values, dists, read, why = _indexed(query, source, index, field, qs, metric, k, ef,
                                              memo)
    return keys, values, dists, read, _explained(field, k, metric, why)


def _indexed(query, source, index, field, q, metric, k, ef, memo):
    """``(keys, values, dists, read, why)`` for a query on an indexed field (the first four
    as _finish gives them); ``_why(*why)`` explains. ``memo``: the query's _Memo when its
    snapshot is frozen (_frozen), else None."""
    written = None
    if memo is None:
        read = source.value_reader() if hasattr(source, "value_reader") else None
        seq = source.snapshot_seq() if hasattr(source, "snapshot_seq") else None
        if read is not None:
            # No writes of its own (value_reader's contract): the query object's first run.
            memo = query._memo = _Memo(query.matching_ids(), read, seq)
            admitted = memo.admitted
        else:
            admitted = query.matching_ids()
            written = source.written_ids() if hasattr(source, "written_ids") else None
    else:
        read, seq, admitted = memo.read, memo.seq, memo.admitted
    no_filter = isinstance(query._pred, All)
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
        reread = 0 if suspect is None else len(suspect)
        n = len(index)
        s = len(trusted)
        sel = s / max(n, 1)
        if k == 0 or s == 0:
            cand_ids, cand_d = [], []
            name = "ExactVectorScan"
            plan = "exact numpy scan of the {read} admitted rows read from the snapshot"
        elif no_filter and changed is not None and suspect is None:
            cand_ids, cand_d, plan = _overfetch(index, trusted, q, k, ef, 1.0)
            name, plan = "VectorSearch", "hnsw without filter; " + plan
        elif _exact_wins(index, trusted, s, k, ef, sel):
            cand_ids, cand_d = index.top_set(trusted, q, k)
            name, plan = "ExactVectorScan", "exact numpy scan of {s} admitted vectors"
            if memo is not None and suspect is None and field not in memo.scans:
                _keep_scan(memo, field, metric, index, trusted)
        elif _fetch(k, sel) > MAX_OVERFETCH:
            cand_ids, cand_d = _rescore(index, _filtered(index, trusted, q, k, ef), q, k)
            name, plan = "VectorSearch", "hnsw with a filter callable (ef={ef})"
        else:
            cand_ids, cand_d, plan = _overfetch(index, trusted, q, k, ef, sel)
            name = "VectorSearch"
    return (*_finish(source, field, q, metric, k, cand_ids, cand_d, suspect, read, memo),
            (name, plan, s, n, sel, k, ef, reread, changed is None))


def _keep_scan(memo, field, metric, index, trusted):
    """Keep on the memo the vectors top_set just gathered for ``trusted`` (every admitted
    row; called under the index's lock with none of them moved after the snapshot, so
    they are the snapshot's own vectors), when they are few enough (else None, so that
    later runs do not ask again)."""
    got = index.gathered(trusted)
    if got is not None and len(got[0]) <= _BLOCK and got[1].nbytes <= _MEMO_BYTES:
        memo.scans[field] = (metric, index, *got, {})
    else:
        memo.scans[field] = None           # the set stays as large: not asked again


def _rescan(query, memo, scan, field, q, k, ef):
    """_search's answer from a scan kept on the memo (the snapshot's own vectors of every
    admitted row), or None when the cost model would not scan exactly now (a larger k,
    or the index grew)."""
    metric, index, rowids, mat, plans = scan
    n = len(index)
    s = len(memo.admitted)
    wins = plans.get((k, ef, n))
    if wins is None:
        wins = plans[k, ef, n] = (s * EXACT_WARM_ROW_COST
                                  <= max(ef, _fetch(k, s / max(n, 1))) * CANDIDATE_COST)
    if not wins:
        return None
    ids, dists = _vk.top_k(distances(mat, q, metric), rowids, k, False)
    why = ("ExactVectorScan", "exact numpy scan of {s} admitted vectors", s, n,
           s / max(n, 1), k, ef, 0, False)
    if not ids:
        return [], [], [], None, _explained(field, k, metric, why)
    return memo.keys_of(query._source, ids), None, dists, memo.read, _explained(
        field, k, metric, why)


def _explained(field, k, metric, why):
    """explain()'s text for a search by the plan ``why`` (as _indexed gives it), written
    out only when asked for."""
    return lambda: f"{why[0]} nearest {field!r} k={k} metric={metric}\n{_why(*why[1:])}"


def _exact_wins(index, trusted, s, k, ef, sel):
    """Whether an exact scan of the ``s`` trusted rows costs less than the graph walk: a
    gather and a product (EXACT_ROW_COST a row), or the product alone when the index
    expects to have the set gathered (EXACT_WARM_ROW_COST a row)."""
    walk = max(ef, _fetch(k, sel)) * CANDIDATE_COST
    if s * EXACT_ROW_COST <= walk:
        return True
    return s * EXACT_WARM_ROW_COST <= walk and index.reused(trusted)


def _why(plan, s, n, sel, k, ef, read, blind):
    """The explanation of a plan chosen by _indexed (written only when asked for; ``plan``
    may name ``{s}``, ``{read}`` and ``{ef}``)."""
    plan = plan.format(s=s, read=read, ef=max(ef, k))
    walk = max(ef, _fetch(k, sel))
    if blind:
        note = "the index's change log does not reach this snapshot: every admitted row read"
    else:
        note = f"{read} admitted rows read from the snapshot (own or later writes)"
    return (f"  strategy: {plan}\n  why: {s} admitted of {n} indexed rows (estimated "
            f"selectivity {100 * sel:.2f}%): exact scan ~{s * EXACT_ROW_COST:.0f}us "
            f"(~{s * EXACT_WARM_ROW_COST:.0f}us with its vectors gathered already) vs graph "
            f"walk ~{walk * CANDIDATE_COST:.0f}us\n  snapshot: {note}")


_UNREAD = object()       # a returned row's value, not decoded yet


def _rescore(index, labels, q, k):
    """The best k of hnswlib's candidates with the distances from the index's copy, the
    same figures an exact scan gives (so ties and the suspect rows compare alike)."""
    return index.top(np.asarray(labels, np.int64), q, k)


def _filtered(index, trusted, q, k, ef):
    return index.search(q, k, ef=max(ef, k), filter=trusted.__contains__)[0]


def _fetch(k, sel):
    """How many neighbours to ask for so that about k of them pass a filter admitting sel."""
    return int(math.ceil(k / max(sel, 1e-9) * OVERFETCH_MARGIN)) + 1


def _overfetch(index, trusted, q, k, ef, sel):
    """The best k of hnswlib's neighbours that the IdSet ``trusted`` admits, asking for
    more until k are found."""
    n = len(index)
    fetch = min(n, _fetch(k, sel))
    while True:
        # hnswlib's recall of its top `fetch` is poor when ef barely exceeds fetch (0.945
        # recall@10 at 30% measured in CI): the walk keeps twice as many candidates.
        walk = max(ef, 2 * fetch)
        labels = index.search(q, fetch, ef=walk)[0]
        keep = type(trusted).from_numpy(labels) & trusted     # order is not needed: top()
        if len(keep) >= k or len(labels) < fetch:             # ranks them again
            plan = f"hnsw over-fetching {fetch} then filtering (ef={walk})"
            return (*index.top(keep.to_numpy(), q, k), plan)
        if fetch >= n:
            ids, d = index.top(trusted.to_numpy(), q, k)
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


def _finish(source, field, q, metric, k, cand_ids, cand_d, suspect, read, memo):
    """Merge the trusted candidates (ids and exact distances from the index's copy, which
    equals the snapshot's vector for rows unchanged since the snapshot) with the suspect
    rows (an IdSet, or None), ranked with the snapshot's own vectors. ``read`` is the
    source's value_reader() (None: decode at once), ``memo`` the query's _Memo when the
    snapshot is frozen (or None). ``(keys, values, dists, read)`` of the k rows returned,
    where a trusted row's value is _UNREAD when it can be read later through ``read``
    (values None: all of them; read None: none of them)."""
    if k == 0:
        return [], [], [], None
    if suspect is None and memo is not None:      # the usual case: trusted rows, read later
        if not len(cand_ids):
            return [], [], [], None
        return memo.keys_of(source, cand_ids), None, cand_d, read
    rows = {}
    if suspect is not None:
        pairs = [source.row(rid) for rid in suspect]
        found, values, mat, ok = _snapshot_vectors(pairs, split_path(field), metric, len(q))
        have = np.flatnonzero(ok)
        sus_ids = suspect.to_numpy()[have]
        for j, rid in zip(have.tolist(), sus_ids.tolist()):
            rows[rid] = (found[j], values[j])
        cand_ids = np.concatenate([np.asarray(cand_ids, np.int64), sus_ids])
        cand_d = np.concatenate([np.asarray(cand_d, np.float32), distances(mat, q, metric)])
        cand_ids, cand_d = _vk.top_k(cand_d, cand_ids, k, False)   # suspect and trusted
    out_keys, out_values = [], []                                  # ids are disjoint
    lazy = False
    for rid in cand_ids:
        if rid in rows:
            key, value = rows[rid]
        elif read is None:
            key, value = source.row(rid)
        else:
            lazy = True
            key = source.key(rid) if memo is None else memo.keys_of(source, [rid])[0]
            value = _UNREAD
        out_keys.append(key)
        out_values.append(value)
    return out_keys, out_values, cand_d, (read if lazy else None)


def _scan_items(query, parts, q, metric, k):
    bare = query._derive(_order=None, _limit=None, _offset=0)
    keys, values, mat, ok = _snapshot_vectors(bare.items(), parts, metric, len(q))
    if not len(mat) or k == 0:
        return [], [], [], len(mat)
    rows = np.flatnonzero(ok)
    dist = distances(mat, q, metric)
    order = np.lexsort((rows, dist))[:k].tolist()
    return ([keys[rows[j]] for j in order], [values[rows[j]] for j in order],
            dist[order].tolist(), len(mat))
