"""Indexed queries beside a list comprehension, a ProtoBase full scan and sqlite3, in one run.

Reproduces the seed benchmark's runs with its flags:

    python benchmarks/indexed_benchmark.py --items 10000 --queries 200 --window 500 \\
        --warmup 20 --categories 200 --statuses 50 --out run_a.json          # Run A
    python benchmarks/indexed_benchmark.py --items 50000 --queries 100 --window 500 \\
        --warmup 20 --categories 500 --statuses 100 --out run_b.json         # Run B

Rows: id (uuid), name, value 1..100000, category, status, created_at, tags. Query:
``category == c AND status == s AND lo < value < lo + window``; PK lookup by ``id``.
The data is committed to a database file and queried in a read transaction. Every path
must return the same rows for every query (checked; a mismatch aborts the run), so no
path can be fast by answering nothing. Ratios are speedups: baseline time / ours.
"""
import argparse
import datetime
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(__file__))
from _harness import machine  # noqa: E402

import protobase as pb  # noqa: E402
from protobase import F  # noqa: E402


def make_rows(n, categories, statuses, seed=42):
    rnd = random.Random(seed)
    base = datetime.datetime(2026, 1, 1)
    return [{"id": str(uuid.UUID(int=rnd.getrandbits(128))), "name": f"item-{i}",
             "value": rnd.randint(1, 100_000), "category": f"c{rnd.randrange(categories)}",
             "status": f"s{rnd.randrange(statuses)}",
             "created_at": base + datetime.timedelta(seconds=rnd.randrange(10**7)),
             "tags": [f"t{rnd.randrange(20)}" for _ in range(rnd.randint(0, 3))]}
            for i in range(n)]


def make_queries(n, rows, window, seed=7):
    """Half the queries copy an existing row's category/status near its value (non-empty
    answers), half are random (mostly empty), as a real workload mixes both."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        r = rnd.choice(rows)
        if i % 2 == 0:
            lo = max(0, r["value"] - rnd.randrange(window))
            out.append((r["category"], r["status"], lo))
        else:
            out.append((r["category"], f"s{rnd.randrange(100)}", rnd.randint(1, 100_000)))
    return out


def timed(fn, queries, warmup):
    for q in queries[:warmup]:
        fn(q)
    lat, answers = [], []
    for q in queries:
        t0 = time.perf_counter()
        res = fn(q)
        lat.append(time.perf_counter() - t0)
        answers.append(res)
    return lat, answers


def summary(lat):
    s = sorted(lat)
    pick = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"p50_us": pick(0.50) * 1e6, "p95_us": pick(0.95) * 1e6, "p99_us": pick(0.99) * 1e6,
            "mean_us": statistics.fmean(lat) * 1e6, "qps": len(lat) / sum(lat)}


def run(args):
    rows = make_rows(args.items, args.categories, args.statuses)
    queries = make_queries(args.queries + args.warmup, rows, args.window)
    warm, queries = queries[:args.warmup], queries[args.warmup:]
    pk_probe = [r["id"] for r in random.Random(3).sample(rows, min(len(rows), args.queries))]
    w = args.window
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "bench.pb")

    db = pb.open(path, durability="none")
    with db.transaction() as tx:
        tx["plain"] = pb.Dict({r["id"]: r for r in rows})
        tx["items"] = pb.Dict({r["id"]: r for r in rows})
    t0 = time.perf_counter()
    with db.transaction() as tx:
        for field in ("category", "status", "value"):
            tx["items"].create_index(field)
    pb_build = time.perf_counter() - t0
    db.close()

    db = pb.open(path, readonly=True)
    tx = db.transaction(readonly=True)
    items, plain = tx["items"], tx["plain"]

    def ids(rs):
        return sorted(r["id"] for r in rs)

    def q_pb(q):
        c, s, lo = q
        return ids(items.where(F.category == c, F.status == s, F.value > lo, F.value < lo + w))

    def q_scan(q):
        c, s, lo = q
        return ids(plain.where(F.category == c, F.status == s, F.value > lo, F.value < lo + w))

    def q_py(q):
        c, s, lo = q
        return ids([r for r in rows if r["category"] == c and r["status"] == s and lo < r["value"] < lo + w])

    con = sqlite3.connect(":memory:")
    con.execute("create table t (id text primary key, name text, value integer, category text, "
                "status text, created_at text, tags text)")
    con.executemany("insert into t values (?,?,?,?,?,?,?)",
                    [(r["id"], r["name"], r["value"], r["category"], r["status"],
                      r["created_at"].isoformat(), json.dumps(r["tags"])) for r in rows])
    con.commit()
    t0 = time.perf_counter()
    for field in ("category", "status", "value"):
        con.execute(f"create index t_{field} on t({field})")
    sq_build = time.perf_counter() - t0
    con2 = sqlite3.connect(":memory:")
    con2.execute("create table t (id text primary key, name text, value integer, category text, "
                 "status text, created_at text, tags text)")
    con2.executemany("insert into t values (?,?,?,?,?,?,?)",
                     con.execute("select * from t").fetchall())
    con2.execute("create index t_csv on t(category, status, value)")
    sql = "select id from t where category = ? and status = ? and value > ? and value < ?"

    def q_sqlite(q):
        c, s, lo = q
        return sorted(x[0] for x in con.execute(sql, (c, s, lo, lo + w)))

    def q_sqlite_c(q):
        c, s, lo = q
        return sorted(x[0] for x in con2.execute(sql, (c, s, lo, lo + w)))

    results = {}
    answers = {}
    for name, fn in [("indexed", q_pb), ("linear", q_scan), ("python", q_py),
                     ("sqlite", q_sqlite), ("sqlite_composite", q_sqlite_c)]:
        for q in warm:
            fn(q)
        lat, ans = timed(fn, queries, 0)
        results[name] = summary(lat)
        answers[name] = ans
    for name, ans in answers.items():
        if ans != answers["python"]:
            bad = next(i for i, (a, b) in enumerate(zip(ans, answers["python"])) if a != b)
            raise SystemExit(f"MISMATCH: {name} answered {ans[bad]!r} for query {queries[bad]!r}; "
                             f"the list comprehension answered {answers['python'][bad]!r}")
    nonempty = sum(1 for a in answers["python"] if a)

    by_id = {r["id"]: r for r in rows}
    pk = {}
    pk_answers = {}
    for name, fn in [("indexed_pk", lambda k: items[k]["id"]),
                     ("linear_pk", lambda k: next(r for r in rows if r["id"] == k)["id"]),
                     ("sqlite_pk", lambda k: con.execute("select id from t where id = ?", (k,)).fetchone()[0]),
                     ("dict_pk", lambda k: by_id[k]["id"])]:
        lat, ans = timed(fn, pk_probe, args.warmup)
        pk[name] = summary(lat)
        pk_answers[name] = ans
    assert all(a == pk_probe for a in pk_answers.values()), "a PK path returned a wrong row"

    ratio = lambda a, b: results[a]["mean_us"] / results[b]["mean_us"]  # noqa: E731
    out = {
        "machine": machine(), "args": vars(args), "queries_with_rows": nonempty,
        "indexed_over_linear": ratio("linear", "indexed"),
        "indexed_over_python": ratio("python", "indexed"),
        "indexed_over_sqlite": ratio("sqlite", "indexed"),
        "indexed_over_sqlite_composite": ratio("sqlite_composite", "indexed"),
        "indexed_pk_over_linear": pk["linear_pk"]["mean_us"] / pk["indexed_pk"]["mean_us"],
        "indexed_pk_over_sqlite_pk": pk["sqlite_pk"]["mean_us"] / pk["indexed_pk"]["mean_us"],
        "index_build_s": pb_build, "sqlite_index_build_s": sq_build,
        "index_build_over_sqlite": pb_build / sq_build,
        "latency": results, "pk_latency": pk,
        "explain": items.where(F.category == queries[0][0], F.status == queries[0][1],
                               F.value > queries[0][2], F.value < queries[0][2] + w).explain(),
    }
    tx.abort()
    db.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--categories", type=int, default=200)
    ap.add_argument("--statuses", type=int, default=50)
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args()
    out = run(args)
    print(f"machine: {out['machine']}")
    for k in ("indexed_over_linear", "indexed_over_python", "indexed_over_sqlite",
              "indexed_over_sqlite_composite", "indexed_pk_over_linear", "indexed_pk_over_sqlite_pk",
              "index_build_s", "sqlite_index_build_s", "index_build_over_sqlite", "queries_with_rows"):
        print(f"{k:32} {out[k]:10.3f}")
    for name, s in {**out["latency"], **out["pk_latency"]}.items():
        print(f"{name:18} p50 {s['p50_us']:9.1f} us  p95 {s['p95_us']:9.1f}  p99 {s['p99_us']:9.1f}  "
              f"qps {s['qps']:10.0f}")
    print(out["explain"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
