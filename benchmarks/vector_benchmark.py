"""Filtered nearest-neighbour search: ProtoBase's chosen plan beside the single strategies.

    python benchmarks/vector_benchmark.py [--n 100000 --dim 128 --queries 200] [--quick]
                                          [--json out.json]

Clustered, embedding-like data (cosine), a ``tag`` field uniform in [0, 1000) with a btree
index; the filter ``tag < t`` admits 100%, 30%, 10%, 5%, 1%, 0.5% and 0.1% of the rows.
For each selectivity, in the same run and on the same queries:

- ``hnsw+filter``: hnswlib alone with a filter callable (membership in a Python set);
- ``numpy``: brute force over the admitted rows' vectors (a ready float32 matrix, in
  blocks of 2048 rows: larger products start OpenBLAS threads, ruinous on a busy machine);
- ``postfilter``: hnswlib alone asked for k/selectivity*1.5 neighbours, doubling until k
  admitted ones are found;
- ``protobase``: ``query.nearest("e", q, k=10).keys()`` with ``query = docs.where(F.tag < t)``
  made once in one read transaction and run for every query vector, through the public
  API (snapshot checks and key lookups included); at 100% the query has no filter
  (``docs.where().nearest(...)``).

QPS and recall@10 against exact float64 brute force. Targets: recall >= 0.95 everywhere and
ProtoBase QPS >= 0.8x the best single strategy at every selectivity.

Each strategy's QPS is the best of up to ``--rounds`` passes over the queries, the
strategies taking turns pass by pass (a strategy stops repeating once its passes took
ROUND_BUDGET seconds): on a machine shared with other work a single pass of a few
milliseconds measures mostly the neighbours. Every ProtoBase pass opens its own read
transaction and makes its query object afresh, so each pays its first run's work (the
filter through the btree index, the key lookups) as a single pass would; the vectors the
shared HNSW index gathered for the admitted set stay from the previous pass, as they
would for an application asking the same filter again.

What the single strategies are given outside the timed loop, and what ProtoBase does: the
admitted id set (they get it as a ready array/set; ProtoBase evaluates ``tag < t`` through
the btree index on the query object's first run and reuses it while the collection has no
writes in the transaction), the admitted vectors (numpy gets them as a ready matrix;
ProtoBase gathers them from its dense copy once and reuses the gather until a vector
changes), and the results (they return row numbers; ProtoBase returns keys, so it looks
up the k keys it returns, each once per query object; ``keys()`` decodes no value). They
also check no snapshot: ProtoBase checks the index's change log against the transaction's
snapshot on every query.
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _harness import machine  # noqa: E402

import hnswlib  # noqa: E402
import numpy as np  # noqa: E402

import protobase as pb  # noqa: E402
from protobase.vector import search  # noqa: E402

SELECTIVITIES = (1.0, 0.3, 0.1, 0.05, 0.01, 0.005, 0.001)
K = 10
ROUND_BUDGET = 1.0


def clustered(rng, n, dim, clusters):
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    which = rng.integers(0, clusters, n)
    return (centers[which] + 0.4 * rng.standard_normal((n, dim))).astype(np.float32)


def unit(mat):
    return mat / np.linalg.norm(mat, axis=1, keepdims=True)


def exact_topk(xn, admitted, qn, k):
    d = 1.0 - xn[admitted].astype(np.float64) @ qn.astype(np.float64)
    order = np.lexsort((admitted, d))[:k]
    return admitted[order]


def timed(fn, queries):
    """``(seconds, results)`` of one pass of ``fn`` over the queries."""
    out = []
    t0 = time.perf_counter()
    for q in queries:
        out.append(fn(q))
    return time.perf_counter() - t0, out


def best_of(passes, n_queries, rounds):
    """``{name: (qps, results of its last pass)}``: each pass function (name -> () ->
    (seconds, results)) run in turns, up to ``rounds`` times or ROUND_BUDGET seconds."""
    best, spent, found = {}, {}, {}
    for r in range(rounds):
        for name, run in passes.items():
            if r and spent[name] >= ROUND_BUDGET:
                continue
            seconds, found[name] = run()
            spent[name] = spent.get(name, 0.0) + seconds
            best[name] = max(best.get(name, 0.0), n_queries / seconds)
    return {name: (best[name], found[name]) for name in passes}


def recall(found, truth):
    hits = sum(len(set(map(int, f)) & set(map(int, t))) for f, t in zip(found, truth))
    return hits / max(1, sum(len(t) for t in truth))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ef", type=int, default=search.DEFAULT_EF)
    ap.add_argument("--rounds", type=int, default=20, help="passes per strategy, best kept")
    ap.add_argument("--quick", action="store_true", help="20k x 32, 50 queries")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    if args.quick:
        args.n, args.dim, args.queries = 20_000, 32, 50
    n, dim, ef = args.n, args.dim, args.ef
    rng = np.random.default_rng(7)
    X = clustered(rng, n, dim, max(16, n // 500))
    xn = unit(X)
    tags = rng.integers(0, 1000, n)
    queries = clustered(np.random.default_rng(8), args.queries, dim, max(16, n // 500))
    # float32 like the rows (a float64 query would make numpy's product cast each block)
    queries = X[rng.integers(0, n, args.queries)] + 0.2 * queries / np.sqrt(dim)
    queries = queries.astype(np.float32)
    qn = unit(queries)

    t0 = time.perf_counter()
    alone = hnswlib.Index(space="cosine", dim=dim)
    alone.init_index(max_elements=n, M=16, ef_construction=200, random_seed=100)
    alone.add_items(X, np.arange(n))
    build_alone = time.perf_counter() - t0

    db = pb.open()
    t0 = time.perf_counter()
    with db.transaction() as tx:
        tx["docs"] = pb.Dict()
        docs = tx["docs"]
        docs.create_index("tag")
        docs.create_vector_index("e", dim=dim, metric="cosine")
        for i in range(n):
            docs[i] = {"tag": int(tags[i]), "e": X[i].tolist()}
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    with db.transaction(readonly=True) as tx:
        tx["docs"].nearest("e", queries[0], k=K).keys()          # builds the index
    build_pb = time.perf_counter() - t0
    print(f"{n} x {dim} cosine, {args.queries} queries, k={K}, ef={ef}; {machine()}")
    print(f"load {load:.1f}s; HNSW build: hnswlib alone {build_alone:.1f}s, "
          f"protobase (from the rows) {build_pb:.1f}s")

    rows = []
    head = (f"{'selectivity':>11} | {'hnsw+filter':>17} | {'numpy':>17} | {'postfilter':>17} | "
            f"{'protobase':>17} | {'vs best':>7} | plan")
    print(head)
    print("-" * len(head))
    for sel in SELECTIVITIES:
        limit = max(1, int(round(sel * 1000)))
        admitted = np.flatnonzero(tags < limit).astype(np.int64)
        truth = [exact_topk(xn, admitted, q, K) for q in qn]
        allowed = set(admitted.tolist())
        sub = xn[admitted]

        def with_filter(q):
            try:
                return alone.knn_query(q, k=K, num_threads=1, filter=allowed.__contains__)[0][0]
            except RuntimeError:
                return np.empty(0, np.int64)

        def brute(q):
            d = np.concatenate([1.0 - sub[lo:lo + 2048] @ q for lo in range(0, len(sub), 2048)])
            cut = np.argpartition(d, K - 1)[:K] if len(d) > K else np.arange(len(d))
            return admitted[cut[np.argsort(d[cut])]]

        def post(q):
            fetch = min(n, int(math.ceil(K / (len(admitted) / n) * 1.5)) + 1)
            while True:
                alone.set_ef(max(ef, fetch))
                try:
                    labels = alone.knn_query(q, k=fetch, num_threads=1)[0][0]
                except RuntimeError:           # the graph reached fewer than fetch rows
                    return brute(q)
                keep = labels[np.isin(labels, admitted, assume_unique=True)]
                if len(keep) >= K or fetch >= n:
                    return keep[:K]
                fetch = min(n, fetch * 2)

        def ours_pass():
            with db.transaction(readonly=True) as tx:
                docs = tx["docs"]
                query = docs.where() if sel == 1.0 else docs.where(pb.F.tag < limit)

                def ours(q):
                    return query.nearest("e", q, k=K, ef=ef).keys()

                return timed(ours, queries)

        def filter_pass():
            alone.set_ef(max(ef, K))           # postfilter's passes leave it larger
            return timed(with_filter, queries)

        passes = {"hnsw+filter": filter_pass, "numpy": lambda: timed(brute, queries),
                  "postfilter": lambda: timed(post, queries), "protobase": ours_pass}
        results = {name: (qps, recall(found, truth))
                   for name, (qps, found) in best_of(passes, len(queries), args.rounds).items()}
        with db.transaction(readonly=True) as tx:
            docs = tx["docs"]
            query = docs.where() if sel == 1.0 else docs.where(pb.F.tag < limit)
            hits = query.nearest("e", queries[0], k=K, ef=ef)
            plan = hits.explain().splitlines()[1].split(":", 1)[1].strip()
        best = max(results[s][0] for s in ("hnsw+filter", "numpy", "postfilter"))
        ratio = results["protobase"][0] / best
        cells = " | ".join(f"{results[s][0]:8.0f} q/s {results[s][1]:.3f}"
                           for s in ("hnsw+filter", "numpy", "postfilter", "protobase"))
        print(f"{100 * sel:10.1f}% | {cells} | {ratio:6.2f}x | {plan}")
        rows.append({"selectivity": sel, "admitted": int(len(admitted)), "plan": plan,
                     "ratio_vs_best": ratio,
                     **{s: {"qps": r[0], "recall": r[1]} for s, r in results.items()}})
    ok_recall = all(r["protobase"]["recall"] >= 0.95 for r in rows)
    ok_speed = all(r["ratio_vs_best"] >= 0.8 for r in rows)
    print(f"targets: recall >= 0.95 {'met' if ok_recall else 'MISSED'}; "
          f"QPS >= 0.8x best single strategy {'met' if ok_speed else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "n": n, "dim": dim, "queries": args.queries,
                       "ef": ef, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
