"""What ProtoBase says when it refuses something: each message names what actually
happened and what the user can do, in the words of the API the user calls (never an
internal one), and the structured attributes stay for programs."""
import copy
import os
import pickle
import stat
import subprocess
import sys

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


# -- conflicts ---------------------------------------------------------------------------

def test_a_conflict_names_the_root_name_of_the_collection_and_keeps_its_attributes():
    db = pb.open()
    with db.transaction() as tx:
        tx["carts"] = pb.Dict({"u1": 0})

    def write(tx, n):
        tx["carts"]["u1"] = n

    exc = _conflict(db, write)
    msg = str(exc)
    assert "'carts'" in msg and "#" not in msg, msg
    assert exc.key == "u1" and exc.reason == "write-write conflict"
    assert isinstance(exc.collection, int) and exc.collection > 0
    assert exc.collection_name == "carts"


def test_a_conflict_names_the_root_name_the_losing_transaction_gave_the_collection():
    db = pb.open()
    with db.transaction() as tx:
        tx["carts"] = pb.Dict({"u1": 0})

    a, b = db.transaction(), db.transaction()
    a["carts"]["u1"] = 1
    b["renamed"] = b["carts"]                # the root written too: its working copy counts
    del b["carts"]
    b["renamed"]["u1"] = 2
    a.commit()
    with pytest.raises(pb.ConflictError) as info:
        b.commit()
    exc = info.value
    assert "Dict 'renamed' key 'u1'" in str(exc) and exc.collection_name == "renamed"


def test_a_conflict_in_a_nested_collection_names_it_by_kind_and_id():
    db = pb.open()
    with db.transaction() as tx:
        tx["shop"] = pb.Dict({"carts": pb.SortedDict({"u1": 0})})
        inner = tx["shop"]["carts"]._cid

    def write(tx, n):
        tx["shop"]["carts"]["u1"] = n

    exc = _conflict(db, write)
    assert f"SortedDict #{inner}" in str(exc)
    assert exc.collection == inner and exc.key == "u1" and exc.collection_name is None


def test_a_conflict_on_a_root_name_says_root_name():
    db = pb.open()

    def write(tx, n):
        tx["total"] = n

    exc = _conflict(db, write)
    assert "root name 'total'" in str(exc) and exc.collection == 0 and exc.key == "total"


def test_db_run_giving_up_says_how_many_attempts_and_suggests_more_retries():
    db = pb.open()
    with db.transaction() as tx:
        tx["carts"] = pb.Dict({"u1": 0})
    attempts = []

    def always_loses(tx):
        attempts.append(1)
        tx["carts"]["u1"] = -1
        rival = db.transaction()             # commits first, every time
        rival["carts"]["u1"] = len(attempts)
        rival.commit()

    with pytest.raises(pb.ConflictError) as info:
        db.run(always_loses, retries=2)
    msg = str(info.value)
    assert len(attempts) == 3
    assert "db.run retries for you" not in msg
    assert "gave up after 3 attempts" in msg and "retries=" in msg and "'carts'" in msg
    assert info.value.key == "u1" and info.value.attempts == 3


# -- the transaction as a mapping of root names ------------------------------------------

def test_a_transaction_iterates_its_root_names_like_a_mapping():
    db = pb.open()
    with db.transaction() as tx:
        tx["a"] = 1
        tx["b"] = pb.List()
    with db.transaction() as tx:
        assert sorted(tx) == ["a", "b"]
        assert len(tx) == 2 and "a" in tx and "zz" not in tx
        tx["c"] = 3
        assert sorted(list(tx)) == ["a", "b", "c"] and len(tx) == 3


def test_a_transaction_stays_true_with_an_empty_root_and_iterating_a_closed_one_says_so():
    db = pb.open()
    tx = db.transaction()
    assert len(tx) == 0 and list(tx) == [] and bool(tx) is True
    tx.commit()
    assert bool(tx) is True
    with pytest.raises(pb.TransactionClosedError):
        list(tx)


# -- pickling handles --------------------------------------------------------------------

@pytest.mark.parametrize("kind, contents", [
    (pb.Dict, {"a": 1}), (pb.SortedDict, {"a": 1}), (pb.List, [1, 2]), (pb.Set, {1, 2})])
def test_pickling_a_handle_says_it_lives_in_its_transaction_and_what_to_pickle(kind, contents):
    db = pb.open()
    with db.transaction() as tx:
        tx["c"] = kind(contents)
        handle = tx["c"]
        for attempt in (lambda: pickle.dumps(handle), lambda: copy.copy(handle),
                        lambda: pickle.dumps({"nested": [handle]})):
            with pytest.raises(TypeError) as info:
                attempt()
            msg = str(info.value)
            assert "__cinit__" not in msg and "transaction" in msg
            assert f"{type(contents).__name__}(handle)" in msg, msg


@pytest.mark.parametrize("kind, contents", [
    (pb.Dict, {"a": 1, "b": [2]}), (pb.SortedDict, {2: "x", 1: "y"}), (pb.List, [3, 1, 2]),
    (pb.Set, {1, 2})])
def test_a_free_standing_collection_pickles_as_a_free_standing_copy(kind, contents):
    original = kind(contents)
    back = pickle.loads(pickle.dumps(original))
    assert type(back) is kind and back == contents and back is not original
    db = pb.open()
    with db.transaction() as tx:                 # and it can still be stored
        tx["c"] = back
    with db.transaction() as tx:
        assert tx["c"] == contents




@pytest.mark.parametrize("kind, contents, change", [
    (pb.Dict, {"a": [1]}, lambda c: c.__setitem__("b", 2)),
    (pb.SortedDict, {"a": [1]}, lambda c: c.__setitem__("b", 2)),
    (pb.List, [[1]], lambda c: c.append(2)),
    (pb.Set, {1}, lambda c: c.add(2))])
def test_copying_a_free_standing_collection_gives_one_that_changes_alone(kind, contents, change):
    original = kind(contents)
    shallow, deep = copy.copy(original), copy.deepcopy(original)
    change(shallow)
    change(deep)
    assert original == contents and shallow != contents and deep == shallow
    assert type(shallow) is kind and type(deep) is kind


def test_pickling_a_handle_of_an_ended_transaction_is_refused_the_same_way():
    db = pb.open()
    with db.transaction() as tx:
        tx["c"] = pb.List([1])
        handle = tx["c"]
    with pytest.raises(TypeError) as info:
        pickle.dumps(handle)
    assert "list(handle)" in str(info.value)
# -- repr ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [pb.Dict, pb.SortedDict])
def test_repr_of_a_stored_map_formats_each_item_once(kind):
    db = pb.open()
    with db.transaction() as tx:
        tx["m"] = kind({"a": 1})
        assert repr(tx["m"]) == f"pb.{kind.__name__}({{'a': 1}})"
        assert repr(tx["m"]) == repr(kind({"a": 1}))
        tx["big"] = kind({i: i for i in range(20)})
        r = repr(tx["big"])
        assert r.startswith(f"pb.{kind.__name__}({{") and r.endswith(", ...})"), r
        assert r.count(": ") == 10 and '"' not in r


@pytest.mark.parametrize("kind, contents, text", [
    (pb.Dict, {"b": ("x", None)}, "pb.Dict({'b': ('x', None)})"),
    (pb.SortedDict, {"b": 1, "a": 2}, "pb.SortedDict({'a': 2, 'b': 1})"),
    (pb.List, ["a", 1], "pb.List(['a', 1])"),
    (pb.Set, {"a"}, "pb.Set({'a'})")])
def test_repr_is_the_same_free_standing_and_stored_and_truncated_after_ten(kind, contents, text):
    assert repr(kind(contents)) == text
    db = pb.open()
    with db.transaction() as tx:
        tx["c"] = kind(contents)
        assert repr(tx["c"]) == text
    big = kind({i: i for i in range(20)} if kind in (pb.Dict, pb.SortedDict) else range(20))
    assert repr(big).endswith(", ...})") or repr(big).endswith(", ...])"), repr(big)
    assert "'...'" not in repr(big)


# -- paths that are not regular files ------------------------------------------------------

_OPEN_EACH_WAY = """
import sys, protobase as pb
for readonly in (True, False):
    try:
        pb.open(sys.argv[1], readonly=readonly)
    except Exception as exc:
        print(type(exc).__name__, exc, flush=True)
    else:
        print("opened", flush=True)
"""


def _open_in_a_child(path, env, cwd):
    """pb.open(path) both ways in a child process, so that an open that blocks (a FIFO
    with no writer) fails the test by its timeout instead of hanging the suite."""
    out = subprocess.run([sys.executable, "-c", _OPEN_EACH_WAY, str(path)], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_opening_a_fifo_is_not_a_database_error_at_once_and_leaves_it_alone(tmp_path, child_env,
                                                                             child_cwd):
    fifo = tmp_path / "pipe.pb"
    os.mkfifo(fifo)
    lines = _open_in_a_child(fifo, child_env, child_cwd)
    assert len(lines) == 2 and all(l.startswith("NotADatabaseError") for l in lines), lines
    assert "FIFO" in lines[0] and "regular file" in lines[0]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["pipe.pb"]


def test_opening_a_directory_or_a_device_is_not_a_database_error(tmp_path, child_env,
                                                                  child_cwd):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep").write_bytes(b"x")
    for path, what in [(folder, "a directory"), ("/dev/null", "a character device")]:
        lines = _open_in_a_child(path, child_env, child_cwd)
        assert lines == [lines[0]] * 2 and lines[0].startswith("NotADatabaseError"), lines
        assert what in lines[0]
        with pytest.raises(pb.NotADatabaseError):
            pb.open(path, readonly=True)
    assert os.listdir(folder) == ["keep"] and os.listdir(tmp_path) == ["folder"]
