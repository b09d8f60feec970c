"""The database identity in the file header (format version 2) and what it ties together:
compaction, reopen and backup keep it; vector checkpoints are keyed with it, so one copied
from another database or forged without it is rebuilt; a version 1 file (tests/data/
format1.pb, written by the code of format 1) is read as it is read-only, upgraded at the
first writable open and dumped by the command line; an unknown version is refused."""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
import zlib

import pytest

import protobase as pb
from protobase.errors import InvalidArgumentError, NotADatabaseError
from protobase.storage import LogStore
from protobase.storage.log import FORMAT_VERSION, HEADER_SIZE

DATA = os.path.join(os.path.dirname(__file__), "data")
V1_FILE = os.path.join(DATA, "format1.pb")


def _header_identity(path):
    """The identity bytes at offset 20 of the header, read straight from the file."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    assert struct.unpack_from("<H", raw, 12)[0] == 2
    return uuid.UUID(bytes=raw[20:36])


def _v1_contents(tx):
    users = tx["users"]
    return ({k: users[k] for k in users.keys()}, list(tx["log"]))


V1_USERS = {f"u{i}": {"name": f"user {i}", "n": i, "tags": ["a", "b"][: i % 3]}
            for i in range(19)}
V1_USERS["u3"] = {"name": "changed", "n": 33, "tags": []}
V1_EXPECTED = (V1_USERS, list(range(10)))


def test_the_header_carries_an_identity_that_compact_reopen_and_backup_keep(tmp_path):
    path = str(tmp_path / "a.pb")
    db = pb.open(path)
    with db.transaction() as tx:
        tx["d"] = pb.Dict()
        tx["d"].update({i: "x" * 100 for i in range(200)})
    ident = db.stats()["database_id"]
    assert uuid.UUID(ident).version == 4
    assert db.stats()["format_version"] == FORMAT_VERSION == 2
    assert _header_identity(path) == uuid.UUID(ident)
    with db.transaction() as tx:
        for i in range(150):
            del tx["d"][i]
    sizes = db.compact()
    assert sizes["after"] < sizes["before"]
    assert db.stats()["database_id"] == ident and _header_identity(path) == uuid.UUID(ident)
    db.backup(str(tmp_path / "b.pb"))
    db.close()
    assert _header_identity(str(tmp_path / "b.pb")) == uuid.UUID(ident)
    with pb.open(path) as again:
        assert again.stats()["database_id"] == ident
    with pb.open(str(tmp_path / "b.pb"), readonly=True) as copy:
        assert copy.stats()["database_id"] == ident
        with copy.transaction() as tx:
            assert len(tx["d"]) == 50
    with pb.open(str(tmp_path / "other.pb")) as other:
        assert other.stats()["database_id"] != ident       # a new database, a new identity


def test_a_store_opened_to_continue_one_database_refuses_a_file_of_another(tmp_path):
    path = str(tmp_path / "a.pb")
    with LogStore.open(path) as s:
        mine = s.database_id
    with pytest.raises(InvalidArgumentError, match="belongs to database"):
        LogStore.open(path, database_id=uuid.uuid4())
    with LogStore.open(path, database_id=mine) as s:
        assert s.database_id == mine
    given = uuid.uuid4()
    with LogStore.open(str(tmp_path / "new.pb"), database_id=given) as s:
        assert s.database_id == given


# ---------------------------------------------------------------- vector checkpoints

np = None


def _vectors():
    global np
    np = pytest.importorskip("numpy")
    pytest.importorskip("hnswlib")
    rng = np.random.default_rng(11)
    print("seed 11")
    return rng.standard_normal((300, 8)).astype(np.float32)


def _vector_db(path, X):
    """A database of the rows X with an l2 vector index, closed with its checkpoint."""
    db = pb.open(path)
    with db.transaction() as tx:
        tx["docs"] = pb.Dict()
        docs = tx["docs"]
        docs.create_vector_index("e", dim=X.shape[1], metric="l2", M=8)
        for i in range(len(X)):
            docs[i] = {"e": X[i].tolist()}
    with db.transaction(readonly=True) as tx:
        assert _index(tx).origin == "rebuilt"
        assert tx["docs"].nearest("e", X[0], k=1).keys() == [0]
    db.close()
    [ckpt] = glob.glob(f"{path}-vec-*.hnsw")
    return ckpt


def _index(tx):
    return tx["docs"].where()._source.vector_index("e")


def _split(data, magic):
    assert data[:len(magic)] == magic
    (hlen,) = struct.unpack_from("<Q", data, len(magic))
    start = len(magic) + 8
    return json.loads(data[start:start + hlen]), data[start + hlen:]


def _assemble(magic, header, body):
    head = json.dumps(header).encode("utf-8")
    return magic + struct.pack("<Q", len(head)) + head + body


def test_a_checkpoint_copied_from_another_database_with_the_same_rows_is_rebuilt(tmp_path):
    X = _vectors()
    a_ckpt = _vector_db(str(tmp_path / "a.pb"), X)
    b_path = str(tmp_path / "b.pb")
    b_ckpt = _vector_db(b_path, X)
    assert os.path.basename(a_ckpt)[1:] == os.path.basename(b_ckpt)[1:]   # same spec, same name
    shutil.copyfile(a_ckpt, b_ckpt)
    with pb.open(b_path) as db, db.transaction(readonly=True) as tx:
        ix = _index(tx)
        assert tx["docs"].nearest("e", X[7], k=1).keys() == [7]
        assert ix.origin == "rebuilt", ix.reason
        assert ix.reason.startswith("untrusted checkpoint (") and "another database" in ix.reason


def _forge(ckpt, X, how):
    """The real checkpoint with row 5's vector replaced by row 9's (so a trusted forgery
    answers row 5 for a query at row 9), its checksum recomputed by one who does not know
    the database's identity."""
    with open(ckpt, "rb") as f:
        data = f.read()
    header, body = _split(data, data[:8])      # PBHNSW1 when run on the code of format 1
    n, dim = header["count"], X.shape[1]
    labels = np.frombuffer(body[:n * 8], "<i8")
    mat = np.frombuffer(body[n * 8:n * 8 + n * 4 * dim], "<f4").reshape(n, dim).copy()
    mat[int(np.flatnonzero(labels == 5)[0])] = X[9]
    body = body[:n * 8] + mat.tobytes() + body[n * 8 + n * 4 * dim:]
    fields = {k: v for k, v in header.items() if k != "mac"}
    if how == "plain crc, format 1":
        old = {k: v for k, v in fields.items() if k != "database"}
        return _assemble(b"PBHNSW1\n", dict(old, crc32=zlib.crc32(body)), body)
    from protobase.vector.hnsw import checkpoint_mac
    if how == "crc salted with a guess":
        return _assemble(b"PBHNSW2\n", dict(fields, mac=zlib.crc32(body, 12345)), body)
    if how == "keyless mac, identity kept":
        return _assemble(b"PBHNSW2\n", dict(fields, mac=checkpoint_mac(fields, body, None)), body)
    assert how == "keyless mac, no identity"
    fields["database"] = None
    return _assemble(b"PBHNSW2\n", dict(fields, mac=checkpoint_mac(fields, body, None)), body)


@pytest.mark.parametrize("how", ["plain crc, format 1", "crc salted with a guess",
                                 "keyless mac, identity kept", "keyless mac, no identity"])
def test_a_forged_checkpoint_with_a_recomputed_checksum_but_no_identity_is_rebuilt(tmp_path, how):
    X = _vectors()
    path = str(tmp_path / "a.pb")
    ckpt = _vector_db(path, X)
    forged = _forge(ckpt, X, how)
    with open(ckpt, "wb") as f:
        f.write(forged)
    with pb.open(path) as db, db.transaction(readonly=True) as tx:
        ix = _index(tx)
        hits = tx["docs"].nearest("e", X[9], k=2)
        assert ix.origin == "rebuilt", (how, ix.reason)
        assert ix.reason.startswith(("untrusted checkpoint (", "damaged checkpoint (checksum"))
        assert hits.keys()[0] == 9 and hits.distances()[0] == 0.0
        assert ix.knn(X[9], 1)[0].tolist() == [9]          # the graph holds row 5 where it was
        assert ix.knn(X[5], 1)[0].tolist() == [5]


def test_after_compact_and_reopen_the_checkpoint_is_loaded_not_rebuilt(tmp_path):
    X = _vectors()
    path = str(tmp_path / "a.pb")
    ckpt = _vector_db(path, X)
    before = os.path.getmtime(ckpt), open(ckpt, "rb").read()
    db = pb.open(path)
    ident = db.stats()["database_id"]
    with db.transaction() as tx:
        tx["junk"] = pb.Dict()
        tx["junk"].update({i: "y" * 200 for i in range(300)})
    with db.transaction() as tx:
        del tx["junk"]
    db.compact()                                 # the index was never loaded in this process
    assert db.stats()["database_id"] == ident
    db.close()
    assert open(ckpt, "rb").read() == before[1]  # the checkpoint written before the compaction
    db = pb.open(path)
    with db.transaction(readonly=True) as tx:
        ix = _index(tx)
        assert tx["docs"].nearest("e", X[3], k=1).keys() == [3]
        assert (ix.origin, ix.caught_up) == ("checkpoint", 0), ix.reason
    with db.transaction() as tx:
        tx["docs"][1000] = {"e": X[4].tolist()}
    db.compact()                                 # now with the index loaded
    with db.transaction(readonly=True) as tx:
        assert sorted(tx["docs"].nearest("e", X[4], k=2).keys()) == [4, 1000]
        assert _index(tx) is ix and ix.origin == "checkpoint"    # kept, not rebuilt
    db.close()
    with pb.open(path) as again, again.transaction(readonly=True) as tx:
        ix = _index(tx)
        assert (ix.origin, ix.caught_up) == ("checkpoint", 0), ix.reason
        assert len(ix) == 301


# ---------------------------------------------------------------- format version 1

@pytest.fixture
def v1(tmp_path):
    path = str(tmp_path / "old.pb")
    shutil.copyfile(V1_FILE, path)
    with open(path, "rb") as f:
        assert struct.unpack_from("<H", f.read(14), 12)[0] == 1
    return path


def test_a_version_1_file_is_read_as_it_is_by_a_read_only_open(v1):
    raw = open(v1, "rb").read()
    with pb.open(v1, readonly=True) as db:
        st = db.stats()
        assert (st["format_version"], st["database_id"]) == (1, None)
        with db.transaction() as tx:
            assert _v1_contents(tx) == V1_EXPECTED
        assert db.check().problems == []
    assert open(v1, "rb").read() == raw


def test_a_version_1_file_is_upgraded_at_the_first_writable_open_with_nothing_lost(v1, caplog):
    with pb.open(v1) as db:
        st = db.stats()
        assert st["format_version"] == 2 and uuid.UUID(st["database_id"]).version == 4
        with db.transaction() as tx:
            assert _v1_contents(tx) == V1_EXPECTED
            tx["log"].append(10)
        assert db.check().problems == []
        ident = st["database_id"]
    assert "upgraded from ProtoBase file format 1 to 2" in caplog.text
    assert _header_identity(v1) == uuid.UUID(ident)
    assert sorted(os.listdir(os.path.dirname(v1))) == ["old.pb"]      # no leftover files
    with pb.open(v1) as db, db.transaction() as tx:
        assert db.stats()["database_id"] == ident
        assert list(tx["log"]) == list(range(11))


def test_a_failed_upgrade_leaves_the_version_1_file_or_a_complete_upgrade(v1):
    from protobase.storage import FaultInjector
    raw = open(v1, "rb").read()
    outcomes = set()
    for n in range(1, 60):                       # fail each write/sync/truncate in turn
        shutil.copyfile(V1_FILE, v1)
        inj = FaultInjector(fail_at=n)
        try:
            pb.open(v1, file_layer=inj).close()
        except OSError:
            pass
        assert sorted(os.listdir(os.path.dirname(v1))) == ["old.pb"], n
        if open(v1, "rb").read() == raw:
            outcomes.add("untouched")
        else:                                    # the rename happened: all of it is there
            with pb.open(v1, readonly=True) as db, db.transaction() as tx:
                assert db.stats()["format_version"] == 2, n
                assert _v1_contents(tx) == V1_EXPECTED, n
            outcomes.add("upgraded")
        if inj.failures == 0:
            break                                # n is past the last operation of the open
    else:
        pytest.fail("the open never got past its injected faults")
    assert outcomes == {"untouched", "upgraded"}
    with pb.open(v1) as db, db.transaction() as tx:
        assert db.stats()["format_version"] == 2
        assert _v1_contents(tx) == V1_EXPECTED


def _cli(env, cwd, *args):
    return subprocess.run([sys.executable, "-m", "protobase", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


def test_protobase_dump_reads_a_version_1_file_and_load_makes_a_new_version_2_database(
        v1, tmp_path, child_env, child_cwd):
    raw = open(v1, "rb").read()
    dumped = _cli(child_env, child_cwd, "dump", v1)
    assert dumped.returncode == 0, dumped.stderr
    assert open(v1, "rb").read() == raw          # dump reads; it never upgrades
    assert '"changed"' in dumped.stdout and '"user 18"' in dumped.stdout
    new = str(tmp_path / "new.pb")
    dump_file = tmp_path / "dump.jsonl"
    dump_file.write_text(dumped.stdout)
    loaded = _cli(child_env, child_cwd, "load", new, str(dump_file))
    assert loaded.returncode == 0, loaded.stderr
    with pb.open(new, readonly=True) as db, db.transaction() as tx:
        assert db.stats()["format_version"] == 2 and db.stats()["database_id"] is not None
        assert _v1_contents(tx) == V1_EXPECTED


# ---------------------------------------------------------------- other versions

def _with_version(path, version, size):
    """Rewrite the header's version field (and its checksum over ``size`` bytes)."""
    raw = bytearray(open(path, "rb").read())
    struct.pack_into("<H", raw, 12, version)
    struct.pack_into("<I", raw, size - 4, zlib.crc32(bytes(raw[:size - 4])))
    with open(path, "wb") as f:
        f.write(raw)
    return bytes(raw)


@pytest.mark.parametrize("readonly", [False, True])
def test_an_unknown_future_format_version_is_refused_with_a_clear_error(tmp_path, readonly):
    path = str(tmp_path / "future.pb")
    with pb.open(path) as db, db.transaction() as tx:
        tx["x"] = 1
    raw = _with_version(path, 3, HEADER_SIZE)
    with pytest.raises(NotADatabaseError, match=r"format version 3; this build reads versions "
                                                r"1, 2: upgrade protobase"):
        pb.open(path, readonly=readonly)
    assert open(path, "rb").read() == raw


def test_a_torn_version_2_header_is_a_new_empty_database(tmp_path):
    path = str(tmp_path / "torn.pb")
    with pb.open(str(tmp_path / "whole.pb")):
        pass
    with open(str(tmp_path / "whole.pb"), "rb") as f:
        header = f.read(HEADER_SIZE)
    with open(path, "wb") as f:
        f.write(header[:40])                    # the power went while the header was written
    with pb.open(path) as db, db.transaction() as tx:
        assert list(tx.root.keys()) == []
        assert db.stats()["format_version"] == 2
    assert os.path.getsize(path) > HEADER_SIZE


@pytest.mark.parametrize("loaded", [False, True], ids=["index-unloaded", "index-loaded"])
def test_a_backup_carries_the_vector_checkpoints_its_copy_loads(tmp_path, loaded):
    X = _vectors()
    path, copy = str(tmp_path / "a.pb"), str(tmp_path / "copy.pb")
    _vector_db(path, X)
    with pb.open(path) as db:
        if loaded:
            with db.transaction() as tx:
                tx["docs"][1000] = {"e": X[4].tolist()}
                assert sorted(tx["docs"].nearest("e", X[4], k=2).keys()) == [4, 1000]
        db.backup(copy)
    assert [os.path.basename(p)[len("copy.pb"):] for p in glob.glob(f"{copy}-vec-*.hnsw")] == \
        [os.path.basename(p)[len("a.pb"):] for p in glob.glob(f"{path}-vec-*.hnsw")]
    with pb.open(copy, readonly=True) as db, db.transaction(readonly=True) as tx:
        ix = _index(tx)
        want = [4, 1000] if loaded else [4]
        assert sorted(tx["docs"].nearest("e", X[4], k=len(want)).keys()) == want
        assert ix.origin == "checkpoint", ix.reason     # the backup's own side file, trusted
        assert ix.caught_up == 0
