"""Vector search: settings and vector validation, the HNSW index (updates, checkpoints,
recovery), and nearest() through the public API — recall against exact brute force at
several selectivities, snapshot isolation, own writes, and numpy-only operation."""
import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import protobase as pb
from protobase import vector
from protobase._core import load
from protobase.errors import VectorError
from protobase.vector import HnswIndex, as_vector, make_spec
from protobase.vector import hnsw, search

IdSet = load("idset").IdSet


# ------------------------------------------------------------------------------ helpers

def clustered(seed, n, dim, clusters=32):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    return (centers[rng.integers(0, clusters, n)]
            + 0.4 * rng.standard_normal((n, dim))).astype(np.float32)


def brute(vectors, q, metric, k):
    """Exact oracle in float64: [(key, distance)] ascending distance, ties by position."""
    keys = list(vectors)
    if not keys:
        return []
    mat = np.array([vectors[key] for key in keys], dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if metric == "l2":
        d = ((mat - q) ** 2).sum(axis=1)
    elif metric == "ip":
        d = 1.0 - mat @ q
    else:
        norms = np.linalg.norm(mat, axis=1) + 1e-30
        d = 1.0 - (mat @ q) / (norms * (np.linalg.norm(q) + 1e-30))
    order = np.lexsort((np.arange(len(keys)), d))[:k]
    return [(keys[i], float(d[i])) for i in order]


def check_exact(hits, oracle):
    """The hits are the oracle's: the same distances in the same order, and the same keys,
    except that among rows at exactly the k-th distance (duplicate vectors) an HNSW plan
    may return any of them (an exact scan breaks such ties by row id)."""
    got = [(key, dist) for key, _, dist in hits.scored()]
    # The oracle sums in float64, the product in float32 (vkernel's fixed lane order): two
    # legitimately different computations, so their figures agree to a tolerance only.
    assert np.allclose([d for _, d in got], [d for _, d in oracle], atol=1e-4)
    assert len({key for key, _ in got}) == len(got)
    bound = oracle[-1][1] - 1e-4 if oracle else 0
    assert [key for key, d in got if d < bound] == [key for key, d in oracle if d < bound]


@pytest.fixture
def plans(monkeypatch):
    """Force a plan by moving the thresholds (so small collections exercise every path)."""
    def force(name):
        values = {"exact": (0.0, 1.0, 10**9), "filtered": (10.0**9, 1.0, 0),
                  "overfetch": (10.0**9, 1.0, 10**9)}[name]
        monkeypatch.setattr(search, "EXACT_ROW_COST", values[0])
        monkeypatch.setattr(search, "EXACT_WARM_ROW_COST", values[0])
        monkeypatch.setattr(search, "CANDIDATE_COST", values[1])
        monkeypatch.setattr(search, "MAX_OVERFETCH", values[2])
    return force


def fill(db, vectors, metric="cosine", **extra):
    with db.transaction() as tx:
        tx["docs"] = pb.Dict()
        docs = tx["docs"]
        docs.create_index("tag")
        docs.create_vector_index("e", dim=len(next(iter(vectors.values()))), metric=metric,
                                 **extra)
        for key, v in vectors.items():
            docs[key] = {"tag": key % 100, "e": [float(x) for x in v]}


def index_of(tx, field="e"):
    return tx["docs"].where()._source.vector_index(field)


# ------------------------------------------------------------------------------ settings

def test_make_spec_is_plain_json_and_refuses_bad_settings():
    spec = make_spec("emb.v", 8, metric="l2", M=12, ef_construction=50)
    assert json.loads(json.dumps(spec)) == spec == {
        "field": "emb.v", "dim": 8, "metric": "l2", "M": 12, "ef_construction": 50}
    for bad in [dict(dim=0), dict(dim=2.0), dict(dim=True), dict(metric="dot"),
                dict(M=1), dict(ef_construction=0), dict(field="")]:
        args = dict(field="e", dim=4) | bad
        with pytest.raises(VectorError):
            make_spec(args.pop("field"), **args)


def test_as_vector_converts_numbers_and_refuses_everything_else():
    v = as_vector([1, 2.5, np.float64(3)], 3)
    assert v.dtype == np.float32 and v.tolist() == [1.0, 2.5, 3.0]
    assert as_vector(np.arange(4, dtype=np.int16)).dtype == np.float32
    bad = [([1.0, 2.0], 3), ([1.0, float("nan"), 2.0], None), ([1.0, float("inf")], None),
           ([1.0, "2"], None), ("abc", None), ([[1.0, 2.0], [3.0, 4.0]], None),
           (np.zeros((2, 2)), None), ([], None), (None, None), ({"a": 1.0}, None),
           ([1.0, None], None), ([1e300, 1.0], None), (np.array(["1"]), None)]
    for value, dim in bad:
        with pytest.raises(VectorError) as info:
            as_vector(value, dim)
        assert isinstance(info.value, ValueError) and str(info.value)


@settings(derandomize=True, max_examples=200)
@given(st.lists(st.one_of(st.integers(-10**6, 10**6), st.floats(width=32)), max_size=6),
       st.integers(0, 6))
def test_as_vector_accepts_exactly_the_finite_vectors_of_the_asked_dimension(items, dim):
    good = bool(items) and len(items) == dim and all(np.isfinite(float(x)) for x in items)
    if good:
        assert as_vector(items, dim).tolist() == [float(np.float32(x)) for x in items]
    else:
        with pytest.raises(VectorError):
            as_vector(items, dim)


# ------------------------------------------------------------------------------ the index

@settings(derandomize=True, max_examples=300)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                          st.floats(-1e3, 1e3), st.sampled_from([3.4028235e38, 3.40282357e38])),
                min_size=1, max_size=12),
       st.sampled_from(["float64", "float32", "list"]), st.sampled_from(["cosine", "l2"]))
def test_query_vectors_reach_index_space_as_as_vector_then_scaling_would(items, kind, metric):
    """The query path (one C call for float32/float64 arrays) accepts and refuses exactly
    what as_vector does, with its message, and gives its vector (scaled for cosine)."""
    if kind == "list":
        value = items
    else:
        with np.errstate(over="ignore"):
            value = np.asarray(items, dtype=kind)
    try:
        expect = as_vector(value, len(items))
        if metric == "cosine":
            wide = expect.astype(np.float64)
            expect = expect * np.float32(1.0 / (np.sqrt(wide.dot(wide)) + 1e-30))
        refused = None
    except VectorError as exc:
        refused = str(exc)
    if refused is not None:
        with pytest.raises(VectorError) as caught:
            search._in_space(value, len(items), metric)
        assert str(caught.value) == refused
        return
    got = search._in_space(value, len(items), metric)
    assert got.dtype == np.float32 and got.shape == expect.shape
    if metric == "l2":
        assert np.array_equal(got, expect)
    else:                                 # the norm's sum may round in another order
        assert np.allclose(got, expect, rtol=4e-7, atol=1e-45)
    if isinstance(value, np.ndarray):
        assert got is not value           # a copy: the caller may change theirs


@settings(derandomize=True, max_examples=300)
@given(st.lists(st.tuples(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 2.0, float("nan"),
                                           float("inf")]), st.integers(0, 10**6)),
                max_size=40, unique_by=lambda p: p[1]),
       st.integers(0, 45), st.booleans())
def test_top_k_kernel_picks_the_smallest_by_distance_then_id(pairs, k, one_minus):
    """vkernel.top_k against numpy's lexsort on many ties, NaN and infinities, ids in
    any order: the same ids, the same float32 distances."""
    top_k = load("vkernel").top_k
    scores = np.array([p[0] for p in pairs], np.float32)
    ids = np.array([p[1] for p in pairs], np.int64)
    with np.errstate(invalid="ignore"):
        dist = np.float32(1.0) - scores if one_minus else scores
    order = np.lexsort((ids, dist))[:k]
    got_ids, got_d = top_k(scores, ids, k, one_minus)
    assert got_ids == ids[order].tolist()
    assert np.array_equal(np.array(got_d, np.float32), dist[order], equal_nan=True)
    assert all(type(d) is float for d in got_d)


def test_kernels_take_only_one_dimensional_contiguous_arrays_of_their_item_type():
    """The kernels read raw buffers: an array of another item type, shape or layout (or a
    read-only output) is refused, never reinterpreted; read-only inputs are fine."""
    vk = load("vkernel")
    scores = np.array([0.5, 0.25, 0.75], np.float32)
    ids = np.array([7, 3, 5], np.int64)
    scores.flags.writeable = ids.flags.writeable = False
    assert vk.top_k(scores, ids, 2, False) == ([3, 7], [0.25, 0.5])
    assert vk.top_k(scores, ids, 5, True) == ([5, 7, 3], [0.25, 0.5, 0.75])
    for bad_scores, bad_ids in ((scores.astype(np.float64), ids), (scores, ids.astype(np.int32)),
                                (scores, ids.astype(np.uint64)), (scores, ids.astype(np.float64)),
                                (np.tile(scores, (2, 1)), ids), (scores, ids[:2]),
                                (np.repeat(scores, 2)[::2], ids), (b"abcdefghijkl", ids)):
        with pytest.raises((ValueError, BufferError)):
            vk.top_k(bad_scores, bad_ids, 2, False)
    with pytest.raises(ValueError):
        vk.top_k(scores, ids, -1, False)
    v = np.array([3.0, 4.0], np.float32)
    out = np.empty(2, np.float32)
    assert vk.to_space(v, out, True) and out.tolist() == [np.float32(0.6), np.float32(0.8)]
    assert vk.to_space64(v.astype(np.float64), out, False) and out.tolist() == [3.0, 4.0]
    assert not vk.to_space(np.array([1.0, np.inf], np.float32), out, False)
    frozen = np.empty(2, np.float32)
    frozen.flags.writeable = False
    for args in ((v.astype(np.float64), out), (v, out.astype(np.float64)), (v, frozen),
                 (v, np.empty(3, np.float32)), (np.repeat(v, 2)[::2], out)):
        with pytest.raises((ValueError, BufferError)):
            vk.to_space(*args, True)
    with pytest.raises(ValueError):
        vk.to_space64(v, out, True)


def test_index_follows_upserts_and_removes_like_brute_force():
    X = clustered(1, 3000, 16)
    ix = HnswIndex.open(make_spec("e", 16, "l2"), None, lambda: iter(()), 0)
    assert ix.origin == "empty" and len(ix) == 0
    live = {}
    for i in range(3000):                        # one at a time: grows past the first capacity
        ix.upsert(i, X[i], seq=1)
        live[i] = X[i]
    rng = np.random.default_rng(2)
    for i in rng.choice(3000, 500, replace=False).tolist():
        ix.remove(i, seq=2)
        del live[i]
    for i in rng.choice(list(live), 300, replace=False).tolist():
        live[i] = X[i] + 5.0
        ix.upsert(i, live[i], seq=3)
    ix.remove(10**6)                             # absent: no error
    assert len(ix) == len(live)
    hits = 0
    for qi in range(50):
        q = X[qi] + 0.01
        labels, dist = ix.knn(q, 10, ef=100)
        oracle = brute(live, q, "l2", 10)
        hits += len(set(labels.tolist()) & {key for key, _ in oracle})
        assert set(labels.tolist()) <= set(live)
        for label, d in zip(labels.tolist(), dist.tolist()):
            assert d == pytest.approx(float(((live[label] - q) ** 2).sum()), rel=1e-4, abs=1e-4)
    assert hits / 500 >= 0.95
    only_even = ix.knn(X[0], 10, ef=50, filter=lambda label: label % 2 == 0)[0]
    assert len(only_even) == 10 and all(label % 2 == 0 for label in only_even.tolist())


def test_changed_since_names_rows_changed_after_a_sequence():
    ix = HnswIndex.open(make_spec("e", 4), None, lambda: iter([(1, [1, 0, 0, 0])]), 5)
    ix.upsert(2, [0, 1, 0, 0], seq=6)
    ix.remove(1, seq=7)
    assert ix.changed_since(4) is None           # older than the state the index was built from
    assert ix.changed_since(5).tolist() == [1, 2]
    assert ix.changed_since(6).tolist() == [1]
    assert ix.changed_since(7).tolist() == []
    ix.upsert(3, [0, 0, 1, 0])                   # no sequence: suspect for every snapshot
    assert ix.changed_since(100).tolist() == [3]


def test_a_failed_commit_keeps_its_rows_suspect_until_written_again():
    ix = HnswIndex.open(make_spec("e", 4), None,
                        lambda: iter([(i, [1, i, 0, 0]) for i in range(3)]), 5)
    ix.begin(6)
    ix.upsert(1, [0, 1, 0, 0], seq=6)            # a commit whose write then fails...
    ix.remove(2, seq=6)
    ix.begin(6)                                  # ...so the next commit reuses its sequence
    ix.upsert(0, [0, 0, 1, 0], seq=6)
    assert ix.changed_since(5).tolist() == [0, 1, 2]
    assert ix.changed_since(6).tolist() == [1, 2]
    assert ix.changed_since(50).tolist() == [1, 2]
    ix.begin(7)
    ix.upsert(1, [1, 1, 0, 0], seq=7)            # written again by a commit that stands
    assert ix.changed_since(7).tolist() == [2]
    big = HnswIndex.open(make_spec("e", 4), None, lambda: iter(()), 5)
    big.begin(6)
    for i in range(5000):                        # more than the log keeps
        big.upsert(i, [1, i, 0, 0], seq=6)
    assert big.changed_since(6).tolist() == []
    big.begin(6)
    assert big.changed_since(6) is None and big.changed_since(100) is None


def test_top_set_matches_brute_force_and_reuses_gathered_vectors_only_until_a_change():
    """Exact top-k of an id set agrees with brute force (ties by id) after every change,
    whether it gathers afresh or reuses what was gathered for an equal set (asked with a
    new IdSet object each time), and what it keeps stays within a quarter of the rows."""
    X = clustered(3, 400, 8)
    ix = HnswIndex.open(make_spec("e", 8, "l2"), None, lambda: ((i, X[i]) for i in range(400)), 1)
    live = {i: X[i] for i in range(400)}
    rng = np.random.default_rng(4)
    sets = [np.sort(rng.choice(450, size, replace=False)) for size in (5, 30, 50, 300)]
    for step in range(40):
        q = rng.standard_normal(8).astype(np.float32)
        for arr in sets:
            expect = [i for i in arr.tolist() if i in live]
            exact = [float(((live[i] - q) ** 2).sum()) for i in expect]
            # The ranking oracle: each row's float32 distance as the index computes it, so
            # near ties order alike; the figures themselves are checked against `exact`.
            same = hnsw.distances(np.array([live[i] for i in expect]).reshape(-1, 8), q, "l2")
            for k in (3, len(arr)):
                order = np.lexsort((expect, same))[:k].tolist()
                for _ in range(2):               # the second time reuses the gathered vectors
                    ids, dist = ix.top_set(IdSet(arr.tolist()), q, k)
                    assert ids == [expect[j] for j in order]
                    assert dist == [float(same[j]) for j in order]
                    assert np.allclose(dist, [exact[j] for j in order], rtol=1e-5, atol=1e-5)
            backwards = arr.astype(np.int64)[::-1].copy()         # top() takes any order
            assert ix.top(backwards, q, 4) == ix.top_set(IdSet(arr.tolist()), q, 4)
        assert sum(len(kept[2]) for kept in ix._gathered.values()) <= len(ix) // 4
        r = int(rng.integers(450))
        if r in live and rng.random() < 0.4:
            ix.remove(r, seq=step + 2)
            del live[r]
        else:
            live[r] = rng.standard_normal(8).astype(np.float32)
            ix.upsert(r, live[r], seq=step + 2)


def test_knn_returns_fewer_rows_rather_than_failing_when_few_match():
    ix = HnswIndex.open(make_spec("e", 4, "ip"), None,
                        lambda: ((i, [float(i), 1.0, 0.0, 0.0]) for i in range(50)), 1)
    labels, dist = ix.knn([1, 0, 0, 0], 10, filter=lambda label: label in (3, 7))
    assert sorted(labels.tolist()) == [3, 7]
    assert dict(zip(labels.tolist(), dist.tolist())) == {3: pytest.approx(-2.0),
                                                        7: pytest.approx(-6.0)}


def test_checkpoint_round_trip_catch_up_and_damage(tmp_path):
    X = clustered(3, 2000, 8)
    spec = make_spec("e", 8, "cosine", M=8, ef_construction=64)
    path = str(tmp_path / "e.hnsw")
    rows = {i: X[i] for i in range(2000)}
    ix = HnswIndex.open(spec, path, lambda: iter(rows.items()), 3)
    assert (ix.origin, ix.reason) == ("rebuilt", "no checkpoint")
    ix.checkpoint(path, 3)
    assert sorted(os.listdir(tmp_path)) == ["e.hnsw"]          # no temporary left behind

    del rows[5]                                  # the log moved on after the checkpoint
    rows[6] = X[6] * -1.0
    rows[5000] = X[7]
    again = HnswIndex.open(spec, path, lambda: iter(rows.items()), 9)
    assert again.origin == "checkpoint" and again.caught_up == 3 and len(again) == 2000
    labels, _ = again.knn(X[6], 5, ef=64)
    assert 6 not in labels.tolist() and 5 not in labels.tolist()
    assert again.knn(X[7], 2, ef=64)[0].tolist() in ([7, 5000], [5000, 7])

    data = bytearray(open(path, "rb").read())
    for damage in (lambda b: b.__setitem__(len(b) // 2, b[len(b) // 2] ^ 0xFF),
                   lambda b: b.__delitem__(slice(len(b) - 100, None)),
                   lambda b: b.__setitem__(slice(0, 8), b"garbage!")):
        broken = bytearray(data)
        damage(broken)
        open(path, "wb").write(bytes(broken))
        fresh = HnswIndex.open(spec, path, lambda: iter(rows.items()), 9)
        assert fresh.origin == "rebuilt" and fresh.reason.startswith("damaged checkpoint")
        assert len(fresh) == len(rows)
        assert fresh.knn(X[6] * -1.0, 1, ef=64)[0].tolist() == [6]
    open(path, "wb").write(bytes(data))
    other = HnswIndex.open(make_spec("e", 8, "l2", M=8, ef_construction=64), path,
                           lambda: iter(rows.items()), 9)
    assert other.origin == "rebuilt" and "settings" in other.reason


# ------------------------------------------------------------------------------ nearest()

def banded(seed, n, dim, clusters, metric):
    """A database whose Dict "docs" holds n clustered vectors "e" and an indexed "band"
    field in 0..999 (selectivity per mille: band < t); returns (db, vectors, bands)."""
    X = clustered(seed, n, dim, clusters=clusters)
    band = np.random.default_rng(seed + 1).integers(0, 1000, n)
    db = pb.open()
    with db.transaction() as tx:
        tx["docs"] = pb.Dict()
        docs = tx["docs"]
        docs.create_index("band")
        docs.create_vector_index("e", dim=dim, metric=metric, M=16, ef_construction=100)
        for i in range(n):
            docs[i] = {"band": int(band[i]), "e": X[i].tolist()}
    return db, X, band


@pytest.fixture(scope="module")
def big():
    """20k x 32 clustered vectors with a ``band`` field, built once for the recall tests."""
    return banded(11, 20_000, 32, 64, "cosine")


@pytest.mark.parametrize("per_mille", [1000, 300, 150, 50, 5, 1])
def test_recall_at_ten_against_brute_force_at_each_selectivity(big, per_mille):
    db, X, band = big
    rng = np.random.default_rng(per_mille)
    admitted = {i: X[i] for i in np.flatnonzero(band < per_mille).tolist()}
    found = total = 0
    with db.transaction(readonly=True) as tx:
        query = tx["docs"].where(pb.F.band < per_mille)
        for qi in rng.integers(0, len(X), 40).tolist():
            q = X[qi] + 0.05 * rng.standard_normal(X.shape[1]).astype(np.float32)
            hits = query.nearest("e", q, k=10)
            oracle = dict(brute(admitted, q, "cosine", 10))
            scored = list(hits.scored())
            assert len(scored) == 10
            for key, value, dist in scored:      # every hit admitted, with its exact distance
                assert value["band"] < per_mille
                exact = brute({key: X[key]}, q, "cosine", 1)[0][1]
                assert dist == pytest.approx(exact, abs=1e-5)
            assert [d for _, _, d in scored] == sorted(d for _, _, d in scored)
            found += len(set(hits.keys()) & set(oracle))
            total += 10
        explain = hits.explain()
    assert found / total >= 0.95, explain
    # 15% is scanned exactly once the filter repeats (its vectors stay gathered); 30% is
    # more than the gather budget (a quarter of the rows) and walks the graph.
    assert ("VectorSearch" if per_mille >= 300 else "ExactVectorScan") in explain


def test_a_repeated_filter_is_scanned_exactly_from_its_gathered_vectors(big):
    """At 20% the first query walks the graph (a gather would cost more); asked again,
    the same admitted set is gathered once and then scanned exactly, exact every time."""
    db, X, band = big
    admitted = {i: X[i] for i in np.flatnonzero(band < 200).tolist()}
    with db.transaction(readonly=True) as tx:
        query = tx["docs"].where(pb.F.band < 200)
        chosen = []
        for qi in (3, 70, 900, 4000):
            hits = query.nearest("e", X[qi], k=10)
            chosen.append(hits.explain().split()[0])
            if chosen[-1] == "ExactVectorScan":
                check_exact(hits, brute(admitted, X[qi], "cosine", 10))
            for key, _, dist in hits.scored():   # the walk's hits: admitted, exact distances
                assert dist == pytest.approx(brute({key: admitted[key]}, X[qi], "cosine", 1)[0][1],
                                             abs=1e-5)
    assert chosen == ["VectorSearch", "ExactVectorScan", "ExactVectorScan", "ExactVectorScan"]


@pytest.mark.parametrize("plan", ["exact", "filtered", "overfetch"])
@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_every_plan_and_metric_gives_hnswlib_distances(plans, plan, metric):
    plans(plan)
    X = clustered(21, 600, 6)
    db = pb.open()
    fill(db, {i: X[i] for i in range(600)}, metric=metric)
    with db.transaction(readonly=True) as tx:
        for qi in range(5):
            admitted = {i: X[i] for i in range(600) if i % 100 < 40}
            hits = tx["docs"].where(pb.F.tag < 40).nearest("e", X[qi] + 0.1, k=5, ef=200)
            check_exact(hits, brute(admitted, X[qi] + 0.1, metric, 5))
        expected = {"exact": "ExactVectorScan", "filtered": "filter callable",
                    "overfetch": "over-fetching"}[plan]
        assert expected in hits.explain()
    ix = HnswIndex.open(make_spec("e", 6, metric), None, lambda: iter([(0, X[0])]), 0)
    assert ix.knn(X[1], 1)[1][0] == pytest.approx(brute({0: X[0]}, X[1], metric, 1)[0][1], rel=1e-5)


def test_ties_are_broken_by_row_id_and_k_limits():
    db = pb.open()
    with db.transaction() as tx:
        tx["docs"] = pb.Dict()
        docs = tx["docs"]
        docs.create_vector_index("e", dim=2, metric="l2")
        for key in ["d", "b", "c", "a"]:            # row ids follow insertion order
            docs[key] = {"e": [1.0, 1.0]}
        docs["far"] = {"e": [9.0, 9.0]}
        docs["none"] = {"other": 1}                 # no vector: never a hit
    with db.transaction() as tx:
        docs = tx["docs"]
        assert docs.nearest("e", [1.0, 1.0], k=4).keys() == ["d", "b", "c", "a"]
        assert docs.nearest("e", [0.0, 0.0], k=10).keys() == ["d", "b", "c", "a", "far"]
        assert list(docs.nearest("e", [0.0, 0.0], k=0)) == []
        assert list(docs.nearest("e", [9.0, 9.0], k=1)) == [{"e": [9.0, 9.0]}]
        with pytest.raises(pb.QueryError):
            docs.nearest("e", [0.0, 0.0], k=-1)


def test_bad_vectors_are_refused_at_write_and_query():
    db = pb.open()
    with db.transaction() as tx:
        tx["docs"] = pb.Dict()
        docs = tx["docs"]
        docs.create_vector_index("e", dim=3)
        docs["ok"] = {"e": [1.0, 2.0, 3.0]}
        for bad in ([1.0, 2.0], [1.0, "x", 3.0], [1.0, float("nan"), 3.0], "abc"):
            with pytest.raises(VectorError):
                docs["bad"] = {"e": bad}
        assert "bad" not in docs
        for bad in ([1.0, 2.0], [float("inf")] * 3, [[1.0, 2.0, 3.0]]):
            with pytest.raises(VectorError):
                docs.nearest("e", bad)
        with pytest.raises(VectorError):
            vector.nearest(docs.where(), "e", [1.0, 2.0, 3.0], metric="dot")


@pytest.mark.parametrize("plan", ["exact", "filtered", "overfetch", "thresholds"])
def test_an_old_snapshot_keeps_its_rows_and_distances_while_a_writer_moves_vectors(plans, plan):
    if plan != "thresholds":
        plans(plan)
    X = clustered(31, 3000, 8)
    db = pb.open()
    fill(db, {i: X[i] for i in range(3000)}, metric="l2")
    q = X[0] + 0.01
    old_rows = {i: X[i] for i in range(3000)}
    reader = db.transaction(readonly=True)
    try:
        everything = reader["docs"].where()
        filtered = reader["docs"].where(pb.F.tag < 50)
        before_all = brute(old_rows, q, "l2", 10)
        check_exact(everything.nearest("e", q, k=10, ef=200), before_all)   # loads the index
        near = [key for key, _ in before_all]
        new_rows = dict(old_rows)
        with db.transaction() as tx:
            docs = tx["docs"]
            docs[near[0]] = {"tag": near[0] % 100, "e": [50.0] * 8}         # moved far away
            new_rows[near[0]] = np.full(8, 50.0, np.float32)
            del docs[near[1]]
            del new_rows[near[1]]
            docs[near[-1]] = {"tag": near[-1] % 100, "e": q.tolist()}   # now the nearest
            new_rows[near[-1]] = q
            docs[9999] = {"tag": 2, "e": (q + 0.001).tolist()}
            new_rows[9999] = q + 0.001
        for _ in range(2):                       # the answer never changes for the old snapshot
            check_exact(everything.nearest("e", q, k=10, ef=200), before_all)
            check_exact(filtered.nearest("e", q, k=10, ef=200),
                        brute({i: v for i, v in old_rows.items() if i % 100 < 50}, q, "l2", 10))
        with db.transaction(readonly=True) as tx:
            check_exact(tx["docs"].nearest("e", q, k=10, ef=200), brute(new_rows, q, "l2", 10))
            check_exact(tx["docs"].where(pb.F.tag < 50).nearest("e", q, k=10, ef=200),
                        _tagged(tx, q))
    finally:
        reader.abort()


def _tagged(tx, q):
    rows = {key: np.asarray(value["e"], np.float32) for key, value in tx["docs"].items()
            if value["tag"] < 50}
    return brute(rows, q, "l2", 10)


@pytest.mark.parametrize("plan", ["exact", "overfetch", "thresholds"])
def test_a_commit_whose_write_failed_leaves_no_trace_in_answers(tmp_path, plans, plan):
    """The index follows a commit before its write fails; the database then reuses the
    sequence. Readers of every later snapshot must still see the committed rows only."""
    from protobase.storage.faults import FaultInjector
    if plan != "thresholds":
        plans(plan)
    X = clustered(61, 2000, 8)
    inj = FaultInjector()
    db = pb.open(str(tmp_path / "db.pb"), file_layer=inj)
    fill(db, {i: X[i] for i in range(2000)}, metric="l2")
    q = X[5] + 0.01
    rows = {i: X[i] for i in range(2000)}
    with db.transaction(readonly=True) as tx:
        near = [key for key, _ in brute(rows, q, "l2", 10)]
        check_exact(tx["docs"].nearest("e", q, k=10, ef=200), brute(rows, q, "l2", 10))
    inj.fail_at = inj.ops + 1                    # the next write to the file fails
    with pytest.raises(pb.StorageError):
        with db.transaction() as tx:
            tx["docs"][near[0]] = {"tag": 0, "e": [90.0] * 8}   # never committed
            del tx["docs"][near[1]]                             # never committed
            tx["docs"][5000] = {"tag": 0, "e": q.tolist()}      # never committed
    inj.heal()
    with db.transaction() as tx:                 # reuses the failed commit's sequence
        tx["docs"][7] = {"tag": 7, "e": (X[7] + 1.0).tolist()}
    rows[7] = X[7] + 1.0
    for _ in range(2):
        with db.transaction(readonly=True) as tx:
            check_exact(tx["docs"].nearest("e", q, k=10, ef=200), brute(rows, q, "l2", 10))
            assert near[0] in tx["docs"].nearest("e", q, k=10, ef=200).keys()
            check_exact(tx["docs"].where(pb.F.tag < 50).nearest("e", q, k=10, ef=200),
                        brute({i: v for i, v in rows.items() if i % 100 < 50}, q, "l2", 10))
    with db.transaction() as tx:                 # written again: the index is right again
        tx["docs"][near[0]] = {"tag": near[0] % 100, "e": X[near[0]].tolist()}
        tx["docs"][near[1]] = {"tag": near[1] % 100, "e": X[near[1]].tolist()}
    with db.transaction(readonly=True) as tx:
        check_exact(tx["docs"].nearest("e", q, k=10, ef=200), brute(rows, q, "l2", 10))
        assert "0 admitted rows read" in tx["docs"].nearest("e", q, k=10).explain()
    db.close()


@pytest.mark.parametrize("plan", ["exact", "filtered", "overfetch", "thresholds"])
def test_own_uncommitted_writes_are_found_and_own_deletes_hidden(plans, plan):
    if plan != "thresholds":
        plans(plan)
    X = clustered(41, 2500, 8)
    db = pb.open()
    fill(db, {i: X[i] for i in range(2500)}, metric="cosine")
    q = X[3] * 1.0
    with db.transaction() as tx:
        docs = tx["docs"]
        docs.nearest("e", q, k=3).keys()          # the shared index is loaded and trusted
        first = docs.nearest("e", q, k=3).keys()
        assert first[0] == 3
        del docs[3]
        docs[777] = {"tag": 7, "e": (q * 2.0).tolist()}            # same direction: distance 0
        docs["new"] = {"tag": 8, "e": (q + 0.01).tolist()}
        mine = {key: np.asarray(value["e"], np.float32) for key, value in docs.items()}
        check_exact(docs.nearest("e", q, k=10, ef=200), brute(mine, q, "cosine", 10))
        filtered = {key: v for key, v in mine.items() if docs[key]["tag"] < 10}
        check_exact(docs.where(pb.F.tag < 10).nearest("e", q, k=10, ef=200),
                    brute(filtered, q, "cosine", 10))
        assert "snapshot" in docs.nearest("e", q).explain()
    with db.transaction(readonly=True) as tx:      # and the commit reached the shared index
        check_exact(tx["docs"].nearest("e", q, k=10, ef=200), brute(mine, q, "cosine", 10))


@pytest.mark.parametrize("plan", ["exact", "filtered", "overfetch", "thresholds"])
def test_one_query_object_run_again_follows_own_writes_and_keeps_its_snapshot(plans, plan):
    """A Query object remembers what its filter selected and its rows' keys only while its
    collection has no writes in the transaction: run again after own writes (a new nearest
    row, a deleted one, one whose tag leaves the filter) it answers for the writes, and in
    a reader it keeps its snapshot while another transaction commits changes."""
    if plan != "thresholds":
        plans(plan)
    X = clustered(43, 2000, 8)
    db = pb.open()
    fill(db, {i: X[i] for i in range(2000)}, metric="cosine")
    q = X[10] * 1.0
    with db.transaction(readonly=True) as reader:
        frozen = reader["docs"].where(pb.F.tag < 20)
        before = [(key, d) for key, _, d in frozen.nearest("e", q, k=8, ef=200).scored()]
        with db.transaction() as tx:
            docs = tx["docs"]
            query = docs.where(pb.F.tag < 20)
            rows = {key: np.asarray(value["e"], np.float32) for key, value in docs.items()
                    if value["tag"] < 20}
            check_exact(query.nearest("e", q, k=8, ef=200), brute(rows, q, "cosine", 8))
            check_exact(query.nearest("e", q, k=8, ef=200), brute(rows, q, "cosine", 8))
            top = query.nearest("e", q, k=3).keys()
            del docs[top[0]]
            docs[top[1]] = {"tag": 50, "e": X[top[1]].tolist()}      # leaves the filter
            docs[5000] = {"tag": 3, "e": (q * 3.0).tolist()}         # distance 0, admitted
            for key in (top[0], top[1]):
                del rows[key]
            rows[5000] = q * 3.0
            hits = query.nearest("e", q, k=8, ef=200)
            check_exact(hits, brute(rows, q, "cosine", 8))
            assert hits.keys()[0] == 5000 and top[0] not in hits.keys()
            assert hits.values()[0]["tag"] == 3
        again = [(key, d) for key, _, d in frozen.nearest("e", q, k=8, ef=200).scored()]
        assert again == before                    # the commit above is not in this snapshot
        assert before[0][0] == top[0]
    with db.transaction(readonly=True) as tx:
        check_exact(tx["docs"].where(pb.F.tag < 20).nearest("e", q, k=8, ef=200),
                    brute(rows, q, "cosine", 8))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_a_query_object_keeps_its_scanned_vectors_only_while_they_are_its_snapshots(plans,
                                                                                   metric):
    """A reader's Query object scanned exactly keeps the admitted vectors (its snapshot's)
    and ranks them again without the index: a commit that moves an admitted row next to
    the query vector, deletes the nearest row and admits a new one changes nothing for it,
    nor for a Query object first run after that commit (the change log makes it read the
    moved rows from the snapshot). A writer's Query object follows its own writes after
    keeping its vectors."""
    plans("exact")
    X = clustered(45, 600, 8)
    db = pb.open()
    fill(db, {i: X[i] for i in range(600)}, metric=metric)
    q = X[20] * 1.0
    snap = {key: X[key] for key in range(600) if key % 100 < 10}
    with db.transaction(readonly=True) as reader:
        kept = reader["docs"].where(pb.F.tag < 10)
        first = [(key, d) for key, _, d in kept.nearest("e", q, k=5).scored()]
        check_exact(kept.nearest("e", q, k=5), brute(snap, q, metric, 5))
        assert kept._memo.scans["e"] is not None         # the path this test is about
        far = max(snap, key=lambda key: float(np.sum((snap[key] - q) ** 2)))
        with db.transaction() as tx:
            docs = tx["docs"]
            docs[far] = {"tag": far % 100, "e": (q * 1.0).tolist()}
            del docs[first[0][0]]
            docs[7000] = {"tag": 1, "e": (q * 1.0).tolist()}
        assert [(key, d) for key, _, d in kept.nearest("e", q, k=5).scored()] == first
        assert [v["e"] for v in kept.nearest("e", q, k=1)] == [X[first[0][0]].tolist()]
        late = reader["docs"].where(pb.F.tag < 10)
        assert [(key, d) for key, _, d in late.nearest("e", q, k=5).scored()] == first
        assert late._memo.scans.get("e") is None         # its rows moved: read, not kept
        assert kept.nearest("e", q, k=5).explain().startswith("ExactVectorScan")
    now = dict(snap)
    now[far] = q * 1.0
    del now[first[0][0]]
    now[7000] = q * 1.0
    with db.transaction() as tx:
        docs = tx["docs"]
        query = docs.where(pb.F.tag < 10)
        check_exact(query.nearest("e", q, k=5), brute(now, q, metric, 5))
        query.nearest("e", q, k=5).keys()
        assert query._memo.scans["e"] is not None
        docs[7000] = {"tag": 50, "e": (q * 1.0).tolist()}        # leaves the filter
        docs[far] = {"tag": far % 100, "e": (-q).tolist()}
        del now[7000]
        now[far] = -q
        check_exact(query.nearest("e", q, k=5), brute(now, q, metric, 5))
        assert 7000 not in query.nearest("e", q, k=5).keys()


def test_one_query_object_on_a_list_answers_positions_of_its_own_state():
    """On a List the keys are positions: a Query object run again after an insert at the
    front answers with the shifted positions, not remembered ones."""
    X = clustered(44, 300, 8)
    db = pb.open()
    with db.transaction() as tx:
        tx["items"] = pb.List()
        items = tx["items"]
        items.create_vector_index("e", dim=8, metric="l2")
        items.extend({"e": X[i].tolist()} for i in range(300))
    q = X[7] * 1.0
    with db.transaction() as tx:
        items = tx["items"]
        query = items.where()
        first = query.nearest("e", q, k=2).keys()
        assert first[0] == 7 and query.nearest("e", q, k=2).keys() == first
        items.insert(0, {"e": (X[7] + 100.0).tolist()})
        assert query.nearest("e", q, k=2).keys() == [first[0] + 1, first[1] + 1]
        assert [v["e"] for v in query.nearest("e", q, k=1)] == [X[7].tolist()]


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("plan", ["exact", "filtered", "overfetch"])
def test_random_histories_match_brute_force_on_every_snapshot(plans, plan, seed):
    """Writers put, move and delete vectors and commit; readers opened along the way must
    keep seeing their snapshot, the writer its own writes, after every single step."""
    plans(plan)
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((8, 4)).astype(np.float32)
    db = pb.open()
    with db.transaction() as tx:
        tx["docs"] = pb.Dict()
        tx["docs"].create_index("tag")
        tx["docs"].create_vector_index("e", dim=4, metric="l2")
    readers = []                                  # (open transaction, the rows it must see)
    tx = db.transaction()
    model = {}
    for step in range(150):
        docs = tx["docs"]
        op = rng.choice(["put", "put", "del", "commit"])
        key, which = int(rng.integers(12)), int(rng.integers(8))
        if op == "put":
            docs[key] = {"tag": key % 3, "e": pool[which].tolist()}
            model[key] = pool[which]
        elif op == "del" and key in model:
            del docs[key]
            del model[key]
        elif op == "commit":
            tx.commit()
            reader = db.transaction(readonly=True)
            reader["docs"].nearest("e", pool[0], k=2).keys()
            readers = readers[-3:] + [(reader, dict(model))]
            tx = db.transaction()
        q = pool[which] + 0.001 * key
        check_exact(tx["docs"].nearest("e", q, k=5), brute(model, q, "l2", 5))
        check_exact(tx["docs"].where(tag=1).nearest("e", q, k=5),
                    brute({k: v for k, v in model.items() if k % 3 == 1}, q, "l2", 5))
        for reader, rows in readers:
            check_exact(reader["docs"].nearest("e", q, k=3), brute(rows, q, "l2", 3))
    tx.abort()
    for reader, _ in readers:
        reader.abort()


def test_a_collection_without_vector_index_is_scanned_exactly():
    X = clustered(51, 300, 5)
    db = pb.open()
    with db.transaction() as tx:
        tx["plain"] = pb.Dict({f"k{i}": {"v": X[i].tolist(), "odd": i % 2} for i in range(300)})
    with db.transaction() as tx:
        plain = tx["plain"]
        plain["novec"] = {"odd": 1}
        hits = plain.where(odd=1).nearest("v", X[7], k=6)
        odd = {f"k{i}": X[i] for i in range(1, 300, 2)}
        check_exact(hits, brute(odd, X[7], "cosine", 6))
        assert "ExactVectorScan" in hits.explain() and "no vector index" in hits.explain()
        l2 = vector.nearest(plain.where(), "v", X[7], k=3, metric="l2")
        check_exact(l2, brute({f"k{i}": X[i] for i in range(300)}, X[7], "l2", 3))
        plain["oops"] = {"v": [1.0, 2.0]}
        with pytest.raises(VectorError, match="oops"):
            plain.where().nearest("v", X[7]).keys()


class _CountingDecode:
    """Wraps a transaction's decoder, counting the values it decodes."""

    def __init__(self, decode):
        self.decode, self.calls = decode, 0

    def __call__(self, raw):
        self.calls += 1
        return self.decode(raw)


@pytest.mark.parametrize("plan", ["exact", "filtered", "overfetch"])
def test_keys_decode_no_value_and_values_decode_each_returned_row_once(plans, plan):
    plans(plan)
    X = clustered(71, 600, 8)
    db = pb.open()
    fill(db, {i: X[i] for i in range(600)})
    q = X[9] + 0.01
    with db.transaction(readonly=True) as tx:
        docs = tx["docs"]
        tx._decode = counting = _CountingDecode(tx._decode)
        hits = docs.where(pb.F.tag < 50).nearest("e", q, k=5, ef=200)
        keys = hits.keys()
        assert len(hits) == 5 and len(hits.distances()) == 5 and hits
        assert counting.calls == 0
        scored = list(hits.scored())
        assert counting.calls == 5
        assert list(hits) == hits.values() == [value for _, value, _ in scored]
        assert [key for key, _, _ in scored] == keys and hits.keys() == keys
        assert [d for _, _, d in scored] == hits.distances()
        assert counting.calls == 5                 # decoded once, kept
        assert [value for _, value, _ in scored] == [docs[key] for key in keys]
        check_exact(hits, brute({i: X[i] for i in range(600) if i % 100 < 50}, q, "cosine", 5))


def test_values_read_after_the_transaction_ended_raise_and_keys_stay():
    X = clustered(72, 300, 8)
    db = pb.open()
    fill(db, {i: X[i] for i in range(300)})
    q = X[4] + 0.01
    with db.transaction(readonly=True) as tx:
        lazy = tx["docs"].nearest("e", q, k=3)
        keys = lazy.keys()
        read = tx["docs"].nearest("e", q, k=3)
        values = read.values()                     # decoded while the transaction is open
        assert values == [tx["docs"][key] for key in keys]
    assert lazy.keys() == keys and len(lazy.distances()) == 3
    for use in (lambda h: h.values(), lambda h: list(h.scored()), lambda h: list(h)):
        with pytest.raises(pb.TransactionClosedError):
            use(lazy)
    assert read.values() == list(read) == values
    with db.transaction(readonly=True) as tx:
        unrun = tx["docs"].nearest("e", q, k=3)
    with pytest.raises(pb.TransactionClosedError):
        unrun.keys()


def test_values_read_later_are_those_of_the_query_not_of_later_writes():
    X = clustered(73, 300, 8)
    db = pb.open()
    fill(db, {i: X[i] for i in range(300)})
    with db.transaction() as tx:
        tx["items"] = pb.List()
        items = tx["items"]
        items.create_vector_index("e", dim=8, metric="l2")
        items.extend({"n": i, "e": X[i].tolist()} for i in range(300))
    q = X[11] + 0.01
    moved = {"tag": 1, "e": X[200].tolist()}
    with db.transaction() as tx:
        docs, items = tx["docs"], tx["items"]
        for written_first in (False, True):        # decoded later, or at once (own writes)
            hits = docs.nearest("e", q, k=4)
            keys = hits.keys()
            assert written_first == (docs._mut is not None)
            before = [docs[key] for key in keys]
            docs[keys[0]] = moved
            del docs[keys[1]]
            assert hits.values() == before
            docs[keys[1]] = before[1]
        listed = items.nearest("e", q, k=4)
        positions = listed.keys()
        assert [items[p]["n"] for p in positions] == \
            [key for key, _ in brute({i: X[i] for i in range(300)}, q, "l2", 4)]
        before = [items[p] for p in positions]
        items.insert(0, {"n": -1, "e": X[0].tolist()})      # every position moves
        assert [value for _, value, _ in listed.scored()] == before


def test_vector_spec_looks_the_field_up_directly_and_normalises_otherwise():
    X = clustered(74, 50, 4)
    db = pb.open()
    fill(db, {i: X[i] for i in range(50)}, metric="l2")
    with db.transaction() as tx:
        docs = tx["docs"]
        source = docs.where()._source
        spec = source.vector_spec("e")
        assert spec == docs.vector_indexes["e"] and spec["metric"] == "l2"
        assert source.vector_spec(("e",)) == spec
        assert source.vector_spec("f") is None and source.vector_spec("e.f") is None
        with pytest.raises(pb.QueryError):
            source.vector_spec("e..f")
        docs.create_vector_index("g", dim=3)       # the working settings answer now
        assert source.vector_spec("g")["dim"] == 3 and source.vector_spec("e") == spec
        tx["fresh"] = pb.Dict({"a": {"e": [1.0]}})
        assert tx["fresh"].where()._source.vector_spec("e") is None


# ------------------------------------------------------------------------------ files

def _vector_files(path):
    return glob.glob(f"{path}-vec-*")


def test_reopen_uses_the_checkpoint_and_recovers_from_damage(tmp_path):
    X = clustered(61, 1500, 8)
    path = str(tmp_path / "db.pb")
    db = pb.open(path)
    fill(db, {i: X[i] for i in range(1500)}, metric="l2")
    with db.transaction(readonly=True) as tx:
        assert index_of(tx).origin == "rebuilt"
        check_exact(tx["docs"].nearest("e", X[1], k=10, ef=100),
                    brute({i: X[i] for i in range(1500)}, X[1], "l2", 10))
    db.close()
    [ckpt] = _vector_files(path)
    saved = open(ckpt, "rb").read()

    db = pb.open(path)
    with db.transaction(readonly=True) as tx:
        assert index_of(tx).origin == "checkpoint" and index_of(tx).caught_up == 0
    rows = {i: X[i] for i in range(1500)}
    with db.transaction() as tx:                 # changes the saved checkpoint does not know
        docs = tx["docs"]
        for i in range(0, 1500, 7):
            del docs[i]
            del rows[i]
        docs[3] = {"tag": 3, "e": (X[1] + 0.001).tolist()}
        rows[3] = X[1] + 0.001
    db.close()

    open(ckpt, "wb").write(saved)                # as if the process died before checkpointing
    db = pb.open(path)
    with db.transaction(readonly=True) as tx:
        ix = index_of(tx)
        assert ix.origin == "checkpoint" and ix.caught_up == len(range(0, 1500, 7)) + 1
        check_exact(tx["docs"].nearest("e", X[1], k=10, ef=100), brute(rows, X[1], "l2", 10))
    db.close()

    for damage in (b"", saved[: len(saved) // 3], saved[:100] + b"\x00" + saved[101:]):
        open(ckpt, "wb").write(damage)
        db = pb.open(path)
        with db.transaction(readonly=True) as tx:
            assert index_of(tx).origin == "rebuilt"
            check_exact(tx["docs"].nearest("e", X[1], k=10, ef=100), brute(rows, X[1], "l2", 10))
        db.close()
    os.unlink(ckpt)
    db = pb.open(path)
    with db.transaction(readonly=True) as tx:
        assert index_of(tx).origin == "rebuilt" and index_of(tx).reason == "no checkpoint"
        check_exact(tx["docs"].nearest("e", X[2], k=10, ef=100), brute(rows, X[2], "l2", 10))
    db.close()


def _run_without_hnswlib(code, env, cwd):
    script = "import sys\nsys.modules['hnswlib'] = None\n" + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_without_hnswlib_indexes_are_refused_and_nearest_is_exact(tmp_path, child_env, child_cwd):
    X = clustered(71, 400, 4)
    path = str(tmp_path / "db.pb")
    db = pb.open(path)
    fill(db, {i: X[i] for i in range(400)}, metric="ip")
    db.close()
    np.save(tmp_path / "x.npy", X)
    out = _run_without_hnswlib(f"""
        import json, numpy as np, protobase as pb
        from protobase import vector
        X = np.load({str(tmp_path / 'x.npy')!r})
        try:
            vector.require_hnswlib()
        except pb.MissingDependencyError as exc:
            assert isinstance(exc, ImportError) and "protobase[vector]" in str(exc)
            print("refused")
        db = pb.open()
        with db.transaction() as tx:
            tx["d"] = pb.Dict({{i: {{"e": X[i].tolist()}} for i in range(400)}})
        with db.transaction() as tx:
            try:
                tx["d"].create_vector_index("e", dim=4)
            except pb.MissingDependencyError:
                print("create refused")
            plain = [k for k, _, _ in tx["d"].nearest("e", X[5], k=5).scored()]
        old = pb.open({path!r})
        with old.transaction(readonly=True) as tx:
            hits = tx["docs"].where(pb.F.tag < 50).nearest("e", X[5], k=5)
            print(json.dumps([plain, [[k, d] for k, _, d in hits.scored()], hits.explain()]))
        """, child_env, child_cwd)
    lines = out.splitlines()
    assert lines[:2] == ["refused", "create refused"]
    plain, scored, explain = json.loads(lines[2])
    assert plain == [key for key, _ in brute({i: X[i] for i in range(400)}, X[5], "cosine", 5)]
    oracle = brute({i: X[i] for i in range(400) if i % 100 < 50}, X[5], "ip", 5)
    assert [k for k, _ in scored] == [k for k, _ in oracle]
    assert np.allclose([d for _, d in scored], [d for _, d in oracle], atol=1e-4)
    assert "ExactVectorScan" in explain and "hnswlib is not installed" in explain
    assert _run_without_hnswlib("""
        import protobase as pb
        from protobase.vector import HnswIndex, make_spec
        try:
            HnswIndex(make_spec("e", 3))
        except pb.MissingDependencyError:
            print("index refused")
        """, child_env, child_cwd) == "index refused\n"


@pytest.mark.slow
def test_recall_at_ten_holds_at_a_larger_size():
    n, dim = 50_000, 64
    db, X, band = banded(81, n, dim, 100, "l2")
    rng = np.random.default_rng(83)
    with db.transaction(readonly=True) as tx:
        for per_mille in (1000, 300, 100, 50, 10, 5, 1):
            admitted = {i: X[i] for i in np.flatnonzero(band < per_mille).tolist()}
            query = tx["docs"].where(pb.F.band < per_mille)
            found = 0
            for qi in rng.integers(0, n, 20).tolist():
                q = X[qi] + 0.05 * rng.standard_normal(dim).astype(np.float32)
                oracle = {key for key, _ in brute(admitted, q, "l2", 10)}
                found += len(set(query.nearest("e", q, k=10).keys()) & oracle)
            assert found / 200 >= 0.95, (per_mille, query.nearest("e", q).explain())


def test_a_sorted_dict_with_keys_in_reverse_row_id_order_is_searched_exactly():
    X = clustered(81, 200, 6)
    db = pb.open()
    with db.transaction() as tx:
        tx["docs"] = sd = pb.SortedDict()
        sd = tx["docs"]
        sd.create_vector_index("e", dim=6, metric="l2")
        for i in range(200):
            sd[1000 - i] = {"e": X[i].tolist(), "tag": i % 4}
        sd.create_index("tag")
    with db.transaction() as tx:
        rows = {1000 - i: X[i] for i in range(200)}
        check_exact(tx["docs"].nearest("e", X[3], k=7), brute(rows, X[3], "l2", 7))
        tagged = {1000 - i: X[i] for i in range(200) if i % 4 == 1}
        check_exact(tx["docs"].where(tag=1).nearest("e", X[3], k=5), brute(tagged, X[3], "l2", 5))


def test_a_key_deleted_and_put_again_in_one_transaction_leaves_no_stale_row_in_hnsw(tmp_path):
    # The re-put row gets a new row id; the old one must leave the shared HNSW index too,
    # or the graph keeps proposing a row no snapshot has (answers stay exact, but every
    # unfiltered query spends candidates on it) and a reopen's catch-up disagrees.
    db = pb.open(str(tmp_path / "v.pb"))
    with db.transaction() as tx:
        tx["docs"] = pb.Dict({i: {"e": [float(i), 1.0, 0.5, 0.25]} for i in range(6)})
        tx["docs"].create_vector_index("e", dim=4, metric="l2")
    with db.transaction() as tx:
        tx["docs"].nearest("e", [0.0, 1.0, 0.5, 0.25], k=1).keys()     # load the index
    (index,) = db._vectors.values()
    with db.transaction() as tx:
        del tx["docs"][4]                                          # first write: a delete
        tx["docs"][4] = {"e": [40.0, 1.0, 0.5, 0.25]}                # same key, new row id
        tx["docs"][2] = {"e": [2.0, 1.0, 0.5, 0.25]}
        del tx["docs"][2]
    assert len(index) == 5
    with db.transaction(readonly=True) as tx:
        hits = tx["docs"].nearest("e", [40.0, 1.0, 0.5, 0.25], k=6)
        assert hits.keys() == [4, 5, 3, 1, 0]
    db.close()


def test_nearest_on_a_field_without_vectors_or_index_is_a_query_error_naming_the_indexed_fields():
    db = pb.open()
    with db.transaction() as tx:
        tx["docs"] = docs = pb.Dict({i: {"tag": i, "e": [float(i), 1.0, 0.5]} for i in range(20)})
        docs.create_vector_index("e", dim=3)
        tx["plain"] = pb.Dict({i: {"v": [float(i), 1.0]} for i in range(5)})
    with db.transaction(readonly=True) as tx:
        with pytest.raises(pb.QueryError, match=r"'nope'.*'e'"):
            list(tx["docs"].nearest("nope", [1.0, 0.0, 0.0]))
        with pytest.raises(pb.QueryError, match="no vector index"):
            tx["plain"].nearest("w", [1.0, 0.0]).keys()
        # a field that holds vectors but has no index still scans exactly
        assert tx["plain"].nearest("v", [4.0, 1.0], k=1, ).keys() == [4]
        assert len(tx["docs"].where(pb.F.tag < 0).nearest("e", [1.0, 0.0, 0.0])) == 0
