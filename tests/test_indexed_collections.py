"""Indexes through the public API: one answer, two speeds.

Each query runs on a collection with indexes (planner), on an identical one without
(plain scan) and against a Python oracle written here from the documented semantics,
across commits, concurrent merges, aborts and reopens."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protobase as pb
from protobase import F

FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.floats(-3, 12, allow_nan=False),
                         st.sampled_from(["a", "b", "ab", "c", ""]), st.lists(st.integers(0, 3), max_size=2))
ROWS = st.dictionaries(st.integers(0, 60), st.dictionaries(st.sampled_from(["x", "y"]), FIELD_VALUES, max_size=2),
                       max_size=40)


def _cls(v):
    if v is None:
        return 0
    if isinstance(v, (bool, int, float)):
        return 1
    if isinstance(v, str):
        return 2
    return 9


def _orderable(a, b):
    return _cls(a) == _cls(b) and _cls(a) in (0, 1, 2)


def _le(a, b):
    # None is a class of its own holding one value, so it equals and orders only with itself.
    return a is None or a <= b


ORACLE = {
    "==": lambda a, b: _cls(a) == _cls(b) and a == b,
    "!=": lambda a, b: not (_cls(a) == _cls(b) and a == b),
    "<": lambda a, b: _orderable(a, b) and a is not None and a < b,
    "<=": lambda a, b: _orderable(a, b) and _le(a, b),
    ">": lambda a, b: _orderable(a, b) and a is not None and a > b,
    ">=": lambda a, b: _orderable(a, b) and _le(b, a),
}
BUILD = {"==": lambda f, v: f == v, "!=": lambda f, v: f != v, "<": lambda f, v: f < v,
         "<=": lambda f, v: f <= v, ">": lambda f, v: f > v, ">=": lambda f, v: f >= v}
OPERANDS = st.one_of(st.none(), st.integers(-2, 12), st.floats(-2, 12, allow_nan=False), st.sampled_from(["a", "b", "c"]))
TERMS = st.tuples(st.sampled_from(["x", "y"]), st.sampled_from(sorted(ORACLE)), OPERANDS)


def _oracle(rows, terms, combine):
    out = set()
    for k, row in rows.items():
        hits = [f in row and ORACLE[op](row[f], v) for f, op, v in terms]
        if combine(hits):
            out.add(k)
    return out


def _predicate(terms, mode):
    preds = [BUILD[op](getattr(F, f), v) for f, op, v in terms]
    p = preds[0]
    for q in preds[1:]:
        p = (p & q) if mode == "and" else (p | q)
    return p


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(rows=ROWS, terms=st.lists(TERMS, min_size=1, max_size=3), mode=st.sampled_from(["and", "or", "not"]))
def test_indexed_plain_and_oracle_agree(rows, terms, mode):
    db = pb.open()
    with db.transaction() as tx:
        tx["ix"] = pb.Dict(rows)
        tx["plain"] = pb.Dict(rows)
        tx["ix"].create_index("x")
        tx["ix"].create_index("y")
    combine = {"and": all, "or": any, "not": lambda hs: not all(hs)}[mode]
    expected = _oracle(rows, terms, combine)
    with db.transaction(readonly=True) as tx:
        pred = _predicate(terms, "or" if mode == "or" else "and")
        if mode == "not":
            pred = ~pred
        for name in ("ix", "plain"):
            q = tx[name].where(pred)
            assert set(q.keys()) == expected, (name, q.explain())
            assert q.count() == len(expected)


def test_old_snapshots_query_their_own_index():
    db = pb.open()
    with db.transaction() as tx:
        tx["p"] = pb.Dict({i: {"cat": i % 3} for i in range(30)})
        tx["p"].create_index("cat")
    old = db.transaction(readonly=True)
    with db.transaction() as tx:
        for i in range(30, 60):
            tx["p"][i] = {"cat": 0}
        del tx["p"][0]
    assert sorted(old["p"].where(cat=0).keys()) == list(range(0, 30, 3))
    with db.transaction() as tx:
        assert sorted(tx["p"].where(cat=0).keys()) == list(range(3, 30, 3)) + list(range(30, 60))
    old.abort()


def test_concurrent_writes_to_an_indexed_collection_merge_with_their_index_entries():
    db = pb.open()
    with db.transaction() as tx:
        tx["p"] = pb.Dict({1: {"c": "a"}, 2: {"c": "b"}})
        tx["p"].create_index("c")
    t1, t2 = db.transaction(), db.transaction()
    t1["p"][3] = {"c": "a"}
    t1["p"][1] = {"c": "z"}
    t2["p"][4] = {"c": "a"}
    del t2["p"][2]
    t1.commit()
    t2.commit()
    with db.transaction() as tx:
        p = tx["p"]
        assert sorted(p.where(c="a").keys()) == [3, 4]
        assert sorted(p.where(c="z").keys()) == [1]
        assert p.where(c="b").count() == 0
        assert "IndexedSearchPlan" in p.where(c="a").explain()


def test_a_concurrent_index_creation_and_write_conflict_at_commit():
    db = pb.open()
    with db.transaction() as tx:
        tx["p"] = pb.Dict({1: {"c": 1}})
    t1, t2 = db.transaction(), db.transaction()
    t1["p"].create_index("c")
    t2["p"][2] = {"c": 2}
    t2.commit()
    with pytest.raises(pb.ConflictError):
        t1.commit()


def test_writes_after_a_concurrently_created_index_are_indexed():
    db = pb.open()
    with db.transaction() as tx:
        tx["p"] = pb.Dict({1: {"c": 1}})
    t1, t2 = db.transaction(), db.transaction()
    t2["p"][2] = {"c": 2}          # t2's snapshot has no index
    t1["p"].create_index("c")
    t1.commit()
    t2.commit()                    # merged onto the indexed head: replayed through the index
    with db.transaction() as tx:
        assert sorted(tx["p"].where(F.c >= 1).keys()) == [1, 2]
        assert "IndexedSearchPlan" in tx["p"].where(F.c >= 1).explain()


def test_indexes_persist_and_follow_random_writes_across_reopen(tmp_path):
    path = str(tmp_path / "ix.pb")
    rnd = random.Random(5)
    model = {}
    db = pb.open(path, durability="none")
    with db.transaction() as tx:
        tx["p"] = pb.SortedDict()
        tx["p"].create_index("v")
    for round_ in range(6):
        with db.transaction() as tx:
            p = tx["p"]
            for _ in range(50):
                k = rnd.randrange(80)
                if rnd.random() < 0.3 and k in model:
                    del p[k]
                    del model[k]
                else:
                    v = {"v": rnd.choice([rnd.randrange(10), str(rnd.randrange(3)), None])}
                    p[k] = v
                    model[k] = v
        if round_ % 2:
            db.close()
            db = pb.open(path, durability="none")
        with db.transaction(readonly=True) as tx:
            p = tx["p"]
            assert p.indexes == ["v"]
            for probe in [0, 5, "1", None]:
                expect = sorted(k for k, r in model.items() if _cls(r["v"]) == _cls(probe) and r["v"] == probe)
                assert list(p.where(v=probe).keys()) == expect
            expect = sorted(k for k, r in model.items() if _cls(r["v"]) == 1 and 2 <= r["v"] <= 6)
            assert sorted(p.where(F.v.between(2, 6)).keys()) == expect
    assert db.check().problems == []
    db.close()


def test_drop_index_keeps_answers_and_removes_the_plan():
    db = pb.open()
    with db.transaction() as tx:
        tx["p"] = pb.Dict({i: {"c": i % 4} for i in range(40)})
        p = tx["p"]
        p.create_index("c")
        assert p.indexes == ["c"]
        before = sorted(p.where(c=1).keys())
        p.drop_index("c")
        assert p.indexes == []
        assert sorted(p.where(c=1).keys()) == before
        assert "FullScan" in p.where(c=1).explain()
        with pytest.raises(KeyError):
            p.drop_index("c")


def test_malformed_queries_raise_query_error_at_build_time():
    db = pb.open()
    with db.transaction() as tx:
        tx["p"] = pb.Dict()
        with pytest.raises(pb.QueryError):
            tx["p"].where(F.x.in_(5))
        with pytest.raises(pb.QueryError):
            tx["p"].where(F.x == 1).limit(-1)


class Box:
    """A stored object with attributes (not a dict): its fields are read by attribute."""

    def __init__(self, x, inner=None):
        self.x = x
        self.inner = inner

    def __eq__(self, other):
        return type(other) is Box and (self.x, self.inner) == (other.x, other.inner)

    def __repr__(self):
        return f"Box({self.x!r}, {self.inner!r})"


NESTED_ROWS = st.dictionaries(st.integers(0, 40), st.one_of(
    st.dictionaries(st.sampled_from(["x", "a"]), st.one_of(
        FIELD_VALUES, st.dictionaries(st.sampled_from(["b", "x"]), FIELD_VALUES, max_size=2)), max_size=2),
    st.builds(Box, FIELD_VALUES, st.one_of(st.none(), st.dictionaries(st.just("b"), FIELD_VALUES))),
    st.integers(), st.lists(st.integers(), max_size=2)), max_size=30)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(rows=NESTED_ROWS, kind=st.sampled_from(["dict", "list"]),
       operand=st.one_of(st.none(), st.integers(-1, 4), st.sampled_from(["a", "b"])))
def test_index_built_over_existing_rows_of_every_shape_matches_a_scan(rows, kind, operand):
    # The build reads one field of each stored value without decoding it whole; objects,
    # non-dict values and nested paths take the whole-value path. Both must file every row
    # exactly where the per-row maintenance (and a plain scan) would.
    db = pb.open()
    with db.transaction() as tx:
        make = pb.Dict if kind == "dict" else (lambda r: pb.List(r.values()))
        tx["ix"], tx["plain"] = make(rows), make(rows)
    with db.transaction() as tx:
        for field in ("x", "a.b", "inner.b"):
            tx["ix"].create_index(field)
    with db.transaction(readonly=True) as tx:
        for field in (F.x, F.a.b, F.inner.b):
            for pred in (field == operand, field.exists(), field < 3):
                got, want = tx["ix"].where(pred).items(), tx["plain"].where(pred).items()
                assert sorted(map(repr, got)) == sorted(map(repr, want)), (pred, got, want)
                assert "IndexedSearchPlan" in tx["ix"].where(pred).explain() or not rows
    # And the indexes equal ones maintained row by row as the same rows are written.
    with db.transaction() as tx:
        tx["inc"] = pb.Dict() if kind == "dict" else pb.List()
        for field in ("x", "a.b", "inner.b"):
            tx["inc"].create_index(field)
        if kind == "dict":
            tx["inc"].update(rows)
        else:
            tx["inc"].extend(rows.values())
    with db.transaction(readonly=True) as tx:
        for field in (F.x, F.a.b, F.inner.b):
            for pred in (field == operand, field.exists(), field >= 0):
                assert sorted(map(repr, tx["inc"].where(pred).items())) == \
                    sorted(map(repr, tx["ix"].where(pred).items()))


# ------------------------------------------- contains on stored collections (issue 13)

NAMES = ["ana", "bo", "cy", 1, 2.0]


def _friends(rnd):
    """The shape of a random `friends` field: a stored Set/List, a plain list/set/tuple,
    or something contains never looks into (a str, a number, a stored Dict), and items."""
    kind = rnd.choice(["pb.Set", "pb.List", "list", "set", "tuple", "str", "int", "pb.Dict",
                       "missing"])
    return kind, rnd.sample(NAMES, rnd.randrange(4))


def _contains_oracle(kind, items, name):
    # API.md: contains looks into list/set/tuple fields and pb.List/pb.Set values; an
    # element matches under the comparison rule (1 == 1.0, "1" != 1).
    if kind not in ("pb.Set", "pb.List", "list", "set", "tuple"):
        return False
    return any(_cls(x) == _cls(name) and x == name for x in items)


def _friends_model(seed, n=60):
    """n rows as (kind, items, g, n): `friends` of that kind holding items, two plain fields."""
    rnd = random.Random(seed)
    return [(*_friends(rnd), i % 4, rnd.randrange(10)) for i in range(n)]


def _friends_row(kind, items, g, n):
    # A fresh value each time: a stored collection lives in one place.
    row = {"g": g, "n": n}
    make = {"pb.Set": pb.Set, "pb.List": pb.List, "list": list, "set": set, "tuple": tuple,
            "str": lambda xs: "ana", "int": lambda xs: 1,
            "pb.Dict": lambda xs: pb.Dict({"ana": 1})}.get(kind)
    if make is not None:
        row["friends"] = make(items)
    return row


def _store_rows(coll, rows):
    if coll == "dict":
        return pb.Dict(dict(enumerate(rows)))
    return pb.List(rows)


@pytest.mark.parametrize("coll", ["dict", "list"])
def test_contains_matches_stored_sets_and_lists_by_scan_and_through_every_plan(coll):
    seed = 1313
    print("seed", seed)
    db = pb.open()
    model = _friends_model(seed)
    with db.transaction() as tx:
        for name in ("ix", "plain"):
            tx[name] = _store_rows(coll, [_friends_row(*m) for m in model])
        tx["ix"].create_index("g")
        tx["ix"].create_index("n")
    with db.transaction(readonly=True) as tx:
        assert isinstance(tx["ix"][[m[0] for m in model].index("pb.Set")]["friends"], pb.Set)
        for who in ("ana", "bo", 1, "nobody"):
            hit = {i for i, (kind, items, _, _) in enumerate(model)
                   if _contains_oracle(kind, items, who)}
            assert bool(hit) == (who != "nobody")
            c = F.friends.contains(who)
            cases = [  # (predicate, oracle, the plan the indexed collection runs)
                (c, hit, "FullScan"),
                (c & (F.g == 1), {i for i in hit if i % 4 == 1}, "Filter"),    # few rows
                (c & (F.n >= 3), {i for i in hit if model[i][3] >= 3}, "Filter"),
                (c | (F.g == 2), hit | {i for i in range(len(model)) if i % 4 == 2}, "FullScan"),
                (~c, set(range(len(model))) - hit, "FullScan"),
            ]
            for pred, want, plan in cases:
                for name in ("ix", "plain"):
                    q = tx[name].where(pred)
                    assert set(q.keys()) == want, (name, pred, q.explain())
                    assert q.count() == len(want), (name, pred)
                assert plan in tx["ix"].where(pred).explain()
            walk = tx["ix"].where(c).order_by("n").limit(3)
            want = sorted(hit, key=lambda i: (model[i][3], i))[:3]
            assert walk.keys() == want, walk.explain()
            assert tx["plain"].where(c).order_by("n").limit(3).keys() == want


@pytest.mark.parametrize("coll", ["dict", "list"])
def test_bool_of_a_query_is_whether_anything_matches_with_and_without_indexes(coll):
    seed = 1314
    print("seed", seed)
    rnd = random.Random(seed)
    rows = [{"g": rnd.randrange(5), "n": rnd.randrange(20)} for _ in range(80)]
    rows += [{"other": 1}]                                  # a row without the fields
    db = pb.open()
    with db.transaction() as tx:
        for name in ("ix", "plain"):
            tx[name] = _store_rows(coll, rows)
        tx["ix"].create_index("g")
        tx["ix"].create_index("n")
    preds = [F.g == 1, F.g == 9, F.n > 18, F.n > 40, (F.g == 2) & (F.n < 3),
             (F.g == 2) & (F.n > 99), (F.g == 7) | (F.n == 5), ~F.g.exists(),
             F.g.exists() & (F.n.between(3, 4)), F.other == 2]
    with db.transaction(readonly=True) as tx:
        for pred in preds:
            hits = [r for r in rows if pred.matcher()(r)]
            for name in ("ix", "plain"):
                q = tx[name].where(pred)
                assert bool(q) == bool(hits), (name, pred)
                assert bool(q.offset(len(hits))) is False, (name, pred)
                assert bool(q.limit(0)) is False
                if hits:
                    assert bool(q.offset(len(hits) - 1)) is True, (name, pred)
        assert bool(tx["ix"].where()) and bool(tx["plain"].where())


@pytest.mark.parametrize("coll", ["dict", "list"])
def test_a_tuple_given_to_create_index_is_refused_never_taken_for_a_nested_path(coll):
    db = pb.open()
    rows = [{"category": "a", "status": i % 2, "value": i,
             "category.status": 1} for i in range(10)]
    with db.transaction() as tx:
        tx["c"] = _store_rows(coll, rows)
        with pytest.raises(pb.QueryError, match="composite indexes are not supported"):
            tx["c"].create_index(("category", "status", "value"))
        with pytest.raises(pb.QueryError, match="field path"):
            tx["c"].create_index(3)
        assert tx["c"].indexes == []                 # nothing was created
        tx["c"].create_index("status")
        assert tx["c"].indexes == ["status"]
    with db.transaction(readonly=True) as tx:
        assert tx["c"].where(F.status == 1).count() == 5
