"""Queries and indexes on List: one answer, two speeds, in list order.

An indexed List names its rows by label (see collections._IndexedList); these tests drive
every kind of list edit through an indexed List and an identical plain one and compare
each query's ``items()`` (positions and values) with a Python oracle over a plain list,
across commits, aborts, concurrent appends, relabelling and reopen."""
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import protobase as pb
from protobase import F

VALUES = st.one_of(st.none(), st.integers(-2, 6), st.sampled_from(["a", "b", "ab"]), st.floats(-2, 6, allow_nan=False))
ROWS = st.fixed_dictionaries({}, optional={"x": VALUES, "y": VALUES})

QUERIES = [
    ("x == 1", lambda: F.x == 1, lambda r: "x" in r and type(r["x"]) in (int, float) and r["x"] == 1),
    ("x >= 2", lambda: F.x >= 2, lambda r: "x" in r and type(r["x"]) in (int, float) and r["x"] >= 2),
    ("y startswith a", lambda: F.y.startswith("a"), lambda r: isinstance(r.get("y"), str) and r["y"].startswith("a")),
    ("x in (0, 'a')", lambda: F.x.in_([0, "a"]),
     lambda r: "x" in r and ((type(r["x"]) in (int, float) and r["x"] == 0) or r["x"] == "a")),
    ("x == 1 | y == None", lambda: (F.x == 1) | (F.y == None),  # noqa: E711
     lambda r: ("x" in r and type(r["x"]) in (int, float) and r["x"] == 1) or ("y" in r and r["y"] is None)),
    ("~(x < 3)", lambda: ~(F.x < 3), lambda r: not ("x" in r and type(r["x"]) in (int, float) and r["x"] < 3)),
    ("y exists & x != 2", lambda: F.y.exists() & (F.x != 2),
     lambda r: "y" in r and "x" in r and not (type(r["x"]) in (int, float) and r["x"] == 2)),
]


def _expected(rows, match):
    return [(i, r) for i, r in enumerate(rows) if match(r)]


def _check_queries(ix, plain, rows):
    for name, build, match in QUERIES:
        want = _expected(rows, match)
        assert list(ix.where(build()).items()) == want, name
        assert list(plain.where(build()).items()) == want, name
        assert ix.where(build()).count() == len(want), name
    assert list(ix.where().items()) == list(enumerate(rows))


class IndexedListMachine(RuleBasedStateMachine):
    """An indexed List and a plain one against a Python list, through every edit."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.path = self.dir + "/l.pb"
        self.db = pb.open(self.path)
        with self.db.transaction() as tx:
            tx["ix"] = pb.List()
            tx["plain"] = pb.List()
            tx["ix"].create_index("x")
        self.committed = []
        self.rows = []
        self.tx = None
        self.indexed = {"x"}

    def _open(self):
        if self.tx is None:
            self.tx = self.db.transaction()
        return self.tx["ix"], self.tx["plain"]

    def _both(self, edit):
        for lst in self._open():
            edit(lst)

    @rule(row=ROWS)
    def append(self, row):
        self._both(lambda lst: lst.append(row))
        self.rows.append(row)

    @rule(pos=st.integers(-12, 12), row=ROWS)
    def insert(self, pos, row):
        self._both(lambda lst: lst.insert(pos, row))
        self.rows.insert(pos, row)

    @rule(pos=st.integers(0, 3), n=st.integers(1, 8), row=ROWS)
    def insert_many_at_one_place(self, pos, n, row):
        for j in range(n):
            self._both(lambda lst: lst.insert(pos, dict(row, j=j)))
            self.rows.insert(pos, dict(row, j=j))

    @precondition(lambda self: self.rows)
    @rule(pos=st.integers(-12, 12), row=ROWS)
    def set_item(self, pos, row):
        pos %= len(self.rows)
        self._both(lambda lst: lst.__setitem__(pos, row))
        self.rows[pos] = row

    @precondition(lambda self: self.rows)
    @rule(pos=st.integers(-12, 12))
    def pop(self, pos):
        pos %= len(self.rows)
        got = [lst.pop(pos) for lst in self._open()]
        want = self.rows.pop(pos)
        assert got == [want, want]

    @rule(start=st.integers(-6, 6), stop=st.integers(-6, 12), step=st.sampled_from([None, 1, 2, -1]))
    def del_slice(self, start, stop, step):
        self._both(lambda lst: lst.__delitem__(slice(start, stop, step)))
        del self.rows[start:stop:step]

    @rule(start=st.integers(-6, 6), stop=st.integers(-6, 12), new=st.lists(ROWS, max_size=4))
    def set_slice(self, start, stop, new):
        self._both(lambda lst: lst.__setitem__(slice(start, stop), new))
        self.rows[start:stop] = new

    @rule(field=st.sampled_from(["x", "y"]))
    def toggle_index(self, field):
        ix, _ = self._open()
        if field in self.indexed:
            ix.drop_index(field)
            self.indexed.discard(field)
        else:
            ix.create_index(field)
            self.indexed.add(field)
        assert sorted(ix.indexes) == sorted(self.indexed)

    @rule()
    def commit(self):
        if self.tx is not None:
            self.tx.commit()
            self.tx = None
        self.committed = list(self.rows)

    @rule()
    def abort(self):
        if self.tx is not None:
            self.tx.abort()
            self.tx = None
        self.rows = list(self.committed)
        with self.db.transaction(readonly=True) as tx:
            self.indexed = set(tx["ix"].indexes)

    @rule()
    def reopen(self):
        self.commit()
        self.db.close()
        self.db = pb.open(self.path)

    @invariant()
    def queries_agree(self):
        ix, plain = self._open()
        assert list(ix) == self.rows
        _check_queries(ix, plain, self.rows)

    def teardown(self):
        if self.tx is not None:
            self.tx.abort()
        self.db.close()
        shutil.rmtree(self.dir)


IndexedListMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                                derandomize=True, suppress_health_check=list(HealthCheck))
TestIndexedList = IndexedListMachine.TestCase


def _fill(db, rows):
    with db.transaction() as tx:
        tx["l"] = pb.List(rows)
        tx["l"].create_index("x")


def test_old_snapshot_keeps_its_positions_and_index():
    db = pb.open()
    _fill(db, [{"x": i % 3} for i in range(9)])
    old = db.transaction(readonly=True)
    with db.transaction() as tx:
        lst = tx["l"]
        lst.insert(0, {"x": 1})
        del lst[5]
        lst[1] = {"x": 2}
    assert list(old["l"].where(F.x == 1).items()) == [(1, {"x": 1}), (4, {"x": 1}), (7, {"x": 1})]
    with db.transaction(readonly=True) as tx:
        assert list(tx["l"].where(F.x == 1).keys()) == [0, 2, 7]
    old.abort()


def test_concurrent_appends_both_land_and_are_indexed():
    db = pb.open()
    _fill(db, [{"x": 0}])
    a, b = db.transaction(), db.transaction()
    a["l"].append({"x": 5, "who": "a"})
    b["l"].append({"x": 5, "who": "b"})
    b["l"].append({"x": 6, "who": "b"})
    a.commit()
    b.commit()
    with db.transaction(readonly=True) as tx:
        lst = tx["l"]
        assert [r.get("who") for r in lst] == [None, "a", "b", "b"]
        assert list(lst.where(F.x == 5).items()) == [(1, {"x": 5, "who": "a"}), (2, {"x": 5, "who": "b"})]
        assert "IndexedSearchPlan" in lst.where(F.x == 6).explain()
        assert list(lst.where(F.x == 6).keys()) == [3]


def test_appends_merged_after_a_concurrent_index_creation_are_indexed():
    db = pb.open()
    with db.transaction() as tx:
        tx["l"] = pb.List([{"x": 1}, {"x": 2}])
    writer, indexer = db.transaction(), db.transaction()
    writer["l"].append({"x": 2})
    indexer["l"].create_index("x")
    indexer.commit()
    writer.commit()
    with db.transaction(readonly=True) as tx:
        assert list(tx["l"].where(F.x == 2).items()) == [(1, {"x": 2}), (2, {"x": 2})]
        assert "IndexedSearchPlan" in tx["l"].where(F.x == 2).explain()


def test_an_edit_beside_a_concurrent_append_conflicts_and_keeps_the_index():
    db = pb.open()
    _fill(db, [{"x": 1}, {"x": 2}])
    a, b = db.transaction(), db.transaction()
    a["l"].append({"x": 1})
    b["l"].insert(0, {"x": 1})
    a.commit()
    with pytest.raises(pb.ConflictError):
        b.commit()
    with db.transaction(readonly=True) as tx:
        assert list(tx["l"].where(F.x == 1).keys()) == [0, 2]


def test_many_inserts_at_one_place_relabel_and_stay_in_order(tmp_path):
    db = pb.open(str(tmp_path / "r.pb"))
    _fill(db, [{"x": 0, "i": -1}, {"x": 0, "i": -2}])
    expected = [{"x": 0, "i": -1}, {"x": 0, "i": -2}]
    with db.transaction() as tx:        # 150 halvings of one gap: far past MAX_DENOMINATOR
        lst = tx["l"]
        for i in range(150):
            row = {"x": i % 2, "i": i}
            lst.insert(1, row)
            expected.insert(1, row)
        assert list(lst) == expected
    db.close()
    db = pb.open(str(tmp_path / "r.pb"))
    with db.transaction(readonly=True) as tx:
        lst = tx["l"]
        assert list(lst) == expected
        assert list(lst.where(F.x == 1).items()) == [(p, r) for p, r in enumerate(expected) if r["x"] == 1]
        labels = list(tx["l"]._base.part("order"))
        assert labels == sorted(labels) and len(labels) == len(expected)
        assert max(getattr(lab, "denominator", 1) for lab in labels) <= 1 << 16


def test_order_by_limit_and_first_on_a_list():
    db = pb.open()
    rows = [{"x": (7 * i) % 10, "i": i} for i in range(30)]
    _fill(db, rows)
    with db.transaction(readonly=True) as tx:
        lst = tx["l"]
        got = list(lst.where(F.x >= 5).order_by("x", descending=True).limit(4).items())
        want = sorted(((p, r) for p, r in enumerate(rows) if r["x"] >= 5), key=lambda pr: (-pr[1]["x"], pr[0]))[:4]
        assert got == want
        assert lst.where(F.x == 3).first() == rows[[r["x"] for r in rows].index(3)]
        assert lst.where(F.x == 11).first() is None


def test_list_query_without_index_is_a_full_scan_in_list_order():
    db = pb.open()
    with db.transaction() as tx:
        tx["l"] = pb.List([3, {"x": 1}, "s", {"x": 1, "y": 2}, None])
        lst = tx["l"]
        assert list(lst.where(F.x == 1).items()) == [(1, {"x": 1}), (3, {"x": 1, "y": 2})]
        assert "FullScan" in lst.where(F.x == 1).explain()
        assert lst.indexes == []
        lst.create_index("y")
        assert list(lst.where(y=2).keys()) == [3]
        with pytest.raises(KeyError):
            lst.drop_index("x")


def _exact(rows, q, k, admit=lambda r: True):
    """Positions of the k nearest rows by l2 distance, ties by position (an oracle)."""
    np = pytest.importorskip("numpy")
    cand = [(float(np.sum((np.asarray(r["v"], dtype=np.float64) - q) ** 2)), p)
            for p, r in enumerate(rows) if "v" in r and admit(r)]
    return [p for _, p in sorted(cand)[:k]]


def test_vector_index_on_a_list_follows_inserts_deletes_and_reopen(tmp_path):
    np = pytest.importorskip("numpy")
    pytest.importorskip("hnswlib")
    rng = np.random.default_rng(5)
    rows = [{"v": rng.normal(size=8).tolist(), "g": i % 4} for i in range(300)]
    path = str(tmp_path / "v.pb")
    db = pb.open(path)
    with db.transaction() as tx:
        tx["l"] = pb.List(rows)
        tx["l"].create_vector_index("v", dim=8, metric="l2")
        tx["l"].create_index("g")
    q = rng.normal(size=8)
    old = db.transaction(readonly=True)
    assert list(old["l"].nearest("v", q, k=5).keys()) == _exact(rows, q, 5)
    with db.transaction() as tx:             # shift every position, move and drop rows
        lst = tx["l"]
        for i in range(0, 40, 2):
            row = {"v": (q + rng.normal(scale=0.01, size=8)).tolist(), "g": 1}
            lst.insert(i, row)
            rows.insert(i, row)
        del lst[50:60]
        del rows[50:60]
        lst[70] = rows[70] = {"g": 1}       # its vector is gone
        lst.append({"v": q.tolist(), "g": 3})
        rows.append({"v": q.tolist(), "g": 3})
        assert list(lst.nearest("v", q, k=7).keys()) == _exact(rows, q, 7)
    with db.transaction(readonly=True) as tx:
        for k, admit, pred in [(10, lambda r: True, None), (5, lambda r: r["g"] == 3, F.g == 3),
                               (8, lambda r: r["g"] == 1, F.g == 1)]:
            query = tx["l"].where() if pred is None else tx["l"].where(pred)
            hits = query.nearest("v", q, k=k)
            assert list(hits.keys()) == _exact(rows, q, k, admit)
            assert [v for v in hits] == [rows[p] for p in _exact(rows, q, k, admit)]
    # the old snapshot still answers with its own rows and positions
    assert list(old["l"].nearest("v", q, k=5).keys()) == _exact(rows[:0] + [r for r in old["l"]], q, 5)
    old.abort()
    db.close()
    db = pb.open(path)
    with db.transaction(readonly=True) as tx:
        assert list(tx["l"].nearest("v", q, k=10).keys()) == _exact(rows, q, 10)


def test_a_bad_vector_is_refused_at_the_list_write_and_nothing_changes():
    pytest.importorskip("hnswlib")
    db = pb.open()
    with db.transaction() as tx:
        tx["l"] = pb.List([{"v": [0.0, 1.0]}])
        tx["l"].create_vector_index("v", dim=2, metric="l2")
        tx["l"].create_index("v")
    with db.transaction() as tx:
        lst = tx["l"]
        for bad in ([1.0], ["a", "b"]):
            with pytest.raises(pb.VectorError):
                lst.append({"v": bad})
            with pytest.raises(pb.VectorError):
                lst.insert(0, {"v": bad})
            with pytest.raises(pb.VectorError):
                lst[0] = {"v": bad}
        assert list(lst) == [{"v": [0.0, 1.0]}]
        assert lst.where().count() == 1


def test_dump_and_load_keep_list_indexes(tmp_path, capsys):
    from protobase.cli import main
    src, dump, dst = str(tmp_path / "s.pb"), str(tmp_path / "d.jsonl"), str(tmp_path / "t.pb")
    rows = [{"x": i % 5, "n": i} for i in range(40)]
    with pb.open(src) as db, db.transaction() as tx:
        tx["l"] = pb.List(rows)
        tx["l"].create_index("x")
        tx["l"].insert(3, {"x": 4, "n": -1})
    rows.insert(3, {"x": 4, "n": -1})
    assert main(["dump", src, "-o", dump]) == 0 and main(["load", dst, dump]) == 0
    capsys.readouterr()
    with pb.open(dst) as db, db.transaction(readonly=True) as tx:
        lst = tx["l"]
        assert lst.indexes == ["x"] and list(lst) == rows
        q = lst.where(F.x == 4)
        assert list(q.keys()) == [p for p, r in enumerate(rows) if r["x"] == 4]
        assert "IndexedSearchPlan" in q.explain()
        assert db.check().problems == []


def test_compaction_and_backup_keep_list_indexes(tmp_path):
    path = str(tmp_path / "c.pb")
    rows = [{"x": i % 7} for i in range(500)]
    with pb.open(path) as db:
        _fill(db, rows)
        for i in range(5):                     # garbage for the compaction to drop
            with db.transaction() as tx:
                tx["l"].insert(i * 3, {"x": 99})
                rows.insert(i * 3, {"x": 99})
        db.compact()
        db.backup(str(tmp_path / "b.pb"))
    for p in (path, str(tmp_path / "b.pb")):
        with pb.open(p) as db, db.transaction(readonly=True) as tx:
            assert list(tx["l"].where(F.x == 99).keys()) == [p_ for p_, r in enumerate(rows) if r["x"] == 99]
            assert db.check().problems == []
