"""A mypy target, not a test module (pytest collects only test_*.py): it exercises the
public API with annotations, so `python -m mypy examples tests/typing_check.py` proves a
typed program can use protobase as documented. It also runs: `python tests/typing_check.py`."""
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import protobase as pb
from protobase import F


def add_to_cart(tx: pb.Transaction, user: str, item: str) -> int:
    cart: Dict[str, Any] = tx["carts"].get(user) or {"items": []}
    cart["items"].append(item)
    tx["carts"][user] = cart
    return len(cart["items"])


def cheapest(tx: pb.Transaction, limit: int) -> List[Tuple[Any, Any]]:
    q: pb.Query = tx["products"].where(F.price < 10, category="books")
    return list(q.order_by("price").limit(limit).items())


def main(path: Optional[str] = None) -> Dict[str, Any]:
    db: pb.Database = pb.open(path, durability="normal") if path else pb.open()
    with db:
        with db.transaction() as tx:
            tx["carts"] = pb.Dict()
            tx["products"] = pb.Dict({i: {"category": "books" if i % 2 else "games",
                                          "price": i} for i in range(20)})
            tx["products"].create_index("price")
            tx["board"] = pb.SortedDict({(-3, "a"): "a"})
            tx["tags"] = pb.Set({"x"})
            tx["log"] = pb.List([1])
        n: int = db.run(add_to_cart, "ana", "tea", retries=5)

        @db.transactional(retries=3)
        def bump(tx: pb.Transaction) -> None:
            tx["log"].append(len(tx["log"]) + 1)

        bump()
        tx2: pb.Transaction = db.transaction(readonly=True, isolation="serializable")
        try:
            rows = cheapest(tx2, 3)
            plan: str = tx2["products"].where(F.price.between(1, 5)).explain()
            leader: Tuple[Any, Any] = tx2["board"].peekitem(0)
            log: List[int] = list(tx2["log"])
        finally:
            tx2.abort()
        try:
            with db.transaction() as tx:
                tx["bad"] = lambda: None
        except pb.SerializationError as exc:
            bad: Optional[str] = exc.type_name
        report = db.check()
        problems: List[Any] = list(report.problems)
        stats: Dict[str, Any] = db.stats()
    return {"n": n, "rows": rows, "plan": plan, "leader": leader, "log": log, "bad": bad,
            "problems": problems, "commits": stats["commits"]}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        out = main(d + "/typing.pb")
        assert out["n"] == 1 and out["log"] == [1, 2] and out["problems"] == []
        assert [k for k, _ in out["rows"]] == [1, 3, 5] and out["leader"] == ((-3, "a"), "a")
        print(out["plan"])
