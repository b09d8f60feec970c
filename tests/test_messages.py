"""What ProtoBase says when it refuses something: each message names what actually
happened and what the user can do, in the words of the API the user calls (never an
internal one), and the structured attributes stay for programs."""
import copy
import pickle

import pytest

import protobase as pb


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "shop.pb")


def _conflict(db, write):
    """Two transactions on one snapshot run `write`; the later commit's ConflictError."""
    a, b = db.transaction(), db.transaction()
    write(a, 1)
    write(b, 2)
    a.commit()
    with pytest.raises(pb.ConflictError) as info:
        b.commit()
    return info.value


# -- values that cannot be stored ---------------------------------------------------------

def test_a_memoryview_value_says_to_store_bytes_and_never_mentions_dumps():
    db = pb.open()
    with db.transaction() as tx:
        with pytest.raises(pb.SerializationError) as info:
            tx["blob"] = {"data": memoryview(b"abc")}
    msg = str(info.value)
    assert "bytes(" in msg and "default=" not in msg and "dumps" not in msg, msg
    assert "['data']" in msg


@pytest.mark.parametrize("value", [
    range(3), slice(1, 2), {}.keys(), iter([1]), object(), Ellipsis],
    ids=lambda v: type(v).__name__)
def test_no_refusal_of_a_value_mentions_the_internal_dumps_api(value):
    with pytest.raises(pb.SerializationError) as info:
        pb.open().transaction()["x"] = value
    msg = str(info.value)
    assert "default=" not in msg and "dumps" not in msg, msg
    assert type(value).__name__ in msg


@pytest.mark.parametrize("value", [range(3), {}.keys(), {}.items(), iter([1]), map(str, [1])],
                         ids=lambda v: type(v).__name__)
def test_a_view_or_an_iterator_value_says_to_store_a_list_of_it(value):
    with pytest.raises(pb.SerializationError) as info:
        pb.open().transaction()["x"] = value
    assert "list(value)" in str(info.value), str(info.value)
# -- read-only ---------------------------------------------------------------------------

def test_a_write_through_a_read_only_database_says_it_was_opened_read_only(path):
    with pb.open(path) as db, db.transaction() as tx:
        tx["carts"] = pb.Dict({"u1": 1})
    with pb.open(path, readonly=True) as db:
        with db.transaction() as tx:            # the user did use db.transaction()
            with pytest.raises(pb.ReadOnlyError) as info:
                tx["carts"]["u1"] = 2
            msg = str(info.value)
            assert "db.transaction() to write" not in msg
            assert "readonly=True" in msg and "pb.open(" in msg
            with pytest.raises(pb.ReadOnlyError) as info:
                tx["orders"] = pb.Dict()        # a new collection: the codec's ref hook
            assert "readonly=True" in str(info.value) and "pb.open(" in str(info.value)
        with pytest.raises(pb.ReadOnlyError) as info:
            db.compact()
        assert f"pb.open({path!r})" in str(info.value) and "compact()" in str(info.value)


def test_a_write_in_a_read_only_transaction_still_points_at_db_transaction(path):
    with pb.open(path) as db:
        with db.transaction() as tx:
            tx["carts"] = pb.Dict()
        with db.transaction(readonly=True) as tx:
            with pytest.raises(pb.ReadOnlyError) as info:
                tx["carts"]["u1"] = 1
            assert "db.transaction()" in str(info.value)
            assert "pb.open(" not in str(info.value)


