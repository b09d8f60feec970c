"""A vector checkpoint whose CRC was recomputed after its hnswlib graph was tampered with
(or damaged by a writer that recomputed it) must never reach hnswlib's loader: the graph
is bounds-checked first, a bad one ignored and the index rebuilt from the rows, and the
answers stay exact. The forged files are opened in a child process, so a segfault inside
hnswlib fails the test instead of killing pytest."""
import glob
import json
import os
import struct
import subprocess
import sys
import uuid

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("hnswlib")

import protobase as pb  # noqa: E402
from protobase.vector.graphcheck import HEADER, check_graph  # noqa: E402
from protobase.vector.hnsw import checkpoint_mac  # noqa: E402

DIM, M, N, EFC = 6, 4, 400, 200
MAGIC = b"PBHNSW2\n"

def _child_code():
    return (
        "import json, os, shutil, sys\n"
        "import numpy as np\n"
        "import protobase as pb\n"
        "path, ckpt, q = sys.argv[1], sys.argv[2], np.asarray(json.loads(sys.argv[3]), np.float32)\n"
        "for forged in sys.argv[4:]:\n"
        "    shutil.copyfile(forged, ckpt)\n"
        "    db = pb.open(path)\n"
        "    with db.transaction(readonly=True) as tx:\n"
        "        docs = tx['docs']\n"
        "        ix = docs.where()._source.vector_index('e')\n"
        "        hits = docs.where().nearest('e', q, k=5, ef=400)\n"
        "        out = {'name': os.path.basename(forged), 'origin': ix.origin,\n"
        "               'reason': ix.reason, 'keys': hits.keys(), 'dists': hits.distances()}\n"
        "    db.close()\n"
        "    print(json.dumps(out), flush=True)\n")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A database of N rows with an l2 vector index, closed (so its checkpoint is written):
    (path, checkpoint path, the checkpoint's bytes, the vectors)."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((N, DIM)).astype(np.float32)
    path = str(tmp_path_factory.mktemp("forgery") / "db.pb")
    db = pb.open(path)
    with db.transaction() as tx:
        tx["docs"] = pb.Dict()
        docs = tx["docs"]
        docs.create_vector_index("e", dim=DIM, metric="l2", M=M)
        for i in range(N):
            docs[i] = {"e": X[i].tolist()}
    with db.transaction(readonly=True) as tx:     # builds the index, checkpointed at close
        assert tx["docs"].nearest("e", X[0], k=1).keys() == [0]
    db.close()
    [ckpt] = glob.glob(f"{path}-vec-*")
    with open(ckpt, "rb") as f:
        return path, ckpt, f.read(), X


def _split(data):
    """(header dict, rows+vectors bytes, graph bytes) of a checkpoint."""
    assert data[:len(MAGIC)] == MAGIC
    (hlen,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(data[start:start + hlen])
    body = data[start + hlen:]
    cut = len(body) - header["hnsw_bytes"]
    return header, body[:cut], body[cut:]


def _identity(path):
    """The database identity of the file at ``path`` (the forger of these tests knows it)."""
    db = pb.open(path, readonly=True)
    try:
        return uuid.UUID(db.stats()["database_id"])
    finally:
        db.close()


def _join(header, front, graph, database_id):
    """A checkpoint with ``graph`` in place of its graph, its sizes and checksum (keyed
    with the database's identity) recomputed as the writer does: nothing but the graph
    check can tell it from a real one."""
    fields = {k: v for k, v in header.items() if k != "mac"}
    fields["hnsw_bytes"] = len(graph)
    header = dict(fields, mac=checkpoint_mac(fields, [front, graph], database_id))
    head = json.dumps(header).encode("utf-8")
    return MAGIC + struct.pack("<Q", len(head)) + head + front + graph


def _layout(graph):
    """Parsed facts of a graph: header fields, level-0 record offsets, and for each
    element with upper levels the offset of its first upper level and its level."""
    fields = list(HEADER.unpack_from(graph, 0))
    count, per_el, max_m = fields[2], fields[3], fields[8]
    rec = [HEADER.size + i * per_el for i in range(count)]
    pos, upper = HEADER.size + count * per_el, {}
    for i in range(count):
        (nbytes,) = struct.unpack_from("<I", graph, pos)
        pos += 4
        if nbytes:
            upper[i] = (pos, nbytes // (4 + 4 * max_m))
            pos += nbytes
    return fields, rec, upper


def _with_header(graph, **changes):
    names = ["off0", "max_el", "count", "per_el", "label_off", "data_off", "maxlevel",
             "enter", "max_m", "max_m0", "m", "mult", "efc"]
    fields = list(HEADER.unpack_from(graph, 0))
    for name, value in changes.items():
        fields[names.index(name)] = value
    return HEADER.pack(*fields) + graph[HEADER.size:]


def _poke(graph, offset, fmt, value):
    out = bytearray(graph)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _forgeries(graph):
    fields, rec, upper = _layout(graph)
    count, maxlevel, enter = fields[2], fields[6], fields[7]
    low = next(i for i in range(count) if i not in upper)          # an element of level 0
    high, (at, _) = next((i, u) for i, u in upper.items() if i != enter)
    (n_up,) = struct.unpack_from("<H", graph, at)
    assert n_up >= 1, "the chosen element has a neighbour on level 1"
    (n0,) = struct.unpack_from("<H", graph, rec[3])
    assert n0 >= 1
    return {
        "level0_neighbour_beyond_count": _poke(graph, rec[3] + 4, "<I", count + 12345),
        "level0_link_count_too_large": _poke(graph, rec[5], "<H", 65535),
        "level0_link_count_above_maxM0": _poke(graph, rec[5], "<H", 2 * M + 1),
        "element_count_above_capacity": _with_header(graph, max_el=count - 1),
        "element_count_larger_than_data": _with_header(graph, count=count + 50,
                                                       max_el=count + 5000),
        "entry_point_beyond_count": _with_header(graph, enter=count + 3),
        "entry_point_below_top_level": _with_header(graph, enter=low),
        "top_level_above_entry_point": _with_header(graph, maxlevel=maxlevel + 2),
        "maxM0_changed": _with_header(graph, max_m0=4 * M),
        "ef_construction_zero": _with_header(graph, efc=0),
        "capacity_huge": _with_header(graph, max_el=1 << 40),
        "level_multiplier_huge": _with_header(graph, mult=1e300),
        "record_size_changed": _with_header(graph, per_el=fields[3] + 4),
        "upper_neighbour_beyond_count": _poke(graph, at + 4, "<I", count + 7),
        "upper_neighbour_without_that_level": _poke(graph, at + 4, "<I", low),
        "upper_link_count_above_maxM": _poke(graph, at, "<H", M + 1),
        "upper_levels_size_not_whole": _poke(graph, upper[high][0] - 4, "<I",
                                             upper[high][1] * (4 + 4 * M) + 2),
        "trailing_bytes": graph + b"\0" * 8,
        "truncated": graph[:-4],
    }


def _brute(X, q, k):
    d = ((X.astype(np.float64) - q.astype(np.float64)) ** 2).sum(axis=1)
    order = np.lexsort((np.arange(len(X)), d))[:k]
    return order.tolist(), d[order].tolist()


def _run(saved, files, q, child_env, child_cwd):
    path, ckpt, _, _ = saved
    r = subprocess.run([sys.executable, "-c", _child_code(), path, ckpt, json.dumps(q.tolist()),
                        *files], cwd=child_cwd, env=child_env, capture_output=True, text=True,
                       timeout=300)
    done = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0, (f"child died ({r.returncode}) after {len(done)} of "
                               f"{len(files)} forged checkpoints:\n{r.stderr[-3000:]}")
    return done


def test_the_real_checkpoint_passes_the_graph_check_and_is_used(saved, tmp_path, child_env,
                                                                child_cwd):
    path, ckpt, data, X = saved
    header, front, graph = _split(data)
    assert check_graph(graph, DIM, M, EFC) == N
    real = tmp_path / "real"
    real.write_bytes(data)
    [out] = _run(saved, [str(real)], X[11], child_env, child_cwd)
    assert out["origin"] == "checkpoint"
    keys, _ = _brute(X, X[11], 5)
    assert out["keys"] == keys and out["dists"][0] == 0.0


def test_a_forged_graph_with_a_recomputed_crc_is_ignored_and_the_index_rebuilt(
        saved, tmp_path, child_env, child_cwd):
    path, ckpt, data, X = saved
    header, front, graph = _split(data)
    ident = _identity(path)
    forged = _forgeries(graph)
    files = []
    for name, bad in forged.items():
        with pytest.raises(ValueError):
            check_graph(bad, DIM, M, EFC)
        f = tmp_path / name
        f.write_bytes(_join(header, front, bad, ident))
        files.append(str(f))
    q = X[42] + np.float32(0.01)
    results = _run(saved, files, q, child_env, child_cwd)
    keys, dists = _brute(X, q, 5)
    assert [r["name"] for r in results] == list(forged)
    for r in results:
        assert r["origin"] == "rebuilt", r
        assert r["reason"].startswith("damaged checkpoint (") and "graph" in r["reason"], r
        assert r["keys"] == keys, r
        # The product's float32 distances against a float64 oracle: two computations.
        assert np.allclose(r["dists"], dists, rtol=1e-5, atol=1e-6), r


@pytest.mark.slow
def test_random_word_changes_in_the_graph_never_crash_the_reader(saved, tmp_path, child_env,
                                                                 child_cwd):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    path, ckpt, data, X = saved
    header, front, graph = _split(data)
    ident = _identity(path)
    files = []
    for j in range(40):
        bad = bytearray(graph)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(bad) - 4)) & ~3
            struct.pack_into("<I", bad, at, int(rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF,
                                                            N, N + 1, rng.integers(0, 2**32)])))
        f = tmp_path / f"fuzz{j}"
        f.write_bytes(_join(header, front, bytes(bad), ident))
        files.append(str(f))
    q = X[3]
    results = _run(saved, files, q, child_env, child_cwd)
    assert len(results) == len(files), f"seed {seed}"
    keys, _ = _brute(X, q, 5)
    for r in results:
        assert r["origin"] in ("rebuilt", "checkpoint"), (seed, r)
        assert len(r["keys"]) == 5 and r["dists"] == sorted(r["dists"]), (seed, r)
        if r["origin"] == "rebuilt":            # a change the graph check refused
            assert r["keys"] == keys, (seed, r)
