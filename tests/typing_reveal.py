"""A mypy target, not a test module: each `reveal_type(...)` line carries the type mypy must
reveal after `# revealed:`. tests/test_cli.py runs mypy on this file (following imports into
protobase, so the package's own annotations are what is checked) and compares line by line.
It is checked, not run (some lines use handles outside a transaction)."""

import protobase as pb
from protobase import F


def orders(tx: pb.Transaction, user: str) -> int:
    return len(tx["orders"].get(user) or ())


def main() -> None:
    db = pb.open()
    reveal_type(db)  # revealed: protobase.database.Database
    with db as same:
        reveal_type(same)  # revealed: protobase.database.Database
    db = pb.open()
    tx = db.transaction()
    reveal_type(tx)  # revealed: protobase.transaction.Transaction
    with db.transaction() as tx2:
        reveal_type(tx2)  # revealed: protobase.transaction.Transaction
        reveal_type(tx2.root)  # revealed: protobase.collections.Dict[str, Any]
        reveal_type(tx2["x"])  # revealed: Any
        reveal_type(tx2.get("x"))  # revealed: Any | None
        reveal_type(tx2.readonly)  # revealed: bool
        tx2["orders"] = pb.Dict({"ana": [1, 2]})
    reveal_type(db.run(orders, "ana"))  # revealed: int
    reveal_type(db.run(orders, "ana", retries=3))  # revealed: int
    reveal_type(db.transactional(retries=2)(orders))  # revealed: def (user: str) -> int

    prices: pb.Dict[str, int] = pb.Dict({"tea": 3})
    reveal_type(pb.Dict({"tea": 3}))  # revealed: protobase.collections.Dict[str, int]
    reveal_type(prices["tea"])  # revealed: int
    reveal_type(prices.get("tea"))  # revealed: int | None
    reveal_type(prices.copy())  # revealed: dict[str, int]
    reveal_type(list(prices.items()))  # revealed: list[tuple[str, int]]
    q = prices.where(F.price < 10)
    reveal_type(q)  # revealed: protobase.query.query.Query[str, int]
    reveal_type(q.first())  # revealed: int | None
    reveal_type(q.order_by("price").limit(3))  # revealed: protobase.query.query.Query[str, int]
    reveal_type(list(q))  # revealed: list[int]
    reveal_type(q.items())  # revealed: list[tuple[str, int]]
    reveal_type(q.keys())  # revealed: list[str]
    reveal_type(q.count())  # revealed: int
    reveal_type(q.explain())  # revealed: str
    reveal_type(prices.indexes)  # revealed: list[str]

    board: pb.SortedDict[int, str] = pb.SortedDict({1: "a"})
    reveal_type(board.peekitem(0))  # revealed: tuple[int, str]
    reveal_type(board.bisect_left(1))  # revealed: int
    reveal_type(pb.List([1, 2]))  # revealed: protobase.collections.List[int]
    log: pb.List[int] = pb.List([1, 2])
    reveal_type(log[0])  # revealed: int
    reveal_type(log.where().first())  # revealed: int | None
    reveal_type(pb.Set({"x"}))  # revealed: protobase.collections.Set[str]
    tags: pb.Set[str] = pb.Set({"x"})
    reveal_type("x" in tags)  # revealed: bool
    reveal_type(prices.nearest("embedding", [0.5, 0.5], k=2))  # revealed: protobase.vector.search.Hits[str, int]
    reveal_type(list(prices.nearest("embedding", [0.5, 0.5]).scored()))  # revealed: list[tuple[str, int, float]]
    reveal_type(F.price < 10)  # revealed: protobase.query.expr.Predicate
    reveal_type(db.check().problems)  # revealed: list[protobase.storage.store.Problem]
    reveal_type(db.stats())  # revealed: dict[str, Any]
    reveal_type(db.checkpoint())  # revealed: None
    reveal_type(db.compact())  # revealed: dict[str, int]
    reveal_type(db.path)  # revealed: str | None
    try:
        pass
    except pb.ConflictError as exc:
        reveal_type(exc.key)  # revealed: Any
    tx.abort()
    db.close()
