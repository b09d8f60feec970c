"""Collections behave as Python's own containers: differential tests across many
transactions, aborts and reopens, plus identity, copying and ABC registration."""
import collections.abc as abc
import random
from functools import cmp_to_key

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import protobase as pb
from protobase._core import btree

KEYS = st.one_of(st.integers(-5, 40), st.text(max_size=3), st.none(), st.tuples(st.integers(0, 3)))
VALUES = st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.none(),
                   st.floats(allow_nan=False))


def test_collections_register_with_the_abcs():
    assert issubclass(pb.Dict, abc.MutableMapping)
    assert issubclass(pb.SortedDict, abc.MutableMapping)
    assert issubclass(pb.List, abc.MutableSequence)
    assert issubclass(pb.Set, abc.MutableSet)


def test_values_are_copied_at_the_write_and_reads_are_owned_by_the_caller():
    db = pb.open()
    v = {"items": [1, 2]}
    with db.transaction() as tx:
        tx["d"] = pb.Dict()
        tx["d"]["k"] = v
        v["items"].append(3)                     # after the write: changes nothing stored
        got = tx["d"]["k"]
        assert got == {"items": [1, 2]}
        got["items"].append(99)                  # the caller owns what it read
        assert tx["d"]["k"] == {"items": [1, 2]}


def test_a_collection_stored_twice_is_one_object():
    db = pb.open()
    with db.transaction() as tx:
        shared = pb.List([1])
        tx["a"] = shared
        tx["b"] = {"inner": shared}
    with db.transaction() as tx:
        tx["a"].append(2)
        assert tx["b"]["inner"] is tx["a"]
    with db.transaction() as tx:
        assert list(tx["b"]["inner"]) == [1, 2]


def test_a_collection_may_contain_itself():
    db = pb.open()
    with db.transaction() as tx:
        d = pb.Dict()
        d["self"] = d
        tx["d"] = d
    with db.transaction() as tx:
        assert tx["d"]["self"]["self"] is tx["d"]


def test_equality_with_plain_containers_and_repr_is_truncated():
    db = pb.open()
    with db.transaction() as tx:
        tx["d"] = pb.Dict({i: i for i in range(100)})
        tx["l"] = pb.List(range(5))
        tx["s"] = pb.Set({1, 2})
        tx["sd"] = pb.SortedDict({3: 1, 1: 2})
        assert tx["d"] == {i: i for i in range(100)}
        assert tx["d"] != {i: i for i in range(99)}
        assert tx["l"] == [0, 1, 2, 3, 4] and tx["l"] != [0, 1]
        assert tx["s"] == {1, 2}
        assert tx["sd"] == {1: 2, 3: 1}
        assert len(repr(tx["d"])) < 200 and "..." in repr(tx["d"])


def test_sorted_dict_range_and_rank_operations_follow_key_order():
    db = pb.open()
    keys = random.Random(1).sample(range(1000), 200)
    with db.transaction() as tx:
        tx["sd"] = sd = pb.SortedDict({k: str(k) for k in keys})
        ordered = sorted(keys)
        sd = tx["sd"]
        assert list(sd) == ordered
        assert list(sd.irange(100, 300)) == [k for k in ordered if 100 <= k <= 300]
        assert list(sd.irange(100, 300, inclusive=(False, False), reverse=True)) == \
            [k for k in reversed(ordered) if 100 < k < 300]
        assert sd.peekitem(0) == (ordered[0], str(ordered[0]))
        assert sd.peekitem() == (ordered[-1], str(ordered[-1]))
        import bisect
        for probe in (-1, 0, 500, 999, 1000):
            assert sd.bisect_left(probe) == bisect.bisect_left(ordered, probe)
            assert sd.bisect_right(probe) == bisect.bisect_right(ordered, probe)


def test_list_supports_the_full_mutable_sequence_protocol():
    db = pb.open()
    ref = list(range(10))
    with db.transaction() as tx:
        tx["l"] = pb.List(ref)
        lst = tx["l"]
        for op in [lambda x: x.insert(3, "a"), lambda x: x.insert(-2, "b"), lambda x: x.pop(),
                   lambda x: x.pop(0), lambda x: x.remove(5), lambda x: x.__delitem__(slice(1, 3)),
                   lambda x: x.__setitem__(slice(0, 2), ["x", "y", "z"]), lambda x: x.extend([7, 8]),
                   lambda x: x.__iadd__([9]), lambda x: x.__setitem__(-1, "last"),
                   lambda x: x.__delitem__(slice(None, None, 2)), lambda x: x.reverse()]:
            a, b = op(ref), op(lst)
            if not isinstance(a, list):
                assert a == b
            assert list(lst) == ref
        assert lst[1:3] == ref[1:3] and lst[::-1] == ref[::-1]
        assert lst.index(ref[2]) == 2 and lst.count(ref[0]) == ref.count(ref[0])
        with pytest.raises(IndexError):
            lst[len(ref)]


class CollectionsAgainstPython(RuleBasedStateMachine):
    """Random operations on each collection kind, committed, aborted and reopened, checked
    against Python's own containers after every step."""

    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.mkdtemp()
        self.path = self.dir + "/db.pb"
        self.db = pb.open(self.path, durability="none")
        self.model = {"d": {}, "s": set(), "l": [], "sd": {}}
        with self.db.transaction() as tx:
            tx["d"], tx["s"], tx["l"], tx["sd"] = pb.Dict(), pb.Set(), pb.List(), pb.SortedDict()
        self.tx = self.db.transaction()
        self.pending = {k: (dict(v) if isinstance(v, dict) else type(v)(v)) for k, v in self.model.items()}

    @rule(k=KEYS, v=VALUES)
    def dict_set(self, k, v):
        self.tx["d"][k] = v
        self.pending["d"][k] = v

    @rule(k=KEYS)
    def dict_delete(self, k):
        if k in self.pending["d"]:
            del self.tx["d"][k]
            del self.pending["d"][k]
        else:
            with pytest.raises(KeyError):
                del self.tx["d"][k]

    @rule(k=KEYS, v=VALUES)
    def sorted_set(self, k, v):
        self.tx["sd"][k] = v
        self.pending["sd"][k] = v

    @rule(k=KEYS)
    def set_add_discard(self, k):
        if k in self.pending["s"]:
            self.tx["s"].discard(k)
            self.pending["s"].discard(k)
        else:
            self.tx["s"].add(k)
            self.pending["s"].add(k)

    @rule(v=VALUES, i=st.integers(-3, 30))
    def list_edit(self, v, i):
        self.tx["l"].insert(i, v)
        self.pending["l"].insert(i, v)

    @precondition(lambda self: self.pending["l"])
    @rule(i=st.integers(-3, 30))
    def list_pop(self, i):
        n = len(self.pending["l"])
        i = max(-n, min(n - 1, i))
        assert self.tx["l"].pop(i) == self.pending["l"].pop(i)

    @rule()
    def commit(self):
        self.tx.commit()
        self.model = {k: (dict(v) if isinstance(v, dict) else type(v)(v)) for k, v in self.pending.items()}
        self.tx = self.db.transaction()

    @rule()
    def abort(self):
        self.tx.abort()
        self.pending = {k: (dict(v) if isinstance(v, dict) else type(v)(v)) for k, v in self.model.items()}
        self.tx = self.db.transaction()

    @rule()
    def reopen(self):
        self.tx.abort()
        self.db.close()
        self.db = pb.open(self.path, durability="none")
        self.pending = {k: (dict(v) if isinstance(v, dict) else type(v)(v)) for k, v in self.model.items()}
        self.tx = self.db.transaction()

    @invariant()
    def matches_python(self):
        tx, p = self.tx, self.pending
        assert dict(tx["d"].items()) == p["d"]
        assert len(tx["d"]) == len(p["d"])
        assert set(tx["s"]) == p["s"]
        assert list(tx["l"]) == p["l"]
        assert list(tx["sd"].keys()) == sorted(p["sd"], key=cmp_to_key(btree.compare))
        assert dict(tx["sd"].items()) == p["sd"]

    def teardown(self):
        self.tx.abort()
        self.db.close()


CollectionsAgainstPython.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, derandomize=True,
    suppress_health_check=list(HealthCheck))
test_collections_against_python = CollectionsAgainstPython.TestCase
