"""An index on a field that holds stored collections is refused.

A stored pb.Set/pb.List/pb.Dict inside an entry is a reference: the collection can change
without its entry being written, so an index on that field would go stale. create_index
refuses such a field (QueryError saying why) and so does every later write that puts one
into an indexed field; queries on the field keep answering by scan."""
import os
import random
import tempfile

import pytest

import protobase as pb
from protobase.errors import QueryError
from protobase.query import F


@pytest.fixture
def db(tmp_path):
    d = pb.open(str(tmp_path / "refs.pb"))
    yield d
    d.close()


def _users(db, rows):
    with db.transaction() as tx:
        tx["users"] = pb.Dict()
        for k, v in rows.items():
            tx["users"][k] = v


@pytest.mark.parametrize("kind", ["Set", "List", "Dict"])
def test_create_index_on_a_field_holding_a_stored_collection_is_refused_and_says_why(db, kind):
    holder = {"Set": pb.Set(["ana"]), "List": pb.List(["ana"]), "Dict": pb.Dict({"ana": 1})}[kind]
    _users(db, {"a": {"friends": holder, "n": 1}, "b": {"friends": ["ana"], "n": 2}})
    with db.transaction() as tx:
        with pytest.raises(QueryError) as err:
            tx["users"].create_index("friends")
        msg = str(err.value)
        assert "friends" in msg and f"pb.{kind}" in msg and "scan" in msg
        assert tx["users"].indexes == []
        tx["users"].create_index("n")          # another field still indexes
        assert tx["users"].indexes == ["n"]
    with db.transaction() as tx:
        assert tx["users"].indexes == ["n"]


def test_create_index_refuses_a_stored_collection_nested_in_a_plain_value(db):
    _users(db, {"a": {"friends": [("x", pb.Set(["ana"]))]}})
    with db.transaction() as tx:
        with pytest.raises(QueryError, match="friends"):
            tx["users"].create_index("friends")


def test_create_index_refuses_a_list_collection_whose_rows_hold_stored_collections(db):
    with db.transaction() as tx:
        tx["rows"] = pb.List([{"tags": pb.Set(["a"])}, {"tags": ["b"]}])
    with db.transaction() as tx:
        with pytest.raises(QueryError, match="tags"):
            tx["rows"].create_index("tags")


@pytest.mark.parametrize("write", ["new key", "overwrite"])
def test_a_write_that_puts_a_stored_collection_into_an_indexed_field_is_refused_before_any_change(db, write):
    _users(db, {"a": {"friends": ["ana"]}})
    with db.transaction() as tx:
        tx["users"].create_index("friends")
    key = "b" if write == "new key" else "a"
    with db.transaction() as tx:
        users = tx["users"]
        with pytest.raises(QueryError, match="friends"):
            users[key] = {"friends": pb.Set(["ana"])}
        assert dict(users.items()) == {"a": {"friends": ["ana"]}}
        assert list(users.where(F.friends.contains("ana")).keys()) == ["a"]
    with db.transaction() as tx:
        assert dict(tx["users"].items()) == {"a": {"friends": ["ana"]}}
    db.check()


def test_a_list_write_that_puts_a_stored_collection_into_an_indexed_field_is_refused(db):
    with db.transaction() as tx:
        tx["rows"] = pb.List([{"tags": ["a"]}])
        tx["rows"].create_index("tags")
    with db.transaction() as tx:
        rows = tx["rows"]
        with pytest.raises(QueryError, match="tags"):
            rows.append({"tags": pb.List(["b"])})
        with pytest.raises(QueryError, match="tags"):
            rows[0] = {"tags": pb.Set(["b"])}
        assert list(rows) == [{"tags": ["a"]}]


def test_a_commit_whose_write_meets_an_index_created_concurrently_is_refused_whole(db):
    _users(db, {"a": {"friends": ["ana"]}})
    tx1 = db.transaction()
    tx1["users"]["b"] = {"friends": pb.Set(["ana"])}   # no index yet in tx1's snapshot
    tx1["other"] = 1
    with db.transaction() as tx2:
        tx2["users"].create_index("friends")
    with pytest.raises(QueryError, match="friends"):
        tx1.commit()
    with db.transaction() as tx:
        assert dict(tx["users"].items()) == {"a": {"friends": ["ana"]}}
        assert "other" not in tx
        assert tx["users"].indexes == ["friends"]
    db.check()


def test_contains_on_a_field_of_stored_collections_answers_by_scan_like_python():
    seed = random.randrange(2**32)
    print("seed", seed)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        db = pb.open(os.path.join(d, "x.pb"))
        names = ["ana", "bob", "cy", "dee"]
        oracle = {}
        with db.transaction() as tx:
            tx["users"] = pb.Dict()
            for i in range(60):
                members = rng.sample(names, rng.randrange(0, 4))
                kind = rng.choice(["Set", "List", "list", "set", "none"])
                key = f"u{i}"
                if kind == "none":
                    tx["users"][key] = {"n": i}
                    oracle[key] = None
                else:
                    value = {"Set": pb.Set, "List": pb.List, "list": list, "set": set}[kind](members)
                    tx["users"][key] = {"friends": value, "n": i}
                    oracle[key] = set(members)
            tx["users"].create_index("n")
            with pytest.raises(QueryError):
                tx["users"].create_index("friends")
        # Change the stored collections under their entries (the entries are not written).
        with db.transaction() as tx:
            users = tx["users"]
            for key in list(oracle):
                v = users[key].get("friends")
                if isinstance(v, pb.Set) and rng.random() < 0.5:
                    v.add("zed")
                    oracle[key].add("zed")
                elif isinstance(v, pb.List) and rng.random() < 0.5:
                    v.append("zed")
                    oracle[key].add("zed")
        with db.transaction() as tx:
            users = tx["users"]
            for name in names + ["zed"]:
                got = sorted(users.where(F.friends.contains(name)).keys())
                want = sorted(k for k, s in oracle.items() if s is not None and name in s)
                assert got == want, (seed, name)
                got = sorted(users.where(F.friends.contains(name), F.n < 30).keys())
                want = sorted(k for k in want if int(k[1:]) < 30)
                assert got == want, (seed, name)
        db.close()
