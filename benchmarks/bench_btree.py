"""SortedMap (protobase._core.btree) against BTrees.OOBTree, sortedcontainers and dict.

    python benchmarks/bench_btree.py           # 1M keys
    python benchmarks/bench_btree.py --quick   # 100k keys, fewer rounds

Point lookups are random probes over the whole tree (so cache misses count, as they do
in a real index); ranges are 500 consecutive keys from the middle, materialized into a
list on both sides. Each figure is the median of several rounds, per operation.
"""
import os
import random
import sys
from collections import deque

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _harness import Row, median_time, print_table  # noqa: E402

from protobase._core import load  # noqa: E402

__all__ = ["run"]


def _per_call(fn, calls, repeat):
    fn()                                   # warm: lazily built search shadows, caches
    return median_time(fn, repeat=repeat) / calls


def run(quick=False):
    from BTrees.OOBTree import OOBTree
    from sortedcontainers import SortedDict

    btree = load("btree")
    n = 100_000 if quick else 1_000_000
    repeat = 5 if quick else 7
    rng = random.Random(42)
    keys = list(range(n))
    shuffled = keys[:]
    rng.shuffle(shuffled)

    mut = btree.SortedMap().mutate()
    for k in shuffled:
        mut[k] = k
    ours = mut.finish()
    oob = OOBTree()
    oob.update({k: k for k in keys})
    sd = SortedDict({k: k for k in keys})

    probes = rng.sample(keys, 10_000)

    def gets(f):
        return lambda: deque(map(f, probes), 0)

    rows = []
    t_ours = _per_call(gets(ours.get), len(probes), repeat)
    t_oob = _per_call(gets(oob.get), len(probes), repeat)
    t_sd = _per_call(gets(sd.get), len(probes), repeat)
    rows.append(Row(f"get, {n:,} int keys (random probes)", t_ours, "OOBTree.get", t_oob, target=0.5))

    lo = n // 2
    hi = lo + 499
    t_ours_r = _per_call(lambda: list(ours.irange_items(lo, hi)), 1, repeat * 10)
    t_oob_r = _per_call(lambda: list(oob.items(lo, hi)), 1, repeat * 10)
    t_sd_r = _per_call(lambda: [(k, sd[k]) for k in sd.irange(lo, hi)], 1, repeat * 10)
    t_ours_k = _per_call(lambda: list(ours.irange(lo, hi)), 1, repeat * 10)
    t_oob_k = _per_call(lambda: list(oob.keys(lo, hi)), 1, repeat * 10)
    rows.append(Row(f"range 500 items on {n:,}", t_ours_r, "OOBTree.items()", t_oob_r, target=1.0))
    rows.append(Row(f"range 500 keys on {n:,} (info)", t_ours_k, "OOBTree.keys()", t_oob_k))
    rows.append(Row(f"get, {n:,} int keys (info)", t_ours, "SortedDict.get", t_sd))
    rows.append(Row(f"range 500 items on {n:,} (info)", t_ours_r, "SortedDict.irange", t_sd_r))

    m = 100_000
    build_keys = shuffled[:m]

    def build_ours():
        b = btree.SortedMap().mutate()
        for k in build_keys:
            b[k] = k
        return b.finish()

    def build_dict():
        d = {}
        for k in build_keys:
            d[k] = k
        return d

    rows.append(Row("build 100k (shuffled ints) in one mutation (info)",
                    median_time(build_ours, repeat=max(3, repeat // 3)), "dict inserts",
                    median_time(build_dict, repeat=max(3, repeat // 3))))
    return rows


if __name__ == "__main__":
    print_table("btree: SortedMap", run(quick="--quick" in sys.argv))
