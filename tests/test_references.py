"""References between collections survive aborts and retries: a committed value never
names a collection that the committed state lacks, and db.check() finds one that does.

A free-standing collection stored in a transaction is *adopted* there (it gets a
collection id). If that transaction aborts, or its commit fails, the adoption is undone:
the object is free-standing again, with the contents it was built with, so a retry
(db.run) adopts it afresh. A handle of another transaction names that transaction's
collection: committing a reference to it is refused (nothing written) unless the
collection exists in the state the commit builds.
"""
import os

import pytest

import protobase as pb
from protobase.state import codec


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "refs.pb")


@pytest.fixture
def db(path):
    d = pb.open(path)
    yield d
    d.close()


def _conflict_once(db):
    """A transaction function's helper: commit a write to root 'n' from another
    transaction, so that the caller's own write to 'n' conflicts."""
    with db.transaction() as other:
        other["n"] = other.get("n", 0) + 100


def test_a_free_standing_collection_stored_by_a_retried_run_is_committed_by_the_retry(db, path):
    with db.transaction() as tx:
        tx["n"] = 0
    order = pb.Dict({"item": "book", "qty": 2})
    attempts = []

    def place(tx):
        attempts.append(1)
        tx["n"] = tx["n"] + 1
        tx["order"] = order
        if len(attempts) == 1:
            _conflict_once(db)

    db.run(place)
    assert len(attempts) == 2
    with db.transaction() as tx:
        assert tx["order"] == {"item": "book", "qty": 2}
        assert tx["n"] == 101
    assert db.check().problems == []
    db.close()
    with pb.open(path) as again, again.transaction() as tx:
        assert tx["order"] == {"item": "book", "qty": 2}


def test_aborting_returns_an_adopted_collection_to_free_standing_with_its_contents(db):
    basket = pb.Dict({"a": 1})
    tx = db.transaction()
    tx["basket"] = basket
    basket["b"] = 2                      # a write of the aborted transaction
    assert basket == {"a": 1, "b": 2}
    tx.abort()
    assert basket == {"a": 1}            # free-standing again, as it was built
    assert repr(basket) == "pb.Dict({'a': 1})"
    basket["c"] = 3                      # free-standing writes work again
    with db.transaction() as tx:
        tx["basket"] = basket
    with db.transaction() as tx:
        assert tx["basket"] == {"a": 1, "c": 3}
        assert "b" not in tx["basket"]


def test_a_commit_that_conflicts_returns_its_adopted_collections_to_free_standing(db):
    with db.transaction() as tx:
        tx["n"] = 0
    tags = pb.Set({"x", "y"})
    tx = db.transaction()
    tx["n"] = 1
    tx["tags"] = tags
    _conflict_once(db)
    with pytest.raises(pb.ConflictError):
        tx.commit()
    assert tags == {"x", "y"}
    with db.transaction() as tx:
        tx["tags"] = tags
    with db.transaction() as tx:
        assert tx["tags"] == {"x", "y"}
    assert db.check().problems == []


def test_collections_nested_in_a_free_standing_one_are_adopted_afresh_after_a_conflict(db):
    with db.transaction() as tx:
        tx["n"] = 0
    inner = pb.List([1, 2])
    outer = pb.Dict({"inner": inner, "deep": (pb.SortedDict({3: "c"}),)})
    attempts = []

    def store(tx):
        attempts.append(1)
        tx["n"] = tx["n"] + 1
        tx["outer"] = {"wrapped": outer}
        if len(attempts) == 1:
            _conflict_once(db)

    db.run(store)
    assert len(attempts) == 2
    with db.transaction() as tx:
        got = tx["outer"]["wrapped"]
        assert got["inner"] == [1, 2]
        assert got["deep"][0] == {3: "c"}
    assert db.check().problems == []


def test_a_value_that_fails_to_encode_leaves_its_collection_free_standing(db):
    broken = pb.Dict({"ok": 1, "bad": lambda: None})
    with db.transaction() as tx:
        with pytest.raises(pb.SerializationError):
            tx["broken"] = broken
        del broken._initial["bad"]    # the user fixes the value and stores it again
        assert broken == {"ok": 1}
        tx["fixed"] = broken
    with db.transaction() as tx:
        assert tx["fixed"] == {"ok": 1}
        assert "broken" not in tx


def test_storing_a_handle_of_a_transaction_that_aborted_is_refused_before_anything_is_written(db, path):
    with db.transaction() as tx:
        tx["n"] = 0
    t2 = db.transaction()
    t2["cart"] = pb.Dict({"x": 1})
    cart = t2["cart"]
    t1 = db.transaction()
    t1["copy"] = {"cart": cart}
    t2.abort()
    size = os.path.getsize(path)
    seq = db.stats()["sequence"]
    with pytest.raises(pb.SerializationError) as err:
        t1.commit()
    msg = str(err.value)
    assert "nothing was written" in msg and "aborted" in msg and "'copy'" in msg
    assert os.path.getsize(path) == size
    assert db.stats()["sequence"] == seq
    with db.transaction() as tx:
        assert "copy" not in tx and "cart" not in tx
    assert db.check().problems == []


def test_storing_a_handle_of_a_transaction_that_has_not_committed_is_refused(db):
    t2 = db.transaction()
    t2["cart"] = pb.Dict({"x": 1})
    t1 = db.transaction()
    t1["alias"] = t2["cart"]
    with pytest.raises(pb.SerializationError, match="not committed"):
        t1.commit()
    t2.commit()                  # the other transaction itself still commits
    with db.transaction() as tx:
        assert tx["cart"] == {"x": 1}
        assert "alias" not in tx


def test_a_refused_reference_overwritten_before_commit_does_not_refuse_the_commit(db):
    t2 = db.transaction()
    t2["cart"] = pb.Dict({"x": 1})
    t1 = db.transaction()
    t1["alias"] = t2["cart"]
    t1["alias"] = "plain now"        # the reference is no longer stored anywhere
    t2.abort()
    t1.commit()
    with db.transaction() as tx:
        assert tx["alias"] == "plain now"


def test_a_handle_of_a_transaction_that_committed_first_is_the_same_collection(db):
    t1 = db.transaction()
    t2 = db.transaction()
    t2["cart"] = pb.Dict({"x": 1})
    cart = t2["cart"]
    t2.commit()
    t1["alias"] = cart               # t1's snapshot predates the collection: it still exists
    t1.commit()
    with db.transaction() as tx:
        tx["alias"]["y"] = 2
    with db.transaction() as tx:
        assert tx["cart"] == {"x": 1, "y": 2}
    assert db.check().problems == []


def test_a_handle_from_another_database_is_refused_at_the_write(tmp_path):
    with pb.open(str(tmp_path / "a.pb")) as a, pb.open(str(tmp_path / "b.pb")) as b:
        with a.transaction() as ta:
            ta["d"] = pb.Dict({"x": 1})
            with b.transaction() as tb:
                with pytest.raises(pb.SerializationError, match="another database"):
                    tb["d"] = ta["d"]
        with b.transaction() as tb:
            assert "d" not in tb


def _forge_dangling(db, missing):
    """Commit, below the collection API, values holding a reference to collection
    `missing`, which does not exist: what a damaged or forged file (or an older
    ProtoBase that let a retry commit one) holds."""
    class Ref:
        pass
    raw = codec.dumps({"order": (1, Ref())},
                      ref_hook=lambda o: missing if isinstance(o, Ref) else None)
    with db.transaction() as tx:
        tx["box"] = pb.List(["fine"])
        box = tx["box"]
        root = tx.root
        root._writable()["dangling"] = raw
        root._writes.append("dangling")
        box._writable().append(raw)
        box._writes.append(object())


def test_check_reports_committed_references_to_missing_collections(db, path):
    assert db.check().problems == []
    _forge_dangling(db, 4242)
    with db.transaction() as tx:
        with pytest.raises(pb.CorruptionError):
            tx["dangling"]
    problems = [p.message for p in db.check().problems]
    assert len(problems) == 2, problems
    assert all("#4242" in m for m in problems)
    assert any("'dangling'" in m for m in problems)
    assert any("[1]" in m for m in problems)
    db.close()
    with pb.open(path, readonly=True) as ro:
        assert len(ro.check().problems) == 2


class _Marker:
    """Stands for a collection in values encoded below the collection API."""


def _random_value(rng, depth=0):
    """A value mixing every container the codec walks into, with markers for references."""
    roll = rng.random()
    if depth > 4 or roll < 0.25:
        return rng.choice([_Marker(), 7, "s" * rng.randrange(40), 2 ** 70, -3, 1.5,
                           b"raw", None, (1, 2), frozenset({1})])
    n = rng.randrange(4)
    if roll < 0.45:
        return [_random_value(rng, depth + 1) for _ in range(n)]
    if roll < 0.65:
        return {f"k{i}": _random_value(rng, depth + 1) for i in range(n)}
    if roll < 0.8:
        return tuple(_random_value(rng, depth + 1) for _ in range(n))
    holder = _Holder()
    holder.items = [_random_value(rng, depth + 1) for _ in range(n)]
    return holder


class _Holder:
    pass


def test_codec_refs_finds_every_reference_in_encoding_order_without_decoding():
    import random
    seed = 1409
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(300):
        value = _random_value(rng)
        handed = []

        def hook(obj):
            if isinstance(obj, _Marker):
                handed.append(rng.randrange(1 << rng.choice([4, 10, 40])))
                return handed[-1]
            return None

        raw = codec.dumps(value, ref_hook=hook)
        assert codec.refs(raw) == handed


def test_codec_refs_never_imports_the_module_a_stored_class_names():
    import sys
    raw = codec.dumps(_Holder(), ref_hook=None)
    forged = raw.replace(b"test_references", b"pb_nowhere_zzzz")
    assert forged != raw
    assert codec.refs(forged) == []
    assert "pb_nowhere_zzzz" not in sys.modules
    with pytest.raises(pb.DecodeError):
        codec.refs(raw[:-1])
    with pytest.raises(pb.DecodeError):
        codec.refs(raw + b"\x00")


def test_a_vector_index_queried_only_inside_an_aborted_transaction_leaves_nothing_behind(tmp_path):
    pytest.importorskip("hnswlib")
    np = pytest.importorskip("numpy")
    path = str(tmp_path / "vec.pb")
    db = pb.open(path)
    with db.transaction() as tx:
        tx["kept"] = pb.Dict({i: {"v": [float(i)] * 4} for i in range(5)})
    tx = db.transaction()
    tx["docs"] = pb.Dict()
    docs, kept = tx["docs"], tx["kept"]
    for coll in (docs, kept):
        coll.create_vector_index("v", dim=4, metric="l2")
    for i in range(20):
        docs[i] = {"v": np.arange(4, dtype=np.float32) + i}
    q = np.zeros(4, dtype=np.float32)
    assert list(docs.nearest("v", q, k=2).keys()) == [0, 1]
    assert list(kept.nearest("v", q, k=2).keys()) == [0, 1]
    tx.abort()
    # Created again, differently: the aborted index's settings must not be reused.
    with db.transaction() as tx:
        kept = tx["kept"]
        kept.create_vector_index("v", dim=4, metric="ip")
    with db.transaction() as tx:
        hits = tx["kept"].nearest("v", np.ones(4, dtype=np.float32), k=2)
        assert [d for _, _, d in hits.scored()] == pytest.approx([1 - 16.0, 1 - 12.0])
    db.close()
    side = sorted(n for n in os.listdir(tmp_path) if "-vec-" in n)
    kept_id = None
    with pb.open(path, readonly=True) as ro, ro.transaction() as tx:
        kept_id = tx["kept"]._cid
    assert side == [f"vec.pb-vec-{kept_id}-v.hnsw"], side
