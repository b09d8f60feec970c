"""Secondary index maintenance: an index edited through its mutation API always equals one
rebuilt from scratch, snapshots never change, and statistics match the postings."""
import math
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from protobase._core import load
from protobase.index import SAMPLE, UNION_CACHE, Index, IndexSpec
from protobase.query.expr import MISSING, extract

IdSet = load("idset").IdSet

NAN = float("nan")
field_values = st.one_of(
    st.none(), st.booleans(), st.integers(-4, 4), st.sampled_from([0.5, 1.0, NAN, -0.0]),
    st.text(alphabet="ab", max_size=2), st.tuples(st.integers(0, 1), st.text("a", max_size=1)),
    st.lists(st.integers(0, 2), max_size=2), st.dictionaries(st.just("k"), st.integers(0, 1)),
)


@st.composite
def entries(draw):
    shape = draw(st.integers(0, 3))
    if shape == 0:
        return {}
    if shape == 1:
        return {"v": draw(field_values)}
    if shape == 2:
        return {"v": {"w": draw(field_values)}}
    return draw(field_values)  # not a dict at all


def place(index, rowid):
    """Where the index files ``rowid``: 'missing', 'other' or the tree key."""
    if rowid in index.missing:
        return "missing"
    if rowid in index.other:
        return "other"
    return [k for k, ids in index.tree.items() if rowid in ids]


# ------------------------------------------------------------------------- extract

def test_extract_reads_keys_attributes_and_nests_without_raising():
    class Obj:
        __slots__ = ("a", "__weakref__")

        def __init__(self, a):
            self.a = a

    class Bad:
        @property
        def a(self):
            raise ValueError("boom")

    assert extract({"a": {"b": 3}}, ("a", "b")) == 3
    assert extract({"a": None}, ("a",)) is None
    assert extract({"a": None}, ("a", "b")) is MISSING
    assert extract({"b": 1}, ("a",)) is MISSING
    assert extract(Obj({"b": 2}), ("a", "b")) == 2
    assert extract(Obj(1), ("z",)) is MISSING
    assert extract(Bad(), ("a",)) is MISSING
    assert extract({}, ("items",)) is MISSING  # dict methods are not fields
    assert extract("text", ("upper",)) is MISSING
    assert extract([1, 2], ("append",)) is MISSING
    assert IndexSpec("a.b").parts == ("a", "b")
    assert IndexSpec("a.b").extract({"a": {"b": 5}}) == 5


# ------------------------------------------------------------------------- placement

def test_rows_are_filed_by_value_class():
    idx = Index.build("v", enumerate([
        {"v": 1}, {"v": True}, {"v": 1.0}, {"v": Decimal(1)}, {"v": [1]}, {}, {"v": None},
        {"v": "1"}, {"v": NAN}, {"v": float("nan")}, {"v": {"x": 1}}, 7,
    ]))
    idx._check()
    assert list(idx.lookup(1)) == [0, 1, 2, 3]  # one key, as in dict
    assert list(idx.lookup(NAN)) == [8, 9]       # all NaNs are one key
    assert list(idx.lookup(None)) == [6]
    assert list(idx.lookup("1")) == [7]
    assert list(idx.other) == [4, 10]
    assert list(idx.missing) == [5, 11]
    assert len(idx) == 4
    assert list(idx.present(IdSet(range(12)))) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]


def test_update_to_an_equal_value_under_another_type_keeps_the_posting():
    idx = Index.build("v", [(0, {"v": 1})])
    m = idx.mutate()
    m.update(0, {"v": 1}, {"v": True})
    after = m.finish()
    assert after == idx and list(after.lookup(1)) == [0]
    m.update(0, {"v": True}, {"v": [1]})
    moved = m.finish()
    assert list(moved.other) == [0] and len(moved) == 0 and list(after.lookup(1)) == [0]


def test_parts_round_trip_to_an_equal_index():
    idx = Index.build("v", enumerate([{"v": 1}, {"v": [2]}, {}, {"v": "s"}]))
    parts = idx.parts()
    assert set(parts) == {"tree", "other", "missing"}
    again = Index.from_parts("v", {name: s for name, s in parts.items()})
    assert again == idx and list(again.other) == [1] and list(again.missing) == [2]
    assert Index.from_parts("v", Index.empty("v").parts()) != idx


def test_emptied_postings_disappear():
    idx = Index.build("v", [(0, {"v": "a"}), (1, {"v": "b"})])
    m = idx.mutate()
    m.delete(0, {"v": "a"})
    small = m.finish()
    assert list(small.tree.keys()) == ["b"]
    small._check([(1, {"v": "b"})])
    assert list(idx.tree.keys()) == ["a", "b"]


# ------------------------------------------------------------------------- spans / stats

def test_spans_select_one_type_class_and_prefixes():
    values = [None, False, 0, 2, 3.5, NAN, "", "ab", "abc", "abd", "b", b"ab", (1,), (2, "x")]
    idx = Index.build("v", [(i, {"v": v}) for i, v in enumerate(values)])

    def ids(op, operand, cls):
        return sorted(idx.span_ids(*idx.span(op, operand, cls)))

    assert ids("<", 2, 1) == [1, 2]          # False == 0 < 2; None is not a number
    assert ids(">=", 2, 1) == [3, 4, 5]       # NaN after every other number
    assert ids(">", "a", 2) == [7, 8, 9, 10]
    assert ids("<=", "ab", 2) == [6, 7]
    assert ids("startswith", "ab", 2) == [7, 8, 9]
    assert ids("startswith", "", 2) == [6, 7, 8, 9, 10]
    assert ids("startswith", b"a", 3) == [11]
    assert ids("startswith", "zz", 2) == []
    assert ids("between", (0, 3.5), (1, 1)) == [1, 2, 3, 4]
    assert ids("between", (3, 1), (1, 1)) == []
    assert ids("between", (0, "z"), (1, 2)) == []
    assert ids(">", (1,), 10) == [13]
    assert ids("<", None, 0) == []
    assert ids("<=", None, 0) == [0]


def test_span_estimates_are_exact_for_short_runs_and_close_for_long_ones():
    n_keys = 1000
    entries = [(i, {"v": i % n_keys}) for i in range(n_keys * 3)]
    entries += [(n_keys * 3 + i, {"v": 5}) for i in range(50)]  # one skewed posting
    idx = Index.build("v", entries)
    p0, p1 = idx.span("<", SAMPLE // 2, 1)
    assert idx.span_estimate(p0, p1) == len(idx.span_ids(p0, p1)) == 3 * (SAMPLE // 2) + 50
    p0, p1 = idx.span(">=", 100, 1)
    exact = len(idx.span_ids(p0, p1))
    assert exact == 900 * 3
    assert abs(idx.span_estimate(p0, p1) - exact) <= exact * 0.1
    assert idx.span_estimate(5, 5) == 0


def test_span_unions_are_kept_per_snapshot_and_edits_make_a_new_one():
    idx = Index.build("v", [(i, {"v": i % 100}) for i in range(1000)])
    p0, p1 = idx.span("<", 30, 1)
    first = idx.span_ids(p0, p1)
    assert sorted(first) == [i for i in range(1000) if i % 100 < 30]
    assert idx.span_ids(p0, p1) is first                  # the union is kept
    m = idx.mutate()
    m.insert(5000, {"v": 3})
    m.delete(7, {"v": 7})
    edited = m.finish()
    assert sorted(edited.span_ids(*edited.span("<", 30, 1))) == \
        sorted(set(first) - {7} | {5000})
    m.insert(5001, {"v": 4})                              # the mutation goes on
    again = m.finish()
    assert 5001 in again.span_ids(*again.span("<", 30, 1))
    assert 5001 not in edited.span_ids(*edited.span("<", 30, 1))
    assert idx.span_ids(p0, p1) is first and sorted(first) == \
        [i for i in range(1000) if i % 100 < 30]
    for hi in range(2, UNION_CACHE + 12):                 # bounded, answers unchanged
        assert sorted(idx.span_ids(*idx.span("<", hi, 1))) == \
            [i for i in range(1000) if i % 100 < hi]
        assert len(idx._unions) <= UNION_CACHE


def test_a_range_query_is_never_answered_from_a_stale_union():
    import protobase as pb
    from protobase import F
    db = pb.open()
    with db.transaction() as tx:
        tx["d"] = pb.Dict({i: {"tag": i % 1000} for i in range(3000)})
        tx["d"].create_index("tag")
    first = {i for i in range(3000) if i % 1000 < 100}
    with db.transaction(readonly=True) as old:
        assert set(old["d"].where(F.tag < 100).keys()) == first
        kept = old["d"].where()._source.indexes()["tag"]._unions
        assert [len(ids) for ids in kept.values()] == [len(first)]   # the union is kept
        union = next(iter(kept.values()))
        assert set(old["d"].where(F.tag < 100).keys()) == first
        assert list(kept.values()) == [union] and next(iter(kept.values())) is union
        with db.transaction() as tx:
            d = tx["d"]
            assert set(d.where(F.tag < 100).keys()) == first
            d[5000] = {"tag": 7}
            del d[1]
            second = first - {1} | {5000}
            assert set(d.where(F.tag < 100).keys()) == second
            d[2] = {"tag": 900}
            second -= {2}
            assert set(d.where(F.tag < 100).keys()) == second
        assert set(old["d"].where(F.tag < 100).keys()) == first   # the old snapshot's
    with db.transaction(readonly=True) as new:
        assert set(new["d"].where(F.tag < 100).keys()) == second
        assert set(new["d"].where(F.tag < 100).keys()) == second
    db.close()


# ------------------------------------------------------------------------- maintenance

@settings(derandomize=True, deadline=None, max_examples=60,
          suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.lists(entries(), max_size=20),
       ops=st.lists(st.tuples(st.integers(0, 30), st.one_of(st.none(), entries()),
                              st.booleans()), max_size=40),
       path=st.sampled_from(["v", "v.w"]))
def test_random_updates_equal_a_rebuild(initial, ops, path):
    rows = dict(enumerate(initial))
    idx = Index.build(path, rows.items())
    idx._check(rows.items())
    m = idx.mutate()
    snapshots = [(idx, dict(rows))]
    for rowid, value, finish in ops:
        if value is None:
            if rowid in rows:
                m.delete(rowid, rows.pop(rowid))
        elif rowid in rows:
            m.update(rowid, rows[rowid], value)
            rows[rowid] = value
        else:
            m.insert(rowid, value)
            rows[rowid] = value
        if finish:
            snap = m.finish()
            snap._check(rows.items())
            snapshots.append((snap, dict(rows)))
    final = m.finish()
    final._check(rows.items())
    assert final == Index.build(path, rows.items())
    for snap, content in snapshots:  # persistent: later edits never reach a snapshot
        snap._check(content.items())


class IndexMachine(RuleBasedStateMachine):
    """Random inserts, updates and deletes through one long-lived IndexMutation, with
    snapshots kept and re-checked against the content they had when taken."""

    @initialize()
    def start(self):
        self.rows = {}
        self.next_id = 0
        self.mutation = Index.empty("v").mutate()
        self.snapshots = []

    @rule(value=entries())
    def insert(self, value):
        self.mutation.insert(self.next_id, value)
        self.rows[self.next_id] = value
        self.next_id += 1

    @precondition(lambda self: self.rows)
    @rule(pick=st.integers(0, 10 ** 6), value=entries())
    def update(self, pick, value):
        rowid = sorted(self.rows)[pick % len(self.rows)]
        self.mutation.update(rowid, self.rows[rowid], value)
        self.rows[rowid] = value

    @precondition(lambda self: self.rows)
    @rule(pick=st.integers(0, 10 ** 6))
    def delete(self, pick):
        rowid = sorted(self.rows)[pick % len(self.rows)]
        self.mutation.delete(rowid, self.rows.pop(rowid))

    @rule()
    def snapshot(self):
        self.snapshots.append((self.mutation.finish(), dict(self.rows)))

    @invariant()
    def snapshots_never_change(self):
        for snap, content in self.snapshots[-3:]:
            snap._check(content.items())
            for rowid, value in content.items():
                v = extract(value, ("v",))
                where = place(snap, rowid)
                if v is MISSING:
                    assert where == "missing"
                elif isinstance(v, (list, dict)):
                    assert where == "other"
                else:
                    assert len(where) == 1 and (where[0] == v or (v != v and where[0] != where[0]))


IndexMachine.TestCase.settings = settings(derandomize=True, deadline=None, max_examples=40,
                                          stateful_step_count=30,
                                          suppress_health_check=[HealthCheck.too_slow])
test_index_machine = IndexMachine.TestCase


@pytest.mark.slow
def test_bulk_build_and_edit_of_a_large_index():
    n = 200_000
    rows = {i: {"v": i % 1000, "w": i} for i in range(n)}
    idx = Index.build("v", rows.items())
    assert len(idx) == 1000 and len(idx.lookup(7)) == n // 1000
    m = idx.mutate()
    for i in range(0, n, 3):
        m.update(i, rows[i], {"v": -1})
        rows[i] = {"v": -1}
    edited = m.finish()
    assert len(edited.lookup(-1)) == len(range(0, n, 3))
    edited._check(rows.items())
    assert len(idx.lookup(-1)) == 0 and len(idx.lookup(0)) == n // 1000
    assert math.isclose(edited.span_estimate(*edited.span(">=", 0, 1)),
                        n - len(range(0, n, 3)), rel_tol=0.1)


# ---- bulk builds pause the cyclic garbage collector ---------------------------------

def test_bulk_pauses_the_collector_and_restores_its_state():
    import gc
    assert gc.isenabled()
    with Index.bulk:
        assert not gc.isenabled()
        with Index.bulk:                     # nested: the inner exit keeps the pause
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with Index.bulk:
            raise KeyError("boom")
    assert gc.isenabled()                   # an exception inside still restores it
    gc.disable()
    try:
        with Index.bulk:
            pass
        assert not gc.isenabled()           # a collector the caller turned off stays off
    finally:
        gc.enable()


def test_build_leaves_the_collector_on_and_matches_mutations():
    import gc
    rows = [(i, {"f": [None, 1, 1.0, "a", b"a", (1,), [1]][i % 7], "g": [i]})
            for i in range(300)] + [(300, {}), (301, {"f": float("nan")})]
    built = Index.build("f", rows)
    assert gc.isenabled()
    m = Index.empty("f").mutate()
    for rid, value in rows:
        m.insert(rid, value)
    assert built == m.finish()
    built._check(rows)
