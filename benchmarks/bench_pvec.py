"""pvec.Vector / VectorMutation against Python's list, in the same run.

    python benchmarks/bench_pvec.py            # full sizes (1M items)
    python benchmarks/bench_pvec.py --quick    # smaller sizes, for a smoke run

Each row times one operation on our vector beside the same operation on a list (the
baseline), and prints the ratio ours / list. A list has no persistent versions, so it is
the ceiling, not a competitor: the interesting figures are how close index, append and
iteration come to it, and how far insert-in-the-middle and slicing beat its O(n).
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _harness import Row, median_time, print_table  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from protobase._core import load  # noqa: E402

pvec = load("pvec")
Vector = pvec.Vector

__all__ = ["run"]


def run(quick=False):
    n = 100_000 if quick else 1_000_000
    reads = 20_000 if quick else 100_000
    appends = 20_000 if quick else 100_000
    repeat = 3 if quick else 7
    rnd = random.Random(42)
    ref = list(range(n))
    vec = Vector(ref)
    idx = [rnd.randrange(n) for _ in range(reads)]
    rows = []

    def index_vec():
        v = vec
        for i in idx:
            v[i]

    def index_list():
        v = ref
        for i in idx:
            v[i]

    rows.append(Row(f"index read (random, n={n:,}) per op",
                    median_time(index_vec, repeat=repeat) / reads, "list[i]",
                    median_time(index_list, repeat=repeat) / reads))

    def append_vec():
        m = Vector().mutate()
        add = m.append
        for i in range(appends):
            add(i)
        return m

    def append_list():
        m = []
        add = m.append
        for i in range(appends):
            add(i)
        return m

    rows.append(Row(f"append {appends:,} in a mutation, per op",
                    median_time(append_vec, repeat=repeat) / appends, "list.append",
                    median_time(append_list, repeat=repeat) / appends))

    def pop_vec(m):
        pop = m.pop
        for _ in range(appends):
            pop()

    def pop_list(m):
        pop = m.pop
        for _ in range(appends):
            pop()

    rows.append(Row(f"pop() {appends:,} from the end, per op",
                    median_time(pop_vec, repeat=repeat, setup=vec.mutate) / appends, "list.pop",
                    median_time(pop_list, repeat=repeat, setup=lambda: list(ref)) / appends))

    inserts = 200

    def insert_vec(m):
        for k in range(inserts):
            m.insert(n // 2 + k, k)

    def insert_list(m):
        for k in range(inserts):
            m.insert(n // 2 + k, k)

    rows.append(Row(f"insert in the middle of {n:,}, per op",
                    median_time(insert_vec, repeat=repeat, setup=vec.mutate) / inserts,
                    "list.insert",
                    median_time(insert_list, repeat=repeat, setup=lambda: list(ref)) / inserts))

    a, b = n // 10, n - n // 7
    rows.append(Row(f"slice v[n/10 : n-n/7] of {n:,}",
                    median_time(lambda: vec[a:b], repeat=repeat, number=20), "list slice",
                    median_time(lambda: ref[a:b], repeat=repeat)))

    def iterate(seq):
        for _ in seq:
            pass

    rows.append(Row(f"iterate {n:,}", median_time(lambda: iterate(vec), repeat=repeat),
                    "for x in list", median_time(lambda: iterate(ref), repeat=repeat)))
    rows.append(Row(f"reversed {n:,}",
                    median_time(lambda: iterate(reversed(vec)), repeat=repeat),
                    "reversed(list)", median_time(lambda: iterate(reversed(ref)), repeat=repeat)))
    rows.append(Row(f"build Vector(list of {n:,})", median_time(lambda: Vector(ref), repeat=repeat),
                    "list(list)", median_time(lambda: list(ref), repeat=repeat)))

    half = vec[: n // 2]
    rows.append(Row(f"concatenate {n // 2:,} + {n:,}",
                    median_time(lambda: half + vec, repeat=repeat, number=20), "list + list",
                    median_time(lambda: ref[: n // 2] + ref, repeat=repeat)))

    def set_vec():
        v = vec
        for i in idx[:1000]:
            v = v.set(i, 0)

    def set_list():   # the list way to keep the old version: copy, then assign
        v = ref
        for i in idx[:20]:
            v = list(v)
            v[i] = 0

    rows.append(Row(f"functional set (new version) of {n:,}, per op",
                    median_time(set_vec, repeat=repeat) / 1000, "list copy + set",
                    median_time(set_list, repeat=repeat) / 20))
    return rows


if __name__ == "__main__":
    print_table("pvec: persistent vector vs list", run(quick="--quick" in sys.argv))
