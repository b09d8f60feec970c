"""Transactions through the public API, beside dict, LMDB+pickle and sqlite3 in one run.

    python benchmarks/txn_benchmark.py [--quick] [--json out.json]

Rows (ours / baseline, lower is better; targets from the transactions issue):
- random point reads through a transaction handle on a 100k-record Dict vs LMDB+pickle
  (target <= 1/1.5: at least 1.5x LMDB's reads/s), also vs dict and sqlite3 for context;
- writing 100k keys in one transaction (encoding included) vs the same dict inserts (<= 4);
- durable commits/s at 1 and 8 threads in "full" and "normal" mode vs sqlite3 (WAL).
"""
import argparse
import os
import pickle
import random
import sqlite3
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Row, median_time, print_table, write_json  # noqa: E402

import protobase as pb  # noqa: E402

N = 100_000
READS = 100_000


def _record(i):
    return {"name": f"user{i}", "score": i % 1000, "tags": ["a", "b"]}


def bench_reads(n, reads, tmp):
    keys = [f"k{i}" for i in range(n)]
    probe = [random.Random(7).choice(keys) for _ in range(reads)]
    plain = {k: _record(i) for i, k in enumerate(keys)}

    db = pb.open(os.path.join(tmp, "reads.pb"), durability="none")
    with db.transaction() as tx:
        tx["users"] = d = pb.Dict()
        d = tx["users"]
        for i, k in enumerate(keys):
            d[k] = _record(i)

    def ours():
        with db.transaction(readonly=True) as tx:
            get = tx["users"].__getitem__
            for k in probe:
                get(k)

    def py():
        get = plain.__getitem__
        for k in probe:
            get(k)

    import lmdb
    env = lmdb.open(os.path.join(tmp, "lmdb"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for k, v in plain.items():
            txn.put(k.encode(), pickle.dumps(v))

    def lm():
        with env.begin() as txn:
            for k in probe:
                pickle.loads(txn.get(k.encode()))

    con = sqlite3.connect(os.path.join(tmp, "reads.sqlite"))
    con.execute("create table t (k text primary key, v blob)")
    con.executemany("insert into t values (?, ?)", ((k, pickle.dumps(v)) for k, v in plain.items()))
    con.commit()

    def sq():
        cur = con.cursor()
        for k in probe:
            pickle.loads(cur.execute("select v from t where k = ?", (k,)).fetchone()[0])

    t_ours, t_py, t_lm, t_sq = (median_time(f, repeat=5) / reads for f in (ours, py, lm, sq))
    db.close()
    env.close()
    con.close()
    return [Row("point read via tx handle (100k Dict)", t_ours, "LMDB+pickle", t_lm, target=1 / 1.5),
            Row("point read via tx handle (100k Dict)", t_ours, "dict", t_py),
            Row("point read via tx handle (100k Dict)", t_ours, "sqlite3 pk select", t_sq)]


def bench_bulk_write(n):
    keys = [f"k{i}" for i in range(n)]
    values = [_record(i) for i in range(n)]
    db = pb.open()

    def ours():
        with db.transaction() as tx:
            tx["bulk"] = pb.Dict()
            d = tx["bulk"]
            for k, v in zip(keys, values):
                d[k] = v

    def py():
        d = {}
        for k, v in zip(keys, values):
            d[k] = v

    return [Row(f"write {n // 1000}k keys in one transaction", median_time(ours, repeat=5) / n,
                "dict inserts", median_time(py, repeat=5) / n, target=4)]


def _commits_per_second(db, threads, per_thread):
    with db.transaction() as tx:
        tx["c"] = pb.Dict()

    def worker(t):
        for i in range(per_thread):
            with db.transaction() as tx:
                tx["c"][(t, i)] = i

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return threads * per_thread / (time.perf_counter() - t0)


def _sqlite_commits_per_second(path, synchronous, count):
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("pragma journal_mode=wal")
    con.execute(f"pragma synchronous={synchronous}")
    con.execute("create table if not exists c (k integer primary key, v integer)")
    t0 = time.perf_counter()
    for i in range(count):
        con.execute("begin")
        con.execute("insert or replace into c values (?, ?)", (i, i))
        con.execute("commit")
    rate = count / (time.perf_counter() - t0)
    con.close()
    return rate


def bench_commits(tmp, quick):
    count = 200 if quick else 1000
    rows = []
    sq_full = _sqlite_commits_per_second(os.path.join(tmp, "full.sqlite"), "FULL", count)
    sq_normal = _sqlite_commits_per_second(os.path.join(tmp, "normal.sqlite"), "NORMAL", count * 4)
    for mode, threads, base_name, base, target in [
            ("full", 1, "sqlite FULL 1 thread", sq_full, 1.0),
            ("full", 8, "sqlite FULL 1 thread", sq_full, 1 / 3),
            ("normal", 1, "sqlite NORMAL 1 thread", sq_normal, 0.5),
            ("normal", 8, "sqlite NORMAL 1 thread", sq_normal, None)]:
        db = pb.open(os.path.join(tmp, f"c-{mode}-{threads}.pb"), durability=mode)
        per_thread = max(1, (count * (4 if mode == "normal" else 1)) // threads)
        rate = _commits_per_second(db, threads, per_thread)
        db.close()
        # Rows compare time per commit, so a rate twice the baseline's is a ratio of 0.5.
        rows.append(Row(f"commit, {mode}, {threads} thread(s)", 1 / rate, base_name, 1 / base, target=target))
    return rows


def run(quick=False):
    n = 20_000 if quick else N
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_reads(n, n, tmp)
        rows += bench_bulk_write(n)
        rows += bench_commits(tmp, quick)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()
    rows = run(args.quick)
    print_table("ProtoBase transactions", rows)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
