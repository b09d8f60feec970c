"""IdSet set algebra against pyroaring (the C Roaring library) and Python's own set.

Dense data, as row ids are: n random ids drawn from [0, 4n), so every 65536-id container
holds about 16k ids and is a bitmap. Each figure is the median of repeated runs, printed
beside its baseline measured in the same run on the same data.

    python benchmarks/bench_idset.py            # full run (installed package)
    python benchmarks/bench_idset.py --quick    # fewer repeats
    PYTHONPATH=. python benchmarks/bench_idset.py   # from a source checkout
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Row, median_time, print_table  # noqa: E402

import numpy as np  # noqa: E402
import pyroaring  # noqa: E402

from protobase._core import load  # noqa: E402

IdSet = load("idset").IdSet


def _dense(n, seed):
    return np.random.default_rng(seed).integers(0, 4 * n, n)


def _pair_rows(n, label, repeat):
    a, b = _dense(n, 1), _dense(n, 2)
    x, y = IdSet.from_numpy(a), IdSet.from_numpy(b)
    px, py = pyroaring.BitMap(a), pyroaring.BitMap(b)
    assert len(x & y) == len(px & py) and len(x | y) == len(px | py)
    number = max(1, 2_000_000 // (n * 4))
    rows = []
    for op, ours, theirs in (("AND", lambda: x & y, lambda: px & py),
                             ("OR", lambda: x | y, lambda: px | py)):
        rows.append(Row(f"{op} {label}x{label} dense", median_time(ours, repeat=repeat, number=number),
                        f"pyroaring {op}", median_time(theirs, repeat=repeat, number=number), target=2))
    return rows, (x, y, px, py)


def run(quick=False):
    repeat = 5 if quick else 15
    rows = []
    small_rows, _ = _pair_rows(100_000, "100k", repeat)
    big_rows, (x, y, px, py) = _pair_rows(1_000_000, "1M", repeat)
    rows += small_rows + big_rows

    # Skewed: 1k ids against 1M; Python's set & probes the smaller set into the larger.
    small = _dense(1_000, 3) * 1000
    big = _dense(1_000_000, 4)
    s_small, s_big = IdSet.from_numpy(small), IdSet.from_numpy(big)
    p_small, p_big = set(small.tolist()), set(big.tolist())
    assert len(s_small & s_big) == len(p_small & p_big)
    rows.append(Row("skewed AND 1k x 1M", median_time(lambda: s_small & s_big, repeat=repeat, number=200),
                    "Python set &", median_time(lambda: p_small & p_big, repeat=repeat, number=200),
                    target=1.0))

    assert x.intersection_count(y) == px.intersection_cardinality(py)
    rows.append(Row("intersection_count 1M x 1M",
                    median_time(lambda: x.intersection_count(y), repeat=repeat, number=20),
                    "pyroaring card.", median_time(lambda: px.intersection_cardinality(py),
                                                   repeat=repeat, number=20)))
    return rows


if __name__ == "__main__":
    print_table("IdSet set algebra", run(quick="--quick" in sys.argv))
