"""Storage engine benchmark: LogStore beside SQLite (WAL) and LMDB in the same run.

    python benchmarks/storage_benchmark.py [--quick] [--json out.json]

Figures are seconds per operation (medians); ratio = ours / baseline (lower is better).
Real files in a temporary directory, real fsync: the absolute numbers are the disk's.
"""
import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _harness import Row, median_time, print_table, write_json  # noqa: E402

from protobase.storage import AtomBytesCache, LogStore  # noqa: E402

try:
    import lmdb
except ImportError:  # pragma: no cover - optional baseline
    lmdb = None

RECORD = b"r" * 100


class _Dir:
    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="pb-storage-bench-")
        self.n = 0

    def path(self, name):
        self.n += 1
        return os.path.join(self.root, f"{self.n}-{name}")

    @staticmethod
    def remove(path):
        """Delete a run's files at once: a page cache full of dead files makes the next
        run's writes pay for reclaim, which is noise, not the engine."""
        for p in (path, path + "-wal", path + "-shm", path + ".lock"):
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.unlink(p)

    def cleanup(self):
        shutil.rmtree(self.root, ignore_errors=True)


# ---- ours ------------------------------------------------------------------------------

def ours_commits(d, n, durability, threads=1):
    """Seconds per single-record commit, each waited for."""
    path = d.path("pb")
    store = LogStore.open(path, durability=durability)
    per_thread = n // threads

    def work():
        for _ in range(per_thread):
            c = store.begin_commit()
            p = c.write_atom(RECORD)
            c.finish(p).result()

    try:
        t0 = time.perf_counter()
        if threads == 1:
            work()
        else:
            ts = [threading.Thread(target=work) for _ in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return (time.perf_counter() - t0) / (per_thread * threads)
    finally:
        store.close()
        d.remove(path)


def ours_bulk(d, atoms):
    path = d.path("pb")
    store = LogStore.open(path, durability="full")
    try:
        t0 = time.perf_counter()
        c = store.begin_commit()
        ptrs = c.write_atoms(atoms)
        c.finish(ptrs[-1]).result()
        return time.perf_counter() - t0
    finally:
        store.close()
        d.remove(path)


def ours_build_large(path, n_atoms, per_commit=10_000):
    store = LogStore.open(path, durability="none")
    atoms = [RECORD] * per_commit
    for _ in range(n_atoms // per_commit):
        c = store.begin_commit()
        ptrs = c.write_atoms(atoms)
        c.finish(ptrs[-1])
    store.close()


def ours_open(path):
    s = LogStore.open(path)
    s.close()


def ours_open_readonly(path):
    s = LogStore.open(path, readonly=True)
    s.close()


# ---- baselines ---------------------------------------------------------------------------

def sqlite_commits(d, n, synchronous):
    path = d.path("sqlite")
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("pragma journal_mode=wal")
    con.execute(f"pragma synchronous={synchronous}")
    con.execute("create table t(k integer primary key, v blob)")
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            con.execute("begin")
            con.execute("insert into t(v) values (?)", (RECORD,))
            con.execute("commit")
        return (time.perf_counter() - t0) / n
    finally:
        con.close()
        d.remove(path)


def sqlite_bulk(d, atoms):
    path = d.path("sqlite")
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("pragma journal_mode=wal")
    con.execute("pragma synchronous=full")
    con.execute("create table t(k integer primary key, v blob)")
    try:
        t0 = time.perf_counter()
        con.execute("begin")
        con.executemany("insert into t(v) values (?)", ((a,) for a in atoms))
        con.execute("commit")
        return time.perf_counter() - t0
    finally:
        con.close()
        d.remove(path)


def lmdb_commits(d, n):
    path = d.path("lmdb")
    env = lmdb.open(path, map_size=1 << 30, sync=True)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            with env.begin(write=True) as txn:
                txn.put(i.to_bytes(8, "big"), RECORD)
        return (time.perf_counter() - t0) / n
    finally:
        env.close()
        d.remove(path)


def lmdb_bulk(d, atoms):
    path = d.path("lmdb")
    env = lmdb.open(path, map_size=1 << 31, sync=True)
    try:
        keys = [i.to_bytes(8, "big") for i in range(len(atoms))]
        t0 = time.perf_counter()
        with env.begin(write=True) as txn:
            cur = txn.cursor()
            cur.putmulti(zip(keys, atoms), append=True)
        return time.perf_counter() - t0
    finally:
        env.close()
        d.remove(path)


# ---- the run -----------------------------------------------------------------------------

def cache_put_many(ptrs, datas):
    """A fresh commit's atoms into the atom cache (what finish does)."""
    cache = AtomBytesCache(1 << 30)
    payload = sum(map(len, datas))
    t0 = time.perf_counter()
    cache.put_many(ptrs, datas, payload)
    return time.perf_counter() - t0


def dict_update(ptrs, datas):
    d = {}
    t0 = time.perf_counter()
    d.update(zip(ptrs, datas))
    return time.perf_counter() - t0


def cache_hits(store, ptrs):
    """Reads of atoms all in the cache, through the store's C read path."""
    read = store.read_atom
    t0 = time.perf_counter()
    for p in ptrs:
        read(p)
    return time.perf_counter() - t0


def dict_hits(d, ptrs):
    get = d.get
    t0 = time.perf_counter()
    for p in ptrs:
        get(p)
    return time.perf_counter() - t0


def _paired(repeat, *fns):
    """Medians of each fn, run in turn (ours, baseline, ours, ...) so that both sides
    see the same disk weather: fsync latency on a shared machine drifts by the second."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for t, fn in zip(times, fns):
            t.append(fn())
    return [sorted(t)[len(t) // 2] for t in times]


def run(quick=False):
    d = _Dir()
    rows = []
    repeat = 3 if quick else 5
    n_commits = 100 if quick else 300
    n_bulk = 20_000 if quick else 100_000
    n_large = 100_000 if quick else 1_000_000
    have_lmdb = lmdb is not None
    try:
        full1, sq_full, full8 = _paired(
            repeat,
            lambda: ours_commits(d, n_commits, "full"),
            lambda: sqlite_commits(d, n_commits, "full"),
            lambda: ours_commits(d, n_commits * 2, "full", threads=8))
        rows.append(Row("durable commit, 1 thread (full)", full1, "sqlite WAL FULL", sq_full, 1.0))
        if have_lmdb:
            lm = _paired(repeat, lambda: lmdb_commits(d, n_commits))[0]
            rows.append(Row("durable commit, 1 thread (full)", full1, "lmdb sync=True", lm))
        rows.append(Row("durable commit, 8 threads (group commit)", full8,
                        "sqlite FULL 1 thread", sq_full, 1 / 3))

        normal, sq_normal = _paired(
            repeat,
            lambda: ours_commits(d, n_commits * 10, "normal"),
            lambda: sqlite_commits(d, n_commits * 10, "normal"))
        rows.append(Row("commit, 1 thread (normal)", normal, "sqlite WAL NORMAL", sq_normal, 0.5))

        atoms = [os.urandom(100) for _ in range(n_bulk)]
        fns = [lambda: ours_bulk(d, atoms), lambda: sqlite_bulk(d, atoms)]
        if have_lmdb:
            fns.append(lambda: lmdb_bulk(d, atoms))
        bulk, sq_bulk, *lm_bulk = _paired(repeat, *fns)
        if have_lmdb:
            rows.append(Row(f"bulk: {n_bulk} atoms, 1 commit + fsync", bulk, "lmdb 1 txn sync",
                            lm_bulk[0], 0.5))
        rows.append(Row(f"bulk: {n_bulk} atoms, 1 commit + fsync", bulk, "sqlite 1 txn FULL",
                        sq_bulk))

        ptrs = list(range(16, 16 + 108 * n_bulk, 108))
        put, upd = _paired(repeat, lambda: cache_put_many(ptrs, atoms),
                           lambda: dict_update(ptrs, atoms))
        rows.append(Row(f"atom cache: insert a {n_bulk}-atom commit", put,
                        "dict.update, same pairs", upd))
        cpath = d.path("cache")
        store = LogStore.open(cpath, durability="none", bytes_cache_size=1 << 30)
        try:
            c = store.begin_commit()
            cptrs = c.write_atoms(atoms)
            c.finish(cptrs[-1]).result()
            plain = dict(zip(cptrs, atoms))
            hit, dhit = _paired(repeat, lambda: cache_hits(store, cptrs),
                                lambda: dict_hits(plain, cptrs))
        finally:
            store.close()
            d.remove(cpath)
        rows.append(Row(f"atom cache: {n_bulk} hits via read_atom", hit, "dict.get, same keys",
                        dhit))

        large = d.path("large")
        ours_build_large(large, n_large)
        open_t = median_time(lambda: ours_open(large), repeat=7)
        rows.append(Row(f"open a {n_large // 1000}k-atom file (writer)", open_t,
                        "50 ms budget", 0.050, 1.0))
        open_ro = median_time(lambda: ours_open_readonly(large), repeat=7)
        rows.append(Row(f"open a {n_large // 1000}k-atom file (readonly)", open_ro,
                        "50 ms budget", 0.050, 1.0))
    finally:
        d.cleanup()
    print_table("ProtoBase storage engine vs SQLite (WAL) and LMDB", rows)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = run(quick=args.quick)
    if args.json:
        write_json(args.json, rows, benchmark="storage")


if __name__ == "__main__":
    main()
