"""hamt.Map / hamt.HashSet against dict, set and immutables.Map (same run, same keys).

Run from the repository root:  python benchmarks/bench_hamt.py [--quick]
Lookups probe a shuffled sample of the keys, so both sides pay the same cache misses. Each
comparison alternates single rounds of ours and the baseline and takes the medians, so load
from other processes on a shared machine hits both sides alike.
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))   # a source checkout

from _harness import Row, median_time, print_table  # noqa: E402

import immutables  # noqa: E402

from protobase._core import load  # noqa: E402

hamt = load("hamt")   # refuses a missing or stale build


def _lookup_loop(obj, probe):
    for k in probe:
        obj[k]


def _contains_loop(obj, probe):
    for k in probe:
        k in obj


def _paired(ours, base, n, repeat):
    """Medians (seconds per operation) of `repeat` alternating rounds of ours and base."""
    t_ours, t_base = [], []
    for _ in range(repeat):
        t_ours.append(median_time(ours, repeat=1))
        t_base.append(median_time(base, repeat=1))
    t_ours.sort()
    t_base.sort()
    return t_ours[len(t_ours) // 2] / n, t_base[len(t_base) // 2] / n


def _get_rows(kind, n, nprobe, repeat):
    keys = list(range(n)) if kind == "int" else [f"user:{i:08d}" for i in range(n)]
    d = {k: i for i, k in enumerate(keys)}
    mm = hamt.Map().mutate()
    mm.update(d)
    m = mm.finish()
    im = immutables.Map(d)
    probe = random.Random(1).sample(keys, nprobe)
    ours = lambda: _lookup_loop(m, probe)  # noqa: E731
    t_ours, t_dict = _paired(ours, lambda: _lookup_loop(d, probe), nprobe, repeat)
    t_ours2, t_imm = _paired(ours, lambda: _lookup_loop(im, probe), nprobe, repeat)
    label = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"
    return [
        Row(f"Map get hit, {label} {kind} keys", t_ours, "dict", t_dict, target=1.5),
        Row(f"Map get hit, {label} {kind} keys (info)", t_ours2, "immutables.Map", t_imm),
    ]


def _build_row(n, repeat):
    keys = list(range(n))
    random.Random(2).shuffle(keys)

    def build_dict():
        d = {}
        for k in keys:
            d[k] = k

    def build_ours():
        mm = hamt.Map().mutate()
        for k in keys:
            mm[k] = k
        mm.finish()

    t_ours, t_dict = _paired(build_ours, build_dict, n, repeat)
    return Row(f"build {n // 1000}k int keys in one mutation", t_ours, "dict inserts", t_dict,
               target=3.0)


def _cow_set_row(n, nsets, repeat):
    d = {i: i for i in range(n)}
    m = hamt.Map(d)
    im = immutables.Map(d)
    targets = random.Random(3).sample(range(n), nsets)

    def sets(obj):
        for k in targets:
            obj.set(k, -1)

    t_ours, t_imm = _paired(lambda: sets(m), lambda: sets(im), nsets, repeat)
    label = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"
    return Row(f"one set on a {label} map (copy on write)", t_ours, "immutables.set", t_imm,
               target=1.0)


def _set_membership_row(n, nprobe, repeat):
    keys = [f"member:{i}" for i in range(n)]
    s = set(keys)
    hs = hamt.HashSet(keys)
    probe = random.Random(4).sample(keys, nprobe) + [f"absent:{i}" for i in range(nprobe)]
    t_ours, t_set = _paired(lambda: _contains_loop(hs, probe), lambda: _contains_loop(s, probe),
                            len(probe), repeat)
    return Row(f"HashSet membership, {n // 1000}k str, half miss (info)", t_ours, "set", t_set)


def run(quick=False):
    n = 100_000 if quick else 1_000_000
    nprobe = 20_000 if quick else 200_000
    repeat = 3 if quick else 9
    rows = []
    rows += _get_rows("int", n, nprobe, repeat)
    rows += _get_rows("str", n, nprobe, repeat)
    rows.append(_build_row(100_000 if not quick else 20_000, repeat))
    rows.append(_cow_set_row(n, 5_000 if quick else 20_000, repeat))
    rows.append(_set_membership_row(n // 10, nprobe // 2, repeat))
    return rows


if __name__ == "__main__":
    print_table("hamt: persistent hash trie vs dict / set / immutables", run(quick="--quick" in sys.argv))
