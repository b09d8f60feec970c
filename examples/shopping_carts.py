"""Shopping carts: many threads add items to a few shared carts at once.

Each add is a read-modify-write of one cart, so two shoppers adding to the same cart at the
same moment conflict; ``db.run`` retries the loser on a fresh snapshot, and no item is lost.
Run it: ``python examples/shopping_carts.py``.
"""
import os
import tempfile
import threading
import time
from typing import Any, Dict

import protobase as pb

USERS = ["ana", "ben", "chloe", "dev"]
PRICES = {"tea": 4, "coffee": 6, "cake": 3, "bread": 2}


def add_item(tx: pb.Transaction, user: str, item: str) -> None:
    cart = tx["carts"][user]
    cart["items"].append(item)
    cart["total"] += PRICES[item]
    tx["carts"][user] = cart


def main(path: str, threads: int = 4, adds_per_thread: int = 40) -> Dict[str, Any]:
    with pb.open(path) as db:
        with db.transaction() as tx:
            tx["carts"] = pb.Dict({u: {"items": [], "total": 0} for u in USERS})

        # A conflict by hand: both transactions start from one snapshot.
        first, second = db.transaction(), db.transaction()
        add_item(first, "ana", "tea")
        add_item(second, "ana", "cake")
        first.commit()
        try:
            second.commit()
            raise AssertionError("the second writer of one cart must conflict")
        except pb.ConflictError as exc:
            print(f"conflict on cart {exc.key!r}, as expected; retrying with db.run")
        db.run(add_item, "ana", "cake")

        conflicts_before = db.stats()["conflicts"]

        def shopper(n: int) -> None:
            items = list(PRICES)
            for i in range(adds_per_thread):
                db.run(add_item, USERS[(n + i) % len(USERS)], items[i % len(items)], retries=1000)

        t0 = time.perf_counter()
        workers = [threading.Thread(target=shopper, args=(n,)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0

        with db.transaction(readonly=True) as tx:
            carts = tx["carts"].copy()
        n_items = sum(len(c["items"]) for c in carts.values())
        expected = threads * adds_per_thread + 2
        assert n_items == expected, (n_items, expected)
        for cart in carts.values():
            assert cart["total"] == sum(PRICES[i] for i in cart["items"])
        conflicts = db.stats()["conflicts"] - conflicts_before
        print(f"{threads} threads, {expected - 2} adds in {elapsed:.2f} s, "
              f"{conflicts} conflicts retried, {n_items} items in carts: none lost")
        return {"items": n_items, "expected": expected, "conflicts": conflicts, "carts": carts}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(os.path.join(d, "carts.pb"))
