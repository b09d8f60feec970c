"""A social graph with shared collections.

Each user's friends are a ``pb.Set``. A friendship is stored once per side, and a user's
"close friends" circle *is* their friend set stored in a second place (a groups table):
one object, not a copy, so an edit through either path shows through the other. Cycles
(ana's set holds ben, ben's set holds ana) are ordinary: collections are stored by
reference.
"""
import os
import tempfile
from typing import Any, Dict, List, Set

import protobase as pb


def befriend(tx: pb.Transaction, a: str, b: str) -> None:
    users = tx["users"]
    users[a]["friends"].add(b)
    users[b]["friends"].add(a)


def mutual(tx: pb.Transaction, a: str, b: str) -> Set[str]:
    users = tx["users"]
    return set(users[a]["friends"] & users[b]["friends"])


def suggestions(tx: pb.Transaction, user: str) -> List[str]:
    """Friends of friends, most shared friends first."""
    users = tx["users"]
    mine = users[user]["friends"]
    counts: Dict[str, int] = {}
    for f in mine:
        for ff in users[f]["friends"]:
            if ff != user and ff not in mine:
                counts[ff] = counts.get(ff, 0) + 1
    return sorted(counts, key=lambda u: (-counts[u], u))


def main(path: str) -> Dict[str, Any]:
    names = ["ana", "ben", "chloe", "dev", "eve", "finn"]
    with pb.open(path) as db:
        with db.transaction() as tx:
            tx["users"] = pb.Dict({n: {"name": n.title(), "friends": pb.Set()} for n in names})
        for a, b in [("ana", "ben"), ("ana", "chloe"), ("ben", "chloe"), ("ben", "dev"),
                     ("chloe", "dev"), ("dev", "eve")]:
            db.run(befriend, a, b)

        with db.transaction() as tx:
            # The same Set stored in a second place: a reference, not a copy.
            tx["groups"] = pb.Dict({"ana's circle": tx["users"]["ana"]["friends"]})
        with db.transaction() as tx:
            tx["groups"]["ana's circle"].add("finn")      # edit through the second path
        db.run(befriend, "finn", "eve")

        with db.transaction(readonly=True) as tx:
            ana_friends = set(tx["users"]["ana"]["friends"])
            circle = set(tx["groups"]["ana's circle"])
            same_object = tx["groups"]["ana's circle"] is tx["users"]["ana"]["friends"]
            common = mutual(tx, "ana", "dev")
            suggested = suggestions(tx, "ana")
            collections = db.stats()["collections"]
        assert ana_friends == circle == {"ben", "chloe", "finn"}
        assert same_object, "one collection read through two paths is one handle"
        assert common == {"ben", "chloe"}
        assert suggested == ["dev", "eve"]
        # root + users + groups + one friend set per user: the circle added none.
        assert collections == 3 + len(names)
        print(f"ana's friends = her circle = {sorted(ana_friends)}; mutual with dev: "
              f"{sorted(common)}; suggested: {suggested}")
        return {"friends": ana_friends, "circle": circle, "mutual": common,
                "suggested": suggested, "collections": collections}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(os.path.join(d, "social.pb"))
