"""Transactions: snapshot isolation, per-key merges, conflicts, serializable, retries.

The Hermitage anomaly set (github.com/ept/hermitage) is written against our API with the
outcome snapshot isolation must give, and the stricter one `serializable` must give.
Every test runs on an in-memory database and on a real file.
"""
import threading

import pytest

import protobase as pb


@pytest.fixture(params=["memory", "file"])
def db(request, tmp_path):
    if request.param == "memory":
        d = pb.open()
    else:
        d = pb.open(str(tmp_path / "t.pb"), durability="normal")
    with d.transaction() as tx:
        tx.root["t"] = pb.Dict({1: 10, 2: 20})
    yield d
    d.close()


def read(db, key, name="t"):
    with db.transaction(readonly=True) as tx:
        return tx[name].get(key)


# -- Hermitage ------------------------------------------------------------------------


def test_g0_write_cycles_fail_the_later_committer(db):
    t1, t2 = db.transaction(), db.transaction()
    t1["t"][1] = 11
    t2["t"][1] = 12
    t1["t"][2] = 21
    t1.commit()
    t2["t"][2] = 22
    with pytest.raises(pb.ConflictError) as info:
        t2.commit()
    assert info.value.key == 1
    assert read(db, 1) == 11 and read(db, 2) == 21


def test_g1a_aborted_writes_are_never_seen(db):
    t1, t2 = db.transaction(), db.transaction()
    t1["t"][1] = 101
    t1.abort()
    assert t2["t"][1] == 10
    t2.commit()
    assert read(db, 1) == 10


def test_g1b_intermediate_values_are_never_seen(db):
    t1, t2 = db.transaction(), db.transaction()
    t1["t"][1] = 101
    assert t2["t"][1] == 10
    t1["t"][1] = 11
    t1.commit()
    assert t2["t"][1] == 10          # still its snapshot
    assert read(db, 1) == 11


def test_g1c_circular_information_flow_is_prevented(db):
    t1, t2 = db.transaction(), db.transaction()
    t1["t"][1] = 11
    t2["t"][2] = 22
    assert t1["t"][2] == 20
    assert t2["t"][1] == 10
    t1.commit()
    t2.commit()                      # different keys: both commit
    assert read(db, 1) == 11 and read(db, 2) == 22


def test_otv_observed_transaction_does_not_vanish(db):
    t1, t2, t3 = db.transaction(), db.transaction(), db.transaction()
    t1["t"][1] = 11
    t1["t"][2] = 19
    t2["t"][1] = 12
    t1.commit()
    with pytest.raises(pb.ConflictError):
        t2.commit()
    assert t3["t"][1] == 10 and t3["t"][2] == 20     # t3's snapshot predates t1
    t4 = db.transaction()
    assert t4["t"][1] == 11 and t4["t"][2] == 19
    t3.abort()
    t4.abort()


def test_pmp_predicates_see_the_snapshot(db):
    t1, t2 = db.transaction(), db.transaction()
    assert [k for k, v in t1["t"].items() if v == 30] == []
    t2["t"][3] = 30
    t2.commit()
    assert [k for k, v in t1["t"].items() if v == 30] == []
    t1.commit()


def test_p4_lost_update_is_prevented(db):
    t1, t2 = db.transaction(), db.transaction()
    t1["t"][1] = t1["t"][1] + 1
    t2["t"][1] = t2["t"][1] + 1
    t1.commit()
    with pytest.raises(pb.ConflictError):
        t2.commit()
    assert read(db, 1) == 11


def test_g_single_read_skew_is_prevented(db):
    t1, t2 = db.transaction(), db.transaction()
    assert t1["t"][1] == 10
    t2["t"][1] = 12
    t2["t"][2] = 18
    t2.commit()
    assert t1["t"][2] == 20          # consistent with the x it read
    t1.commit()


@pytest.mark.parametrize("isolation", ["snapshot", "serializable"])
def test_g2_item_write_skew(db, isolation):
    t1 = db.transaction(isolation=isolation)
    t2 = db.transaction(isolation=isolation)
    assert t1["t"][1] + t1["t"][2] == 30
    assert t2["t"][1] + t2["t"][2] == 30
    t1["t"][1] = 0
    t2["t"][2] = 0
    t1.commit()
    if isolation == "snapshot":
        t2.commit()                  # snapshot isolation allows write skew
        assert read(db, 1) == 0 and read(db, 2) == 0
    else:
        with pytest.raises(pb.ConflictError):
            t2.commit()
        assert read(db, 1) == 0 and read(db, 2) == 20


@pytest.mark.parametrize("isolation", ["snapshot", "serializable"])
def test_g2_anti_dependency_cycles_on_a_predicate(db, isolation):
    t1 = db.transaction(isolation=isolation)
    t2 = db.transaction(isolation=isolation)
    assert [v for v in t1["t"].values() if v % 3 == 0] == []
    assert [v for v in t2["t"].values() if v % 3 == 0] == []
    t1["t"][3] = 30
    t2["t"][4] = 42
    t1.commit()
    if isolation == "snapshot":
        t2.commit()
        assert read(db, 3) == 30 and read(db, 4) == 42
    else:
        with pytest.raises(pb.ConflictError):
            t2.commit()
        assert read(db, 4) is None


@pytest.mark.parametrize("probe", ["getitem", "get", "contains"])
def test_serializable_reads_of_absent_keys_conflict_with_a_concurrent_insert(db, probe):
    t1 = db.transaction(isolation="serializable")
    t2 = db.transaction()
    d = t1["t"]
    if probe == "getitem":
        with pytest.raises(KeyError):
            d[5]
    elif probe == "get":
        assert d.get(5, "none") == "none"
    else:
        assert 5 not in d
    assert 5 in d._reads             # the miss is recorded whichever way it was probed
    t1["t"][6] = 60                  # a write, so the commit has to validate what it read
    t2["t"][5] = 50
    t2.commit()
    with pytest.raises(pb.ConflictError):
        t1.commit()
    assert read(db, 5) == 50 and read(db, 6) is None


def test_serializable_reads_of_present_keys_conflict_only_when_changed(db):
    t1 = db.transaction(isolation="serializable")
    t2 = db.transaction()
    assert t1["t"][1] == 10 and 2 in t1["t"]
    t1["t"][7] = 70
    t2["t"][3] = 30                  # a key t1 never read
    t2.commit()
    t1.commit()
    assert read(db, 7) == 70 and read(db, 3) == 30


def test_a_refused_key_leaves_no_read_behind(db):
    t1 = db.transaction(isolation="serializable")
    d = t1["t"]
    for probe in (lambda: d[object()], lambda: d.get(object()), lambda: object() in d):
        with pytest.raises(TypeError):
            probe()
    # A recorded read of a refused key would make every later merge of this commit fail.
    assert d._reads == set()
    assert d[1] == 10 and d._reads == {1}
    t1.abort()


def test_values_read_are_fresh_copies_each_time(db):
    with db.transaction() as tx:
        tx["t"]["doc"] = {"tags": ["a"], "n": {"x": 1}}
        first = tx["t"]["doc"]
        first["tags"].append("changed")
        first["n"]["x"] = 2
        again = tx["t"]["doc"]
        assert again == {"tags": ["a"], "n": {"x": 1}} and again is not first
        assert tx["t"].get("doc") == again and dict(tx["t"].items())["doc"] == again


def test_a_free_standing_collection_inside_a_value_is_stored_while_the_value_is_encoded(db):
    # Adopting the inner Dict encodes its contents from inside the outer value's encoding.
    with db.transaction() as tx:
        tx["t"]["outer"] = {"before": "b" * 100, "inner": pb.Dict({"k": {"deep": [1, 2, 3]}}),
                            "after": list(range(40))}
    with db.transaction(readonly=True) as tx:
        outer = tx["t"]["outer"]
        assert outer["before"] == "b" * 100 and outer["after"] == list(range(40))
        assert isinstance(outer["inner"], pb.Dict) and outer["inner"]["k"] == {"deep": [1, 2, 3]}


def test_serializable_read_only_transactions_commit(db):
    t1 = db.transaction(isolation="serializable")
    t2 = db.transaction()
    assert t1["t"][1] == 10
    t2["t"][1] = 99
    t2.commit()
    t1.commit()                      # wrote nothing: serializable at its snapshot


# -- merges ---------------------------------------------------------------------------


def test_writes_to_different_keys_merge(db):
    t1, t2 = db.transaction(), db.transaction()
    t1["t"]["a"] = 1
    t2["t"]["b"] = 2
    del t2["t"][2]
    t1.commit()
    t2.commit()
    with db.transaction(readonly=True) as tx:
        assert dict(tx["t"].items()) == {1: 10, "a": 1, "b": 2}


def test_different_root_names_merge_and_same_name_conflicts(db):
    t1, t2, t3 = db.transaction(), db.transaction(), db.transaction()
    t1["x"] = 1
    t2["y"] = 2
    t3["x"] = 3
    t1.commit()
    t2.commit()
    with pytest.raises(pb.ConflictError) as info:
        t3.commit()
    assert info.value.key == "x"
    with db.transaction() as tx:
        assert tx["x"] == 1 and tx["y"] == 2


def test_concurrent_list_appends_both_land(db):
    with db.transaction() as tx:
        tx["log"] = pb.List([0])
    t1, t2 = db.transaction(), db.transaction()
    t1["log"].append(1)
    t1["log"].append(2)
    t2["log"].append(3)
    t2.commit()
    t1.commit()
    with db.transaction() as tx:
        assert list(tx["log"]) == [0, 3, 1, 2]


def test_concurrent_list_edits_other_than_appends_conflict(db):
    with db.transaction() as tx:
        tx["log"] = pb.List([0, 1])
    t1, t2 = db.transaction(), db.transaction()
    t1["log"][0] = "a"
    t2["log"].append(5)
    t2.commit()
    with pytest.raises(pb.ConflictError):
        t1.commit()
    with db.transaction() as tx:
        assert list(tx["log"]) == [0, 1, 5]


def test_set_members_merge_per_member(db):
    with db.transaction() as tx:
        tx["s"] = pb.Set({1, 2})
    t1, t2, t3 = db.transaction(), db.transaction(), db.transaction()
    t1["s"].add(3)
    t2["s"].discard(1)
    t3["s"].add(3)
    t1.commit()
    t2.commit()
    with pytest.raises(pb.ConflictError):
        t3.commit()
    with db.transaction() as tx:
        assert tx["s"] == {2, 3}


def test_sorted_dict_keys_merge(db):
    with db.transaction() as tx:
        tx["sd"] = pb.SortedDict({5: "e", 1: "a"})
    t1, t2 = db.transaction(), db.transaction()
    t1["sd"][3] = "c"
    t2["sd"][9] = "i"
    t1.commit()
    t2.commit()
    with db.transaction() as tx:
        assert list(tx["sd"].items()) == [(1, "a"), (3, "c"), (5, "e"), (9, "i")]


# -- lifecycle errors -----------------------------------------------------------------


def test_handles_and_transactions_refuse_use_after_commit(db):
    tx = db.transaction()
    t = tx["t"]
    tx.commit()
    with pytest.raises(pb.TransactionClosedError):
        t[1]
    with pytest.raises(pb.TransactionClosedError):
        t[1] = 5
    with pytest.raises(pb.TransactionClosedError):
        tx["t"]
    with pytest.raises(pb.TransactionClosedError):
        tx.commit()
    assert read(db, 1) == 10


def test_read_only_transactions_refuse_writes(db):
    with db.transaction(readonly=True) as tx:
        with pytest.raises(pb.ReadOnlyError):
            tx["t"][1] = 5
        with pytest.raises(pb.ReadOnlyError):
            tx["new"] = 1
    assert read(db, 1) == 10


def test_exception_in_with_block_aborts_and_reraises(db):
    with pytest.raises(ZeroDivisionError):
        with db.transaction() as tx:
            tx["t"][1] = 999
            1 / 0
    assert read(db, 1) == 10


def test_unhashable_keys_are_a_type_error_and_change_nothing(db):
    with db.transaction() as tx:
        with pytest.raises(TypeError):
            tx["t"][[1, 2]] = 1
        with pytest.raises(TypeError):
            tx["t"][{"a": 1}]
    assert read(db, 1) == 10


def test_unknown_isolation_level_is_refused(db):
    with pytest.raises(ValueError):
        db.transaction(isolation="chaos")


# -- retries under real threads -------------------------------------------------------


def test_threaded_increments_through_run_are_exact(db):
    with db.transaction() as tx:
        tx["counter"] = pb.Dict({"n": 0})
    n_threads, per_thread = 6, 40

    def incr(tx):
        c = tx["counter"]
        c["n"] = c["n"] + 1

    def worker():
        for _ in range(per_thread):
            db.run(incr, retries=1000)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.transaction() as tx:
        assert tx["counter"]["n"] == n_threads * per_thread


def test_threaded_bank_transfers_keep_the_total(db):
    import random
    accounts = 8
    with db.transaction() as tx:
        tx["bank"] = pb.Dict({i: 100 for i in range(accounts)})

    @db.transactional(retries=1000)
    def transfer(tx, a, b, amount):
        bank = tx["bank"]
        if bank[a] >= amount:
            bank[a] -= amount
            bank[b] += amount

    def worker(seed):
        rnd = random.Random(seed)
        for _ in range(50):
            a, b = rnd.sample(range(accounts), 2)
            transfer(a, b, rnd.randint(1, 30))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.transaction() as tx:
        values = list(tx["bank"].values())
    assert sum(values) == 100 * accounts and min(values) >= 0


def test_run_passes_arguments_and_returns_the_result(db):
    def f(tx, a, b=0):
        tx["r"] = a + b
        return a * b
    assert db.run(f, 3, b=4) == 12
    with db.transaction() as tx:
        assert tx["r"] == 7


# -- maintenance ------------------------------------------------------------------------


def test_compaction_keeps_every_commit_and_shrinks_the_file(tmp_path):
    path = str(tmp_path / "c.pb")
    db = pb.open(path, durability="none")
    with db.transaction() as tx:
        tx["d"] = pb.Dict()
        tx["l"] = pb.List()
    for i in range(200):
        with db.transaction() as tx:
            tx["d"][i % 20] = "x" * 100 + str(i)
            tx["l"].append(i)
    old = db.transaction(readonly=True)          # a snapshot from before compaction
    before = old["d"][5]
    result = db.compact()
    assert result["after"] < result["before"] / 3
    assert old["d"][5] == before and len(old["l"]) == 200     # old snapshot still reads
    with db.transaction() as tx:                 # and writes go on after the swap
        tx["d"]["after"] = 1
        tx["l"].append("after")
    late = db.transaction()
    late["d"]["late"] = 2
    late.commit()
    assert db.check().problems == []
    db.close()
    with pb.open(path) as db2:
        with db2.transaction() as tx:
            assert tx["d"]["after"] == 1 and tx["d"]["late"] == 2
            assert tx["d"][19] == "x" * 100 + "199"
            assert list(tx["l"]) == list(range(200)) + ["after"]


def test_a_transaction_begun_before_compaction_merges_after_it(tmp_path):
    db = pb.open(str(tmp_path / "m.pb"))
    with db.transaction() as tx:
        tx["d"] = pb.Dict({1: 1})
    t = db.transaction()
    t["d"][2] = 2
    db.compact()
    t.commit()
    with db.transaction() as tx:
        assert dict(tx["d"].items()) == {1: 1, 2: 2}
    assert db.check().problems == []
    db.close()


def test_backup_is_a_consistent_copy(tmp_path):
    db = pb.open(str(tmp_path / "src.pb"))
    with db.transaction() as tx:
        tx["d"] = pb.Dict({i: str(i) for i in range(500)})
        tx["s"] = pb.SortedDict({"b": 2, "a": 1})
    db.backup(str(tmp_path / "copy.pb"))
    with pytest.raises(FileExistsError):
        db.backup(str(tmp_path / "copy.pb"))
    db.close()
    with pb.open(str(tmp_path / "copy.pb"), readonly=True) as b:
        with b.transaction() as tx:
            assert dict(tx["d"].items()) == {i: str(i) for i in range(500)}
            assert list(tx["s"].items()) == [("a", 1), ("b", 2)]
        assert b.check().problems == []


def test_db_run_refuses_a_negative_or_non_int_retries_with_typed_errors():
    db = pb.open()
    calls = []
    with pytest.raises(pb.InvalidArgumentError, match="retries must be >= 0"):
        db.run(lambda tx: calls.append(1), retries=-1)
    with pytest.raises(TypeError, match="retries must be an int"):
        db.run(lambda tx: calls.append(1), retries="3")
    with pytest.raises(pb.InvalidArgumentError):
        db.transactional(retries=-2)
    assert calls == []                       # refused before anything ran
    assert db.run(lambda tx: 7, retries=0) == 7
