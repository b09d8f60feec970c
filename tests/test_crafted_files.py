"""Checksum-valid crafted files: every damage reads as a typed error, never a crash, a
hang or a KeyError/IndexError/AttributeError from deep inside a read.

The deterministic tests forge one state through the real storage layer (so every atom,
commit and footer checksum is right) with one part out of step with the others, each the
shape of a failure the crafted-file fuzz (tests/fuzz_files.py) found. The fuzz itself
runs a short seeded round here; `python tests/fuzz_files.py --seed S --rounds N` runs
longer ones."""
import importlib.util
import os
import random

import pytest

import protobase as pb
from protobase.errors import CorruptionError, DecodeError
from protobase.query import F
from protobase.state import State, pvec

_spec = importlib.util.spec_from_file_location(
    "fuzz_files", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_files.py"))
fuzz_files = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_files)


def _forge(path, name, change):
    """Commit, through the real storage layer, a state where collection `name` is
    `change(its CollState)`: every checksum in the file is valid."""
    with pb.open(path) as db:
        with db.transaction() as tx:
            cid = tx[name]._cid
        head = db._head
        forged = State(head.colls.set(cid, change(head.colls[cid])), head.next_coll_id,
                       head.seq + 1)
        with db._commit_lock:
            db._write_state(forged).result()
    with pb.open(path, readonly=True) as db:
        assert not db._store.check().problems     # every checksum in the file holds


@pytest.fixture
def path(tmp_path):
    p = str(tmp_path / "forged.pb")
    with pb.open(p) as db, db.transaction() as tx:
        tx["users"] = pb.Dict({f"u{i}": {"age": i % 4, "name": f"n{i}"} for i in range(12)})
        tx["users"].create_index("age")
        tx["rows"] = pb.List([{"k": i % 3} for i in range(10)])
        tx["rows"].create_index("k")
        tx["plain"] = pb.SortedDict({1: "a", 2: "b"})
    return p


@pytest.mark.parametrize("name", ["users", "rows", "plain"])
def test_a_collection_descriptor_without_its_data_part_is_a_corruption_error(path, name):
    _forge(path, name, lambda cs: cs.replace(data=None))
    with pb.open(path, readonly=True) as db:
        assert any("no 'data' part" in p.message for p in db.check().problems)
    with pytest.raises(CorruptionError, match="data"):
        with pb.open(path, readonly=True) as db, db.transaction(readonly=True) as tx:
            len(tx[name])


@pytest.mark.parametrize("part", ["ix/age/tree", "keyof", "ids"])
def test_a_descriptor_missing_an_index_part_its_meta_names_is_a_corruption_error(path, part):
    _forge(path, "users", lambda cs: cs.replace(**{part: None}))
    with pytest.raises(CorruptionError, match=part):
        with pb.open(path, readonly=True) as db, db.transaction(readonly=True) as tx:
            tx["users"].where(F.age == 1).keys()


def _drop_key(cs, key):
    m = cs.data.mutate()
    del m[key]
    return cs.replace(data=m.finish())


@pytest.mark.parametrize("query", [lambda u: u.where(F.age == 1).keys(),
                                   lambda u: list(u.where(F.age == 1)),
                                   lambda u: list(u.where(F.age >= 0).order_by("age"))],
                         ids=["keys", "values", "ordered"])
def test_an_index_posting_naming_a_row_without_an_entry_is_a_corruption_error(path, query):
    _forge(path, "users", lambda cs: _drop_key(cs, "u1"))           # u1 has age 1
    with pb.open(path, readonly=True) as db, db.transaction(readonly=True) as tx:
        with pytest.raises(CorruptionError, match="names row"):
            query(tx["users"])
        assert "u1" not in tx["users"] and tx["users"]["u2"] == {"age": 2, "name": "n2"}


def test_a_row_id_missing_from_the_key_table_is_a_corruption_error(path):
    def drop_rowid(cs):
        m = cs.part("keyof").mutate()
        del m[cs.part("rowid")["u1"]]
        return cs.replace(keyof=m.finish())
    _forge(path, "users", drop_rowid)
    with pb.open(path, readonly=True) as db, db.transaction(readonly=True) as tx:
        with pytest.raises(CorruptionError, match="names row"):
            tx["users"].where(F.age == 1).keys()


def test_a_list_whose_row_order_outruns_its_data_is_a_corruption_error(path):
    _forge(path, "rows", lambda cs: cs.replace(data=pvec.Vector(list(cs.data)[:4])))
    with pb.open(path, readonly=True) as db, db.transaction(readonly=True) as tx:
        rows = tx["rows"]
        assert len(rows) == 4
        with pytest.raises(CorruptionError, match="names row"):
            list(rows.where(F.k == 1))        # rows 1, 4, 7: 7 is past the data


@pytest.mark.slow
def test_crafted_files_with_valid_checksums_never_crash_hang_or_raise_untyped_errors(
        tmp_path, child_env):
    seed = random.randrange(2 ** 32)
    print("seed", seed)
    counts, failures = fuzz_files.fuzz(seed, 800, str(tmp_path), batch=50, timeout=120,
                                       env=child_env, log=print)
    print(counts)
    assert not failures, (seed, failures[:5])
    typed = sum(v for k, v in counts.items() if k.startswith("typed"))
    assert typed >= 50, counts      # the mutations reach the decoders, not only dead atoms


@pytest.mark.parametrize("stored", [7, {"a": 1}, "text", [b"x"]], ids=repr)
@pytest.mark.parametrize("kind", ["Dict", "List", "SortedDict"])
def test_a_node_holding_a_non_bytes_value_where_an_encoded_value_belongs_is_a_decode_error(
        tmp_path, kind, stored):
    # Found by the fuzz (seed 12345): a forged leaf whose value slot decodes to an int.
    path = str(tmp_path / "slot.pb")
    with pb.open(path) as db, db.transaction() as tx:
        tx["c"] = pb.List([1, 2]) if kind == "List" else getattr(pb, kind)({1: "a", 2: "b"})

    def swap(cs):
        if kind == "List":
            return cs.replace(data=pvec.Vector([cs.data[0], stored]))
        m = cs.data.mutate()
        m[2] = stored
        return cs.replace(data=m.finish())
    _forge(path, "c", swap)
    with pb.open(path, readonly=True) as db, db.transaction(readonly=True) as tx:
        c = tx["c"]
        assert (c[0] if kind == "List" else c[1]) == (1 if kind == "List" else "a")
        with pytest.raises(DecodeError, match="damaged or forged"):
            list(c) if kind == "List" else list(c.items())
        with pytest.raises(DecodeError):
            c[1] if kind == "List" else c[2]
