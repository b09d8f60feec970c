"""The core kernels beside their anchors, in one run: hash trie vs dict and immutables,
B+tree vs BTrees.OOBTree and sortedcontainers, persistent list vs list, id sets vs
pyroaring and Python sets.

    python benchmarks/core_benchmark.py [--quick] [--json out.json] [--only hamt,btree]

Each row prints our median beside the baseline's from the same run and the ratio
(ours / baseline: lower is better) with the target from the core issue."""
import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _harness import print_table, write_json  # noqa: E402

KERNELS = ["hamt", "btree", "pvec", "idset"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--json", help="also write every row as JSON here")
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(KERNELS))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else KERNELS
    rows = []
    for name in names:
        part = importlib.import_module(f"bench_{name}").run(quick=args.quick)
        print_table(f"core: {name}", part)
        rows += part
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
