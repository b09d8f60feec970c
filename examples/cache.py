"""A transactional cache in place of Redis.

What Redis needs MULTI/EXEC or Lua for is a plain transaction here: several keys change
together or not at all, and a read-modify-write (INCR, a transfer between two balances)
cannot lose an update, because a concurrent writer of the same key makes one commit
conflict and ``db.run`` retries it. Expiry: each key may carry a deadline; a
``pb.SortedDict`` keyed ``(deadline, key)`` lets ``expire()`` find what is due in order.
The clock is a parameter, so the example is deterministic.
"""
import os
import tempfile
import threading
from typing import Any, Dict, Iterable, Optional, Tuple

import protobase as pb


class Cache:
    """get/set/delete/incr/mset/transfer with optional time-to-live, over one database."""

    def __init__(self, db: pb.Database):
        self.db = db
        with db.transaction() as tx:
            if "cache" not in tx:
                tx["cache"] = pb.Dict()          # key -> (value, deadline or None)
                tx["deadlines"] = pb.SortedDict()  # (deadline, key) -> None

    @staticmethod
    def _put(tx: pb.Transaction, key: str, value: Any, now: float, ttl: Optional[float]) -> None:
        cache, deadlines = tx["cache"], tx["deadlines"]
        old = cache.get(key)
        if old is not None and old[1] is not None:
            deadlines.pop((old[1], key), None)
        deadline = None if ttl is None else now + ttl
        cache[key] = (value, deadline)
        if deadline is not None:
            deadlines[(deadline, key)] = None

    @staticmethod
    def _live(tx: pb.Transaction, key: str, now: float) -> Optional[Tuple[Any, Optional[float]]]:
        entry = tx["cache"].get(key)
        if entry is None or (entry[1] is not None and entry[1] <= now):
            return None
        return entry

    def set(self, key: str, value: Any, now: float, ttl: Optional[float] = None) -> None:
        self.db.run(self._put, key, value, now, ttl)

    def get(self, key: str, now: float, default: Any = None) -> Any:
        with self.db.transaction(readonly=True) as tx:
            entry = self._live(tx, key, now)
        return default if entry is None else entry[0]

    def mset(self, items: Dict[str, Any], now: float, ttl: Optional[float] = None) -> None:
        """All keys or none (Redis MSET)."""
        def work(tx: pb.Transaction) -> None:
            for k, v in items.items():
                self._put(tx, k, v, now, ttl)
        self.db.run(work)

    def incr(self, key: str, now: float, by: int = 1) -> int:
        def work(tx: pb.Transaction) -> int:
            entry = self._live(tx, key, now)
            value = (0 if entry is None else entry[0]) + by
            self._put(tx, key, value, now, None if entry is None or entry[1] is None
                      else entry[1] - now)
            return value
        return self.db.run(work, retries=1000)

    def transfer(self, src: str, dst: str, amount: int, now: float) -> bool:
        """Move `amount` between two counters atomically; False when src is short."""
        if src == dst:
            return True

        def work(tx: pb.Transaction) -> bool:
            a, b = self._live(tx, src, now), self._live(tx, dst, now)
            have = 0 if a is None else a[0]
            if have < amount:
                return False
            self._put(tx, src, have - amount, now, None)
            self._put(tx, dst, (0 if b is None else b[0]) + amount, now, None)
            return True
        return self.db.run(work, retries=1000)

    def expire(self, now: float) -> Iterable[str]:
        """Delete every key whose deadline has passed; returns them."""
        def work(tx: pb.Transaction) -> list:
            cache, deadlines = tx["cache"], tx["deadlines"]
            due = list(deadlines.irange(maximum=(now, "\U0010ffff")))
            for deadline, key in due:
                del deadlines[(deadline, key)]
                del cache[key]
            return [key for _, key in due]
        return self.db.run(work)


def main(path: str, threads: int = 4, ops: int = 30) -> Dict[str, Any]:
    with pb.open(path) as db:
        cache = Cache(db)
        cache.set("greeting", "hello", now=0.0, ttl=10.0)
        cache.mset({"a": 100, "b": 100, "c": 100}, now=0.0)
        cache.set("token", {"user": "ana"}, now=0.0, ttl=60.0)
        assert cache.get("greeting", now=5.0) == "hello"
        assert cache.get("greeting", now=10.0) is None      # past its deadline: gone

        def worker(n: int) -> None:
            names = ["a", "b", "c"]
            for i in range(ops):
                cache.incr("hits", now=1.0)
                cache.transfer(names[(n + i) % 3], names[(n * i + 1) % 3], 1 + (n + i) % 9, now=1.0)

        workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        hits = cache.get("hits", now=2.0)
        balances = [cache.get(k, now=2.0) for k in "abc"]
        expired = sorted(cache.expire(now=30.0))
        assert hits == threads * ops, "no increment lost"
        assert sum(balances) == 300, "transfers are atomic: money is neither made nor lost"
        assert min(balances) >= 0, "a transfer never overdraws"
        assert expired == ["greeting"]
        assert cache.get("token", now=30.0) == {"user": "ana"}
        with db.transaction(readonly=True) as tx:
            keys = sorted(tx["cache"])
        print(f"hits={hits} after {threads}x{ops} concurrent INCRs; balances {balances} "
              f"(sum {sum(balances)}); expired {expired}; keys now {keys}")
        return {"hits": hits, "balances": balances, "expired": expired, "keys": keys}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(os.path.join(d, "cache.pb"))
