"""One hnswlib index for one (collection, vector field), shared by every transaction.

Labels are row ids. Beside the graph the index keeps its own dense copy of the vectors
(as hnswlib compares them: normalized for cosine), because hnswlib's ``get_items`` costs
microseconds per id while an exact scan of an admitted id set needs a numpy gather::

    rowid --_pos--> slot --_vecs--> float32[dim]        (hnswlib graph: label = rowid)
            (-1: no vector)   _ids[slot] = rowid (-1: free slot, reused by later rows)

``_pos`` always ends with a -1 no row id reaches, so a gather clips any row id beyond it
onto "no vector" in one ``np.take``.

An exact scan of an id set keeps the vectors it gathered (``_gathered``: a few sets, a
quarter of the rows at most in all) until the next change to any vector: the same filter
asked again with another query vector then costs one matrix-vector product, not a gather.
``reused`` tells the planner when that is to be expected (a set gathered, or asked about
before), so a filter repeated at 5-15% selectivity is scanned exactly from its gather.
The k best of the products are picked by ``_core.vkernel.top_k`` (ties by row id).

The index follows the newest committed state, so a reader's snapshot may be older. Each
change is logged with the commit sequence that made it (``changed_since``), so a search
knows which rows it must read from its own snapshot instead of trusting the index. A search
holds ``lock`` from ``changed_since`` until it has read the vectors it trusts, so no change
slips in between. A commit whose write fails has already been followed here, and the
database then reuses its sequence; ``begin`` sees the reuse and keeps the rows that commit
changed suspect for every snapshot (``_unsure``) until a later commit writes them again.

Checkpoint file (written whole, then renamed over the old one)::

    b"PBHNSW2\\n" | u64 header length
    | header JSON {spec, seq, count, hnsw_bytes, database, mac}
    | rowids int64[count] | vectors float32[count, dim] | hnswlib's saved index

A checkpoint is tied to its database: ``database`` is a fingerprint of the database's
identity (the UUID in the file header, kept by compaction and backup; docs/format.md), and
``mac`` a BLAKE2b of the other header fields and everything after the header, keyed with
that identity. So a checkpoint copied from another database, or forged by someone who does
not know this database's identity, is not trusted (``reason`` says which). The key is a
keyed hash, not a CRC seeded with the identity: CRC-32 is affine, so from one valid
checkpoint anyone could compute the seeded CRC of a forged one without the seed. An index
made without a database (``database_id=None``) writes and trusts checkpoints keyed with
the empty key, which a database never accepts.

A checkpoint whose magic, header, identity, checksum or spec does not match is ignored and
the index rebuilt from the rows; so is one whose graph fails graphcheck.check_graph
(hnswlib reads its file unchecked, and a checksum proves nothing against a writer who knew
the key).
"""
import hashlib
import json
import os
import struct
import sys
import threading

import numpy as np

from .._core import load
from ..errors import VectorError
from . import as_vector, require_hnswlib
from .graphcheck import check_graph

_vk = load("vkernel")

__all__ = ["HnswIndex", "normalize", "distances"]

_MAGIC = b"PBHNSW2\n"
_OLD_MAGICS = (b"PBHNSW1\n",)
_U64 = struct.Struct("<Q")
_CHUNK = 4096
_DEFAULT_EF = 64
_BLOCK = 2048
_GATHERED = 4
_ASKED = 32
_NONE = np.empty(0, dtype=np.int64)
_NONE.flags.writeable = False


def normalize(mat):
    """Rows scaled to unit length, each as ``_core.vkernel.to_space`` scales a query vector
    (zero stays zero): one computation for stored and query vectors alike, on any CPU."""
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    out = np.empty_like(mat)
    if len(mat) and not _vk.rows_to_space(mat, out, True):
        raise VectorError("a vector must hold finite numbers")
    return out


def distances(mat, q, metric):
    """The distance from each row of ``mat`` to ``q`` (both already in index space:
    normalized for cosine): squared L2, or ``1 - dot`` for ip and cosine. Computed by
    ``_core.vkernel.distances`` in one fixed summation order, so every path that ranks a
    row gives it the same float32 on every CPU (numpy's BLAS and einsum kernels do not)."""
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    out = np.empty(len(mat), dtype=np.float32)
    if len(mat):
        _vk.distances(mat, np.ascontiguousarray(q, dtype=np.float32), out, metric == "l2")
    return out


class HnswIndex:
    """An hnswlib index whose labels are row ids, with a dense vector copy and a change log."""

    def __init__(self, spec):
        hnswlib = require_hnswlib()
        self.spec = dict(spec)
        self.dim = spec["dim"]
        self.metric = spec["metric"]
        self._hnsw = hnswlib.Index(space=self.metric, dim=self.dim)
        self._lock = self.lock = threading.RLock()
        self._pos = np.full(1, -1, dtype=np.int64)
        self._ids = np.full(0, -1, dtype=np.int64)
        self._vecs = np.zeros((0, self.dim), dtype=np.float32)
        self._free = []
        self._top = 0              # slots [0, _top) have been used
        self._dead = set()         # labels marked deleted in the graph
        self._live = 0
        self._log_seq = []
        self._log_ids = []
        self._log_last = -1.0      # the newest sequence in the log (inf: a change without one)
        self._changes = 0          # bumped by every log entry and begin(): names the log
        self._version = 0          # bumped by every change to _pos or _vecs
        self._gathered = {}        # hash(id set) -> (id set, _version, rowids, vectors)
        self._asked = {}           # hash(id set) -> _version when reused() was asked
        self._since = None         # ((seq, _changes), answer) of the last changed_since
        self._unsure = set()       # rows last changed by a commit that failed
        self._floor = 0            # changes at or before this sequence are not in the log
        self.seq = 0
        self.origin = "empty"      # how open() obtained it: checkpoint | rebuilt | empty
        self.reason = ""
        self.caught_up = 0         # rows changed by the catch-up after loading a checkpoint
        self.database_id = None    # the identity (uuid.UUID) its checkpoints are tied to

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, spec, checkpoint_path, rows, seq, progress=False, database_id=None):
        """The index for ``spec``: the checkpoint at ``checkpoint_path`` caught up with
        ``rows()`` (every (rowid, vector) of the newest committed state), or rebuilt from
        ``rows()`` when the checkpoint is missing, damaged or not this database's.
        ``seq`` is that state's commit sequence; ``database_id`` the identity (uuid.UUID)
        of the database the index belongs to, which its checkpoints must carry (and which
        checkpoint() writes into them)."""
        ix = cls(spec)
        ix.database_id = database_id
        loaded = False
        if checkpoint_path is not None:
            try:
                loaded = ix._load(checkpoint_path)
            except FileNotFoundError:
                ix.reason = "no checkpoint"
            except _Untrusted as exc:
                ix = cls(spec)
                ix.database_id = database_id
                ix.reason = f"untrusted checkpoint ({exc})"
            except (OSError, ValueError, KeyError, TypeError, RuntimeError, MemoryError,
                    struct.error) as exc:
                ix = cls(spec)
                ix.database_id = database_id
                ix.reason = f"damaged checkpoint ({exc})"
        if loaded:
            ix.origin = "checkpoint"
            ix.caught_up = ix._catch_up(rows())
        else:
            ix._build(rows(), progress)
        ix.seq = ix._floor = seq
        return ix

    def _build(self, rows, progress):
        ids, vecs = [], []
        for rowid, vec in rows:
            ids.append(rowid)
            vecs.append(as_vector(vec, self.dim))
        n = len(ids)
        self._init_graph(n)
        if n:
            self.origin = "rebuilt"
            mat = np.stack(vecs)
            if self.metric == "cosine":
                mat = normalize(mat)
            labels = np.asarray(ids, dtype=np.int64)
            bar = _progress_bar(n, progress)
            for lo in range(0, n, _CHUNK):
                self._hnsw.add_items(mat[lo:lo + _CHUNK], labels[lo:lo + _CHUNK])
                if bar is not None:
                    bar.update(min(_CHUNK, n - lo))
            if bar is not None:
                bar.close()
            self._grow_slots(n, int(labels.max()) + 1)
            self._vecs[:n] = mat
            self._ids[:n] = labels
            self._pos[labels] = np.arange(n, dtype=np.int64)
            self._top = self._live = n

    def _init_graph(self, n):
        self._hnsw.init_index(max_elements=max(1024, n + n // 4), M=self.spec["M"],
                              ef_construction=self.spec["ef_construction"], random_seed=100)
        self._hnsw.set_ef(_DEFAULT_EF)

    def _load(self, path):
        with open(path, "rb") as f:
            data = f.read()
        if data[:len(_MAGIC)] != _MAGIC:
            if data[:len(_MAGIC)] in _OLD_MAGICS:
                raise _Untrusted("an older checkpoint format, tied to no database")
            raise ValueError("not an HNSW checkpoint")
        (hlen,) = _U64.unpack_from(data, len(_MAGIC))
        start = len(_MAGIC) + _U64.size
        header = json.loads(data[start:start + hlen].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("bad header")
        body = memoryview(data)[start + hlen:]
        mine = database_fingerprint(self.database_id)
        theirs = header.get("database")
        if theirs != mine:
            if theirs is None:
                raise _Untrusted("it names no database; this index belongs to database "
                                 f"{self.database_id}")
            if mine is None:
                raise _Untrusted("it belongs to a database; this index belongs to none")
            raise _Untrusted(f"it belongs to another database, not to {self.database_id}")
        mac = header.pop("mac", None)
        if mac != checkpoint_mac(header, body, self.database_id):
            raise ValueError("checksum mismatch: damaged, or forged without this "
                             "database's identity")
        if header["spec"] != self.spec:
            raise ValueError("settings changed")
        n, hbytes = int(header["count"]), int(header["hnsw_bytes"])
        if len(body) != n * 8 + n * 4 * self.dim + hbytes:
            raise ValueError("wrong length")
        labels = np.frombuffer(body[:n * 8], dtype="<i8").astype(np.int64)
        mat = np.frombuffer(body[n * 8:n * 8 + n * 4 * self.dim], dtype="<f4")
        mat = mat.reshape(n, self.dim).astype(np.float32)
        if n and (labels.min() < 0 or len(np.unique(labels)) != n):
            raise ValueError("bad row ids")
        graph_bytes = body[n * 8 + n * 4 * self.dim:]
        # hnswlib trusts its file: bounds-check the graph before it reads one byte of it.
        check_graph(graph_bytes, self.dim, self.spec["M"], self.spec["ef_construction"])
        tmp = f"{path}.load-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(graph_bytes)
            self._hnsw.load_index(tmp, max_elements=0)
        finally:
            _unlink(tmp)
        self._hnsw.set_ef(_DEFAULT_EF)
        graph = np.asarray(self._hnsw.get_ids_list(), dtype=np.int64)
        if not np.isin(labels, graph).all():
            raise ValueError("graph and vectors disagree")
        self._grow_slots(n, max(int(labels.max()) + 1 if n else 0, 1))
        self._vecs[:n] = mat
        self._ids[:n] = labels
        self._pos[labels] = np.arange(n, dtype=np.int64)
        self._top = self._live = n
        for label in graph[~np.isin(graph, labels)].tolist():
            try:
                self._hnsw.mark_deleted(label)
            except RuntimeError:
                pass                # already deleted in the saved graph
            self._dead.add(label)
        return True

    def _catch_up(self, rows):
        seen = set()
        changed = 0
        for rowid, vec in rows:
            seen.add(rowid)
            v = self._space(as_vector(vec, self.dim))
            slot = self._slot(rowid)
            if slot < 0 or not np.array_equal(self._vecs[slot], v):
                self._put(rowid, v)
                changed += 1
        for rowid in self._ids[:self._top][self._ids[:self._top] >= 0].tolist():
            if rowid not in seen:
                self._drop(rowid)
                changed += 1
        return changed

    # ------------------------------------------------------------------ writing

    def _space(self, v):
        if self.metric == "cosine":
            return normalize(v[None, :])[0]
        return v

    def _slot(self, rowid):
        return int(self._pos[rowid]) if 0 <= rowid < len(self._pos) else -1

    def _grow_slots(self, slots, rowids):
        if slots > len(self._ids):
            cap = max(slots, 2 * len(self._ids), 64)
            ids = np.full(cap, -1, dtype=np.int64)
            ids[:len(self._ids)] = self._ids
            vecs = np.zeros((cap, self.dim), dtype=np.float32)
            vecs[:len(self._vecs)] = self._vecs
            self._ids, self._vecs = ids, vecs
        if rowids >= len(self._pos):             # keep the last entry -1 (see above)
            cap = max(rowids + 1, 2 * len(self._pos), 64)
            pos = np.full(cap, -1, dtype=np.int64)
            pos[:len(self._pos)] = self._pos
            self._pos = pos

    def _log(self, rowid, seq):
        self._unsure.discard(rowid)
        at = float("inf") if seq is None else seq
        self._log_seq.append(at)
        self._log_ids.append(rowid)
        self._log_last = max(self._log_last, at)
        self._changes += 1
        if seq is not None and seq > self.seq:
            self.seq = seq
        if len(self._log_ids) > max(4096, self._live // 4):
            half = len(self._log_ids) // 2
            self._floor = max(self._floor, max(self._log_seq[:half]))
            del self._log_seq[:half], self._log_ids[:half]

    def _put(self, rowid, v):
        slot = self._slot(rowid)
        if slot < 0:
            if rowid not in self._dead:
                hn = self._hnsw
                if hn.get_current_count() >= hn.get_max_elements():
                    hn.resize_index(2 * hn.get_max_elements())
            if self._free:
                slot = self._free.pop()
            else:
                slot = self._top
                self._top += 1
            self._grow_slots(slot + 1, rowid + 1)
            self._pos[rowid] = slot
            self._ids[slot] = rowid
            self._live += 1
        self._dead.discard(rowid)
        self._vecs[slot] = v
        self._version += 1
        self._hnsw.add_items(v[None, :], np.array([rowid], dtype=np.int64), num_threads=1)

    def _drop(self, rowid):
        slot = self._slot(rowid)
        if slot < 0:
            return False
        self._hnsw.mark_deleted(rowid)
        self._dead.add(rowid)
        self._pos[rowid] = -1
        self._ids[slot] = -1
        self._free.append(slot)
        self._live -= 1
        self._version += 1
        return True

    def begin(self, seq):
        """A commit with sequence ``seq`` is about to be followed (called once per commit).
        Sequences only grow, so one already logged means the commits that logged it failed
        after changing rows here: those rows may now hold vectors of no committed state."""
        with self._lock:
            if seq <= self._floor:             # some of their rows left the log already:
                self._floor = float("inf")     # no snapshot can trust the index any more
            if seq <= self._log_last:
                failed = [rid for rid, at in zip(self._log_ids, self._log_seq) if at >= seq]
                self._unsure.update(failed)
                self._changes += 1             # the answers of changed_since change

    def upsert(self, rowid, vector, seq=None):
        """Add or replace the vector of ``rowid``; ``seq`` is the commit making the change
        (without it, readers of every snapshot treat the row as possibly changed)."""
        if type(rowid) is not int or rowid < 0:
            raise VectorError(f"a row id must be an int >= 0, not {rowid!r}")
        v = self._space(as_vector(vector, self.dim))
        with self._lock:
            self._put(rowid, v)
            self._log(rowid, seq)

    def remove(self, rowid, seq=None):
        """Forget ``rowid`` (hnswlib marks it deleted); nothing happens if it is absent."""
        with self._lock:
            if self._drop(rowid):
                self._log(rowid, seq)

    # ------------------------------------------------------------------ reading

    def __len__(self):
        return self._live

    def __contains__(self, rowid):
        return type(rowid) is int and self._slot(rowid) >= 0

    def changed_since(self, seq):
        """Row ids (int64 array) whose vector changed in a commit after ``seq`` or in a
        commit that failed, or None when the log does not reach back that far (then every
        row is suspect)."""
        with self._lock:
            if seq is None or seq < self._floor:
                return None
            if seq >= self._log_last and not self._unsure:     # the usual case
                return _NONE
            key = (seq, self._changes)
            if self._since is not None and self._since[0] == key:
                return self._since[1]              # every reader of one snapshot asks alike
            log = np.asarray(self._log_seq, dtype=np.float64)
            found = np.asarray(self._log_ids, dtype=np.int64)[log > seq]
            if self._unsure:
                found = np.concatenate([found, np.fromiter(self._unsure, np.int64)])
            found = np.unique(found)
            self._since = (key, found)
            return found

    def top(self, rowids, q, k):
        """``(ids, dist)`` lists: the best ``k`` rows of ``rowids`` (int64 array of ids
        >= 0, any order) that have a vector here, by exact distance to ``q`` (in index
        space), ascending, ties by id: gathered by slot, measured and picked in one C pass
        (``_core.vkernel.rank``, the same distance as distances())."""
        with self._lock:
            return _vk.rank(self._vecs, q, np.ascontiguousarray(rowids, np.int64), k,
                            self.metric == "l2", self._pos)

    def top_set(self, ids, q, k):
        """top() for the rows of the IdSet ``ids``, reusing the vectors gathered for an
        equal set since the last change (see the module's docstring)."""
        with self._lock:
            key = hash(ids)
            hit = self._gathered.get(key)
            if hit is not None and hit[1] == self._version and (hit[0] is ids or hit[0] == ids):
                mat = hit[3]
                return self._rank(hit[2], mat, q, k)
            rowids = ids.to_numpy()
            budget = self._live // 4           # rows kept, over every set kept
            if len(rowids) > budget:
                return self.top(rowids, q, k)
            slots = np.take(self._pos, rowids, mode="clip")
            if len(slots) and slots.min() < 0:
                present = slots >= 0
                slots, rowids = slots[present], rowids[present]
            mat = self._vecs[slots]
            kept = {h: e for h, e in self._gathered.items() if e[1] == self._version}
            while kept and (len(kept) >= _GATHERED
                            or sum(len(e[2]) for e in kept.values()) + len(rowids) > budget):
                del kept[next(iter(kept))]     # the oldest first
            kept[key] = (ids, self._version, rowids, mat)
            self._gathered = kept
            return self._rank(rowids, mat, q, k)

    def gathered(self, ids):
        """``(rowids, vectors)`` that top_set keeps for the IdSet ``ids`` (the rows that
        have a vector, and theirs), or None when it keeps none current. The arrays are
        never written to: a caller may keep them."""
        with self._lock:
            hit = self._gathered.get(hash(ids))
            if hit is not None and hit[1] == self._version and (hit[0] is ids or hit[0] == ids):
                return hit[2], hit[3]
            return None

    def reused(self, ids):
        """Whether an exact scan of the IdSet ``ids`` would find its vectors gathered: they
        were gathered since the last change, or the set was asked about before and fits
        the budget (then top_set gathers it now and keeps it). For cost estimates only."""
        with self._lock:
            key = hash(ids)
            hit = self._gathered.get(key)
            if hit is not None and hit[1] == self._version:
                return True
            if len(ids) > self._live // 4:
                return False
            again = self._asked.get(key) == self._version
            if len(self._asked) >= _ASKED:
                self._asked.clear()
            self._asked[key] = self._version
            return again

    def _rank(self, rowids, mat, q, k):
        """top_k over the gathered matrix ``mat`` (row j is ``rowids[j]``), distances from
        distances() (one computation on every path)."""
        return _vk.top_k(distances(mat, q, self.metric), rowids, k, False)

    def knn(self, vector, k, ef=None, filter=None):
        """``(labels, distances)`` of up to ``k`` nearest live rows, ascending distance;
        ``filter(label) -> bool`` restricts them. Fewer than ``k`` when fewer exist."""
        return self.search(self._space(as_vector(vector, self.dim)), k, ef, filter)

    def search(self, q, k, ef=None, filter=None):
        """knn() for a query already checked and in index space (normalized for cosine)."""
        with self._lock:
            k = min(k, self._live)
            if k <= 0:
                return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
            self._hnsw.set_ef(max(ef or _DEFAULT_EF, k))
            try:
                labels, dist = self._hnsw.knn_query(q[None, :], k=k, num_threads=1, filter=filter)
                return labels[0].astype(np.int64), dist[0]
            except RuntimeError:
                return self._exact(q, k, filter)   # the graph reached fewer than k rows

    def _exact(self, q, k, filter):
        used = np.flatnonzero(self._ids[:self._top] >= 0)
        labels = self._ids[used]
        dist = distances(self._vecs[used], q, self.metric)
        order = np.lexsort((labels, dist))
        if filter is not None:
            order = np.array([i for i in order.tolist() if filter(int(labels[i]))], dtype=np.int64)
        order = order[:k]
        return labels[order], dist[order]

    # ------------------------------------------------------------------ checkpoint

    def checkpoint(self, checkpoint_path, seq):
        """Write the index and the sequence it reflects atomically (tmp, fsync, rename),
        tied to ``database_id`` (the one the index was opened with)."""
        directory = os.path.dirname(os.path.abspath(checkpoint_path))
        tmp = f"{checkpoint_path}.tmp-{os.getpid()}-{threading.get_ident()}"
        graph = tmp + ".graph"
        with self._lock:
            used = np.flatnonzero(self._ids[:self._top] >= 0)
            labels = self._ids[used].astype("<i8")
            mat = self._vecs[used].astype("<f4")
            try:
                self._hnsw.save_index(graph)
                with open(graph, "rb") as f:
                    hdata = f.read()
            finally:
                _unlink(graph)
        body = [labels.tobytes(), mat.tobytes(), hdata]
        fields = {"spec": self.spec, "seq": seq, "count": len(labels), "hnsw_bytes": len(hdata),
                  "database": database_fingerprint(self.database_id)}
        header = json.dumps(dict(fields, mac=checkpoint_mac(fields, body, self.database_id)))
        header = header.encode("utf-8")
        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC + _U64.pack(len(header)) + header)
                for part in body:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, checkpoint_path)
        finally:
            _unlink(tmp)
        _fsync_dir(directory)

    def __repr__(self):
        return (f"<HnswIndex {self.spec['field']!r} {self.metric} dim={self.dim} "
                f"rows={self._live} from {self.origin}>")


class _Untrusted(ValueError):
    """A well-formed checkpoint that is not this database's (see the module docstring)."""


def database_fingerprint(database_id):
    """What a checkpoint names its database by: a hash of the identity (hex), never the
    identity itself (it is the key of the checkpoint's MAC); None without a database."""
    if database_id is None:
        return None
    return hashlib.blake2b(database_id.bytes, digest_size=8, person=b"pb-db-fp").hexdigest()


def checkpoint_mac(fields, body, database_id):
    """The checkpoint's MAC (hex): BLAKE2b keyed with the database identity over the
    header ``fields`` (every header field but ``mac``, in a canonical JSON form) and the
    ``body`` (bytes, or a list of byte parts in file order)."""
    key = database_id.bytes if database_id is not None else b""
    h = hashlib.blake2b(key=key, digest_size=16, person=b"pb-hnsw-ckpt")
    h.update(json.dumps(fields, sort_keys=True).encode("utf-8"))
    for part in (body if isinstance(body, list) else [body]):
        h.update(part)
    return h.hexdigest()


def _progress_bar(total, wanted):
    if not wanted or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="building vector index", unit="rows")


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
