"""`pb.open()` and `Database`: the published head, the commit pipeline and retries.

Three states matter:

- the *published head*: the newest commit that is as durable as the mode promises. New
  transactions start from it;
- the *pending head*: the newest commit handed to storage, maybe not yet durable. Commits
  merge onto it, in order, under the commit lock, so commits never lose each other;
- storage's durable sequence: once a commit's durability future resolves, a callback
  (run in commit order) moves the published head forward.

A commit whose write or fsync fails fails with StorageError, and so does every commit
queued after it (storage guarantees that); the pending head then falls back to the
published head, so nothing is ever built on data that did not reach the disk.

A Database belongs to the process that opened it: in a forked child each one is
abandoned (`_abandon_inherited`, run by os.register_at_fork; storage drops the files the
same way), because the writer thread, the locks other threads held and the file's lock
are the parent's. Nothing is written or unlocked there; every use is DatabaseClosedError.
"""
import builtins
import glob
import importlib
import os
import random
import shutil
import threading
import time
import weakref
from functools import wraps
from typing import (Any, Callable, Concatenate, Iterable, Literal, Optional, ParamSpec, TypeVar,
                    Union)

from . import vector
from .collections import indexed_rows
from .errors import (ConflictError, CorruptionError, DatabaseClosedError, DecodeError,
                     InvalidArgumentError,
                     MissingDependencyError,
                     ReadOnlyError, SerializationError, StorageError)
from .query.expr import MISSING as FIELD_MISSING, extract, split_path
from .state import MISSING, State, StoreIO, codec, copy_collection, hamt
from .storage.store import FORK_MESSAGE, CheckReport, Problem
from .storage.writer import complete as _complete
from .transaction import Transaction

__all__ = ["open", "Database"]

_P = ParamSpec("_P")   # the arguments a db.run / @db.transactional function takes after tx
_R = TypeVar("_R")     # ... and what it returns
Durability = Literal["full", "normal", "none"]
Isolation = Literal["snapshot", "serializable"]

_LIVE_PRUNE = 1024   # open-transaction table size that triggers a sweep of dropped ones
_weakref = weakref.ref
_allocate_lock = threading.Lock
# Above this many writes a commit is written with the cyclic collector paused (State.persist).
_BULK_WRITES = 256
_GATHER_MAX = 0.002  # seconds a full-mode group waits at most for more commits (_gather)
_GATHER_RECENT = 0.05  # ... for written transactions opened at most this long ago

_open_databases = weakref.WeakSet()   # every Database not closed yet (_abandon_inherited)


def _abandon_inherited():
    """os.register_at_fork(after_in_child=...): a forked child abandons every Database the
    parent had open. No lock is taken: a thread of the parent may have held any of them."""
    for db in list(_open_databases):
        db._closed = True
        db._abandoned = True
    _open_databases.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_abandon_inherited)


def _file_id(store):
    """(device, inode) of the file a store's path names now; None without a real file."""
    if store is None:
        return None
    try:
        st = os.stat(store.path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _no_ref(cid):
    return None          # vector extraction never follows references to other collections


def _is_bulk(dirty, new):
    """Does a commit with these written handles count as bulk (State.persist)?"""
    n = 0
    for h in dirty:
        n += len(h._writes)
    for h in new:
        n += len(h._writes)
    return n > _BULK_WRITES


def _stored_values(cs):
    """(where, raw value) of every value stored in a collection state (a Set stores keys)."""
    if cs.kind == "list":
        return ((f"[{i}]", raw) for i, raw in enumerate(cs.data))
    if cs.kind == "set":
        return ()
    return ((f"key {k!r}", raw) for k, raw in cs.data.items())


def _describe(cid, cs):
    if cid == 0:
        return "root"
    kind = {"dict": "Dict", "list": "List", "set": "Set", "sorted": "SortedDict"}.get(cs.kind, cs.kind)
    return f"{kind} #{cid}"


def _check_references(tx, colls):
    """Caller holds the commit lock; ``colls`` is the collections table ``tx``'s commit
    built. A handle of another transaction names that transaction's collection, which
    exists only once that transaction committed: refuse the commit (before anything is
    written) if a value it wrote still refers to one that ``colls`` lacks."""
    missing = {cid: kind for cid, kind in tx._foreign.items() if cid not in colls}
    if not missing:
        return
    for h in tx._dirty + tx._new:        # only values this transaction wrote can hold one
        cs = colls.get(h._cid)
        for where, raw in _stored_values(cs):
            for ref in codec.refs(raw):
                kind = missing.get(ref)
                if kind is None:
                    continue
                raise SerializationError(
                    f"the commit was refused and nothing was written: {_describe(h._cid, cs)} "
                    f"{where} refers to {kind} #{ref}, which a handle of another transaction "
                    f"named and which does not exist: that transaction aborted or has not "
                    f"committed (yet). Store a free-standing pb.{kind}(...) instead, or commit "
                    f"the other transaction first and read the collection again",
                    type_name=kind, path=where)


def _reference_problems(cid, cs, present):
    """check(): a Problem for each stored value of collection ``cid`` that refers to a
    collection not in ``present`` (or cannot be read to tell). Values are walked, not
    decoded (codec.refs): no class code runs."""
    out = []
    try:
        for where, raw in _stored_values(cs):
            try:
                refs = codec.refs(raw)
            except DecodeError as exc:
                out.append(Problem(None, f"{_describe(cid, cs)} {where}: undecodable value: {exc}"))
                continue
            for ref in refs:
                if ref not in present:
                    out.append(Problem(None, f"{_describe(cid, cs)} {where} refers to collection "
                                             f"#{ref}, which does not exist"))
    except CorruptionError as exc:
        out.append(Problem(exc.offset, f"{_describe(cid, cs)}: {exc}"))
    return out


class _Waiter:
    """A committed state queued for the persister (commit combining, Database._hand_over)."""

    __slots__ = ("state", "base", "rollbacks", "bulk", "lead", "fut", "handed", "error", "_gate")

    def __init__(self, state, base, rollbacks, bulk):
        self.state = state           # the state this transaction's commit built
        self.base = base             # the state it was built on
        self.rollbacks = rollbacks   # storage rollback count when it was built
        self.bulk = bulk
        self.lead = False            # holds the persister role
        self.fut = None              # the storage commit that holds the state...
        self.handed = None           # ... and that commit's state (the newest of its group)
        self.error = None
        self._gate = None

    def hold(self):
        """Caller holds the commit lock: this committer will wait (see wait)."""
        self._gate = _allocate_lock()
        self._gate.acquire()

    def wait(self):
        gate = self._gate
        if gate is not None:         # None: settled already
            gate.acquire()

    def settle(self, fut, error):
        """Caller holds the commit lock: handed over (fut), failed (error), or made the
        persister (neither)."""
        if fut is not None:
            self.fut = fut
        if error is not None:
            self.error = error
        gate = self._gate
        if gate is not None:
            self._gate = None
            gate.release()


def _side_file(path, cid, field):
    """The vector checkpoint of collection `cid`'s index on `field`, beside the database
    file at `path`."""
    safe = "".join(c if c.isalnum() else "_" for c in field)
    return f"{path}-vec-{cid}-{safe}.hnsw"


def _copy_whole(source, target):
    """Copy a file so that `target` is either absent or complete (tmp, fsync, rename)."""
    tmp = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with builtins.open(source, "rb") as src, builtins.open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sync_directory(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

DURABILITY_MODES = ("full", "normal", "none")


def _check_retries(retries):
    if type(retries) is not int:
        raise TypeError(f"retries must be an int (how many times to retry on conflict), "
                        f"not {type(retries).__name__}")
    if retries < 0:
        raise InvalidArgumentError(f"retries must be >= 0 (0: try once, never retry), "
                                   f"not {retries}")


def _import_trusted(trust):
    """The modules named by open(trust=...), imported now (the codec itself never imports:
    a class is decoded only from a module the reading program named)."""
    names = codec.trust_modules(trust, "pb.open()")
    for name in sorted(names or ()):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise InvalidArgumentError(
                f"trust names module {name!r}, which cannot be imported ({exc}); fix the name, "
                f"or install the module or put its folder on sys.path") from exc
    return names



def open(path: Union[str, os.PathLike, None] = None, *, durability: Durability = "full",
         readonly: bool = False, cache_size: int = 64 << 20, file_layer: Any = None,
         trust: Optional[Iterable[str]] = None, opaque: bool = False) -> "Database":
    """Open (creating if needed) the database at `path`; no path or ":memory:" opens an
    in-memory database with the same semantics and no files.

    durability: "full" (fsync before commit returns), "normal" (written before commit
    returns, fsync within a second: survives a process crash), "none" (fsync on close).
    readonly: never write; may run beside a writer process.
    cache_size: bytes of recently read atoms kept in memory.
    file_layer: where bytes live (default: real OS files); protobase.storage.faults.FaultInjector
    wraps the real file to inject I/O errors and simulated power loss in tests.
    trust: names of modules whose classes this database decodes (imported here; a missing one
    is an InvalidArgumentError). Classes registered with pb.register_class and classes this
    process stored are decoded without it; any other class is a DecodeError, never an import.
    opaque: read an instance of any other class as a codec.Opaque (its stored bytes, carried
    and written back unchanged) instead of raising: for tools that move data they do not
    run, as `protobase dump`/`info`/`load` do."""
    if durability not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
    trust = _import_trusted(trust)
    if path is None or path == ":memory:":
        return Database(None, durability=durability, readonly=readonly, trust=trust,
                        opaque=opaque)
    from .storage import LogStore
    # The database is the file the path names: through a symbolic link, compaction must
    # replace that file (not the link), and side files sit beside it. db.path reports it.
    path = os.path.realpath(os.fspath(path))
    store = LogStore.open(path, durability=durability, readonly=readonly, bytes_cache_size=cache_size,
                          file_layer=file_layer,
                          upgrade=lambda old, new: _upgrade(old, new, trust))
    leftover = path + ".compact"
    if not readonly and os.path.exists(leftover):
        os.remove(leftover)          # an interrupted compaction; the database file is intact
    try:
        return Database(store, durability=durability, readonly=readonly, file_layer=file_layer,
                        cache_size=cache_size, trust=trust, opaque=opaque)
    except BaseException:
        store.close()
        raise


def _upgrade(old, new, trust):
    """LogStore.open's upgrade step for a file of an older format: the newest state of
    `old` copied into `new` (this build's format) as its one commit."""
    root_ptr = old.head[1]
    if root_ptr >= 0:
        Database._write_copy(new, State.load(root_ptr, StoreIO(old, trust)), trust=trust)


class Database:
    """A ProtoBase database. Shared by threads; each Transaction belongs to one thread."""

    def __init__(self, store, *, durability="full", readonly=False, file_layer=None,
                 cache_size=64 << 20, trust=None, opaque=False):
        self._store = store
        self._cache_size = cache_size
        self._file_layer = file_layer
        self._trust = trust          # frozenset of trusted module names, or None
        self._opaque = opaque        # tools' readers: untrusted classes stay codec.Opaque
        self._row_decode = codec.Decoder(ref_resolver=_no_ref, trust=trust).decode
        self._io = StoreIO(store, trust) if store is not None else None
        self._durability = durability
        self._readonly = readonly
        self._closed = False
        self._abandoned = False      # inherited through fork(): see _abandon_inherited
        self._opened_by = os.getpid()
        self._commit_lock = threading.Lock()
        self._arrived = threading.Condition(self._commit_lock)   # a commit was queued
        self._waiting = []           # _Waiter: built states not yet handed to storage
        self._persister = None       # the _Waiter whose committer holds the persister role
        self._gathering = False      # ... and waits in _gather for more commits
        self._full = durability == "full"
        self._fsync_ewma = 0.0       # recent write+fsync time of a group (full mode)
        self._publish_lock = threading.Lock()
        self._id_lock = threading.Lock()
        self._last_future = None
        self._row_ids = {}           # coll id -> next row id to hand out
        self._vectors = {}           # (coll id, field) -> vector.HnswIndex, loaded on first use
        self._retired = []           # (store replaced by compaction, transactions still reading it)
        # Open transactions (id -> weak reference), to know when a retired store is free.
        # A transaction removes itself when it ends (Transaction._close); entries of
        # transactions dropped without ending are pruned now and then (transaction()).
        self._live = {}
        self._live_prune_at = _LIVE_PRUNE
        self._live_lock = threading.Lock()
        self._compacting = threading.Lock()
        self._file_id = _file_id(store)
        self._commits = 0
        self._conflicts = 0
        self._rollbacks_seen = 0     # storage rollbacks already reflected in the heads
        self._head = self._pending = None
        head = self._load_head()
        if head is None:
            head = State.initial()
            if store is not None and not readonly:
                self._write_state(head).result()
        self._head = self._pending = head
        self._next_coll_id = head.next_coll_id
        _open_databases.add(self)

    # -- heads -----------------------------------------------------------------------

    def _load_head(self):
        if self._store is None:
            return None
        root_ptr = self._store.head[1]
        if root_ptr < 0:
            return None
        return State.load(root_ptr, self._io)

    def _write_state(self, state, bulk=True, rollbacks=None, carries=1, queued=None):
        """Hand a state to storage; returns its durability future (storage.CommitFuture).
        Caller holds the commit lock (or is the constructor) and publishes the state once
        the future succeeds (_publish). ``bulk``: see State.persist. ``rollbacks``: the
        storage rollback count the state was built under; if storage has rolled back
        since (checked once the commit is begun, so a rollback after that fails the
        commit at finish instead), the state may stand on lost commits and is not
        written (StorageError). ``carries``: how many transactions the state holds.
        ``queued(fut)``: called when finish() raised (an interrupt: KeyboardInterrupt,
        SystemExit) after storage had queued the commit, which storage then writes anyway
        (writer.py "Interrupts"): the caller records it as handed over, so that nothing is
        built as if it did not exist; the exception then propagates."""
        store = self._store
        io = self._io
        c = None
        try:
            c = store.begin_commit()
            io.commit = c
            root_ptr = state.persist(io, bulk)
            if rollbacks is not None and store.rollbacks != rollbacks:
                raise StorageError(5, "the commit was not written: an earlier write or fsync "
                                      "failed while it was being built; the database is "
                                      "back at its last durable commit, retry")
            io.commit = None
            return c.finish(root_ptr, carries)
        except BaseException:
            # First the commit lock: also a commit an interrupt kept from reaching `c`, or
            # one interrupted before finish queued it. A queued one is storage's to write.
            store.abort_own_commit()
            io.commit = None
            if c is not None and c.queued and queued is not None:
                queued(c.future)
            raise

    def _publish(self, state, rollbacks):
        """A durable state becomes the head new transactions start from (never an older
        one: committers of one group may get here in any order). ``rollbacks``: the
        storage rollback count the state was built under; if storage rolled back since,
        the state may be gone: it is not published (the caller may reload the heads
        from storage with _catch_up_rollback). Returns whether it was published."""
        with self._publish_lock:
            if rollbacks != self._rollbacks():
                return False
            if self._head is None or state.seq > self._head.seq:
                self._head = state
            return True

    def _rollbacks(self):
        """How many times storage has moved its head back (None without a writable store)."""
        store = self._store
        return None if store is None or store.readonly else store.rollbacks

    def _catch_up_rollback(self):
        """Caller holds the commit lock. After a failed write or fsync storage is back at
        its last durable commit, which in "normal" and "none" modes can be older than
        commits already acknowledged and published: start over from what storage holds,
        so that nothing is read from or built on commits that are gone."""
        n = self._rollbacks()
        if n is None or n == self._rollbacks_seen:
            return
        self._rollbacks_seen = n
        self._wait_pending()                 # every commit handed over is settled
        state = self._load_head() or State.initial()
        with self._publish_lock:
            self._head = self._pending = state

    def _handed_anyway(self, fut, state, rollbacks):
        """Caller holds the commit lock: an interrupt left finish() after storage queued
        the commit of ``state``; it is the pending state now, published once durable."""
        self._last_future = fut
        self._pending = state
        fut.add_done_callback(lambda f, s=state, r=rollbacks: self._on_durable(f, s, r))

    def _on_durable(self, fut, state, rollbacks):
        # A committer stopped waiting (an exception while blocked): publish when durable.
        # Runs on the writer thread, so it never waits for the commit lock: after a
        # rollback the next commit or transaction reloads the heads instead.
        if not fut.cancelled() and fut.exception() is None:
            self._publish(state, rollbacks)

    def _refresh(self):
        """Read-only databases: pick up commits another process made since we looked."""
        file_id = _file_id(self._store)
        if file_id is not None and file_id != self._file_id:
            # The writer compacted: the path names a new file. Read that one from now on.
            from .storage import LogStore
            new = LogStore.open(self._store.path, durability=self._durability, readonly=True,
                                bytes_cache_size=self._cache_size, file_layer=self._file_layer)
            old, io = self._store, StoreIO(new, self._trust)
            root_ptr = new.head[1]
            self._head = self._pending = State.load(root_ptr, io) if root_ptr >= 0 else State.initial()
            self._store, self._io, self._file_id = new, io, file_id
            self._retire(old)      # after the switch: a transaction on the old head is in _live
            return
        self._store.refresh()
        _, root_ptr = self._store.head
        if root_ptr >= 0 and root_ptr != self._head.ptr:
            self._head = self._pending = State.load(root_ptr, self._io)

    # -- vector indexes (protobase.vector): one shared HNSW index per (collection, field) --

    def _vector_index(self, cid, spec):
        """The HNSW index of a vector field, loaded (or rebuilt) on first use; None when
        hnswlib is not installed or the index is not committed with this spec (queries
        then scan exactly)."""
        if self._abandoned:
            self._check_open()       # never wait for a lock a parent's thread held at fork
        key = (cid, spec["field"])
        ix = self._vectors.get(key)
        if ix is not None:
            return ix
        try:
            vector.require_hnswlib()
        except MissingDependencyError:
            return None
        with self._commit_lock:      # no commit slips between reading the rows and registering
            ix = self._vectors.get(key)
            if ix is None:
                state = self._pending
                cs = state.colls.get(cid)
                if cs is None or cs.meta.get("vectors", {}).get(spec["field"]) != spec:
                    # Not committed as asked (made by the asking transaction, which may
                    # still abort): nothing to build from or to keep; its queries scan.
                    return None
                ix = vector.HnswIndex.open(spec, self._vector_path(cid, spec),
                                           lambda: self._vector_rows(state, cid, spec), state.seq,
                                           progress=True,     # a bar only when stderr is a terminal
                                           database_id=self._store and self._store.database_id)
                self._vectors[key] = ix
        return ix

    def _vector_path(self, cid, spec):
        # A checkpoint is tied to its database's identity: a file without one (format 1,
        # read-only) uses none.
        if self._store is None or self._store.database_id is None:
            return None
        return _side_file(self._store.path, cid, spec["field"])

    def _vector_rows(self, state, cid, spec):
        cs = state.colls.get(cid)
        if cs is None or not cs.meta.get("rowids"):
            return
        parts = split_path(spec["field"])
        for rid, raw in indexed_rows(cs):
            v = extract(self._row_decode(raw), parts)
            if v is not FIELD_MISSING:
                yield rid, vector.as_vector(v, spec["dim"])

    def _follow_vectors(self, tx, before, after):
        """Commit hook (under the commit lock): bring loaded HNSW indexes up to date with the
        rows this commit wrote, each change logged with the commit's sequence so that a
        reader on an older snapshot re-reads the rows changed after it (vector.search)."""
        for ix in self._vectors.values():
            ix.begin(after.seq)      # a sequence seen before: the commits that used it failed
        for h in tx._dirty + tx._new:
            for (cid, field), ix in self._vectors.items():
                if cid != h._cid:
                    continue
                cs, old = after.colls.get(cid), before.colls.get(cid)
                if field not in cs.meta.get("vectors", {}):
                    continue
                parts = split_path(field)
                for rid, raw in h._changed_rows(old, cs):
                    v = FIELD_MISSING if raw is MISSING else extract(self._row_decode(raw), parts)
                    if v is FIELD_MISSING:
                        ix.remove(rid, seq=after.seq)
                    else:
                        ix.upsert(rid, vector.as_vector(v), seq=after.seq)

    def _allocate_row_id(self, cid, at_least, n=1):
        """The first of n consecutive row ids for entries of collection cid, never handed
        out before (ids stay unique across concurrent transactions; an aborted one leaves
        a gap)."""
        if self._abandoned:
            self._check_open()
        with self._id_lock:
            rid = max(self._row_ids.get(cid, 0), at_least)
            self._row_ids[cid] = rid + n
            return rid

    def _allocate_collection_id(self):
        if self._abandoned:
            self._check_open()
        with self._id_lock:
            cid = self._next_coll_id
            self._next_coll_id += 1
            return cid

    # -- transactions ------------------------------------------------------------------

    def _check_open(self):
        if self._abandoned:
            raise DatabaseClosedError("this database cannot be used in this process: "
                                      + FORK_MESSAGE.format(pid=self._opened_by))
        if self._closed:
            raise DatabaseClosedError("the database is closed; open it again with pb.open()")

    def _readonly_error(self, what="a write"):
        """The ReadOnlyError for a write into a database opened with readonly=True."""
        path = self.path
        where = f"pb.open({path!r}, readonly=True)" if path else "pb.open(readonly=True)"
        again = f"pb.open({path!r})" if path else "pb.open()"
        return ReadOnlyError(f"{what} cannot be made: the database was opened read-only "
                             f"({where}); to write, open it with {again}, without readonly=True "
                             f"(one process at a time may write)")

    def transaction(self, readonly: bool = False, isolation: Isolation = "snapshot") -> Transaction:
        """A new transaction on the newest published state."""
        self._check_open()
        store = self._store
        if self._readonly:
            if not readonly:
                readonly = True
            if store is not None:
                self._refresh()
        elif store is not None and store.rollbacks != self._rollbacks_seen:
            with self._commit_lock:   # acknowledged commits were lost: not from them
                self._catch_up_rollback()
        with self._live_lock:     # a compaction retires the old file only after the switch
            tx = Transaction(self, self._head, readonly=readonly, isolation=isolation)
            if self._retired:
                self._release_retired()
            live = self._live
            live[id(tx)] = _weakref(tx)
            if len(live) >= self._live_prune_at:
                self._prune_live()
        return tx

    def _prune_live(self):
        """Forget transactions that were dropped without ending (caller holds _live_lock)."""
        live = self._live
        for key in [k for k, r in live.items() if r() is None]:
            del live[key]
        self._live_prune_at = max(_LIVE_PRUNE, 2 * len(live))

    def _open_transactions(self):
        """The transactions open now (caller holds _live_lock)."""
        return [t for t in (r() for r in self._live.values()) if t is not None and not t._closed]

    def _retire(self, store):
        """A store no longer named by the path: keep it for the transactions that may still
        read through it, close it once they have all ended."""
        with self._live_lock:
            self._retired.append((store, weakref.WeakSet(self._open_transactions())))
            self._release_retired()

    def _release_retired(self):
        """Close retired stores no open transaction reads any more (caller holds _live_lock)."""
        keep = []
        for store, readers in self._retired:
            if any(not t._closed for t in readers):
                keep.append((store, readers))
                continue
            try:
                store.close()
            except StorageError:     # its last sync mark went to a file nobody will read
                pass
        self._retired = keep

    def _commit(self, tx):
        if self._closed:
            self._check_open()
        dirty, new = tx._dirty, tx._new
        if not dirty and not new:
            return                                  # nothing written: nothing to publish
        if self._readonly:
            raise self._readonly_error()
        w = None
        try:
            with self._commit_lock:
                store = self._store
                if store is not None and store.rollbacks != self._rollbacks_seen:
                    # A failed write or fsync always rolls storage back: then nothing is built
                    # on the commits that failed (or on anything queued after them).
                    self._catch_up_rollback()
                rollbacks = self._rollbacks_seen
                base = self._pending
                try:
                    if len(dirty) == 1 and not new and not tx._serializable:
                        # The common small commit: one collection written, nothing read to
                        # check. One functional set instead of a mutation of the table.
                        h = dirty[0]
                        head_cs = h._base if base is tx._snapshot else base.colls.get(h._cid)
                        colls = base.colls.set(h._cid, h._commit_state(head_cs))
                    else:
                        colls = self._merged_colls(tx, base)
                except ConflictError:
                    self._conflicts += 1
                    raise
                if tx._foreign is not None:
                    _check_references(tx, colls)
                nxt = self._next_coll_id
                state = State(colls, nxt if nxt > base.next_coll_id else base.next_coll_id,
                              base.seq + 1)
                if self._vectors:
                    self._follow_vectors(tx, base, state)
                if self._store is None:
                    self._head = self._pending = state
                    self._commits += 1
                    return
                bulk = _is_bulk(dirty, new)
                if self._full:
                    w = _Waiter(state, base, rollbacks, bulk)
                    self._waiting.append(w)
                    if self._persister:
                        w.hold()
                        if self._gathering:
                            self._arrived.notify()
                    else:
                        w.lead = True
                        self._persister = w
                else:
                    # "normal"/"none": finish() writes at once on this thread, so there is no
                    # wait for others to share: each transaction is its own storage commit.
                    w = None
                    fut = self._last_future = self._write_state(
                        state, bulk, rollbacks,
                        queued=lambda f: self._handed_anyway(f, state, rollbacks))
                self._pending = state
            if w is None:
                self._await_commit(fut, state, rollbacks)
                self._commits += 1
                return
            if not w.lead:
                w.wait()             # until a persister hands it over, or makes us persister
            if w.fut is None and w.error is None:
                with self._commit_lock:
                    self._hand_over()
            self._await(w)
        except BaseException:
            # Interrupted (a signal) anywhere from queueing our state to its hand-over,
            # also between two statements: leave nothing queued behind. The caller is
            # interrupted, not the commit: it is written with the others.
            if w is not None and w.fut is None and w.error is None:
                with self._commit_lock:
                    if w.fut is None and w.error is None:
                        self._flush_waiting()
            raise
        finally:
            if w is not None and w.lead:
                _complete(self._pass_role, w)
        self._commits += 1

    # -- commit combining ("full" mode): one storage commit for the transactions that
    # commit together.
    #
    # A commit builds its new state under the commit lock, as above, and queues it
    # (_waiting). One committer at a time holds the persister role: it writes the newest
    # queued state, which holds every queued one (each was built on the one before), as
    # a single storage commit, and every queued transaction waits on that commit's
    # future. The persister waits for its fsync before passing the role on, so the
    # commits that arrive meanwhile are written together next: persisting and writing
    # cost once per group instead of once per transaction. Alone, a committer is its own
    # persister and writes at once, as without combining.

    def _hand_over(self, gather=True):
        """Caller holds the commit lock (and the persister role, or is flushing). Write the
        queued states as one storage commit and give each waiter its future (or its
        error). In "full" mode, first wait a little for committers known to be on their
        way (_gather)."""
        if gather and self._full and self._waiting:
            self._gather()
        batch, self._waiting = self._waiting, []
        if not batch:
            return
        current = self._rollbacks()
        if batch[0].rollbacks != current:
            # Storage rolled back after these states were built: the oldest may stand on
            # commits that are gone (the newer ones were rebuilt from storage's head).
            stale = [w for w in batch if w.rollbacks != current]
            batch = batch[len(stale):]
            err = StorageError(5, "the commit was not written: an earlier write or fsync "
                                  "failed while it waited; the database is back at its last "
                                  "durable commit, retry")
            for w in stale:
                w.settle(None, err)
            if not batch:
                return
        last = batch[-1]
        bulk = False
        for w in batch:
            bulk = bulk or w.bulk
        def queued(f):
            # Interrupted after storage queued it: the group is handed over all the same.
            for w in batch:
                w.handed = last.state
                w.settle(f, None)
            self._handed_anyway(f, last.state, last.rollbacks)
        try:
            fut = self._write_state(last.state, bulk, last.rollbacks, len(batch), queued)
        except BaseException as exc:
            if batch[-1].fut is not None:
                raise                            # handed over (queued above)
            self._pending = batch[0].base        # no state of the batch was written
            for w in batch:
                w.settle(None, exc)
            if self._rollbacks() != last.rollbacks:
                self._catch_up_rollback()
            return
        self._last_future = fut
        for w in batch:
            w.handed = last.state
            w.settle(fut, None)

    def _gather(self):
        """Caller holds the commit lock. Full mode: before a group is written, wait (at most
        half the recent write+fsync time, and _GATHER_MAX) until every open transaction
        that is about to commit has queued its commit. Without this, the committers
        split into two halves taking turns around each fsync; with it, one fsync serves
        them all, and the commits of a group are persisted once.

        "About to commit": not read-only, and either written to within _GATHER_RECENT of
        its start, or younger than the wait itself (a committer that just got its
        acknowledgement is back within microseconds). A transaction that reads for long
        without writing is not waited for."""
        limit = min(self._fsync_ewma * 0.5, _GATHER_MAX)
        if limit <= 0:
            return
        want = 0
        now = time.monotonic()
        for r in list(self._live.values()):
            t = r()
            if t is None or t._closed or t._readonly:
                continue
            age = now - t._started
            if age < limit or ((t._dirty or t._new) and age < _GATHER_RECENT):
                want += 1
        if len(self._waiting) >= want:
            return
        deadline = now + limit
        self._gathering = True
        try:
            while len(self._waiting) < want:
                left = deadline - time.monotonic()
                if left <= 0 or not self._arrived.wait(left):
                    break
        finally:
            self._gathering = False

    def _pass_role(self, w):
        """The persister ``w``'s commit is settled: the next queued committer takes the
        role (it writes what queued meanwhile), or nobody holds it. Called through
        complete(): safe to restart after an interrupt anywhere (a role passed already is
        not passed twice; a successor not yet woken is woken)."""
        with self._commit_lock:
            p = self._persister
            if p is not w:
                if p is not None and p._gate is not None:
                    p.settle(None, None)       # passed, then cut short before the wake-up
                return
            if self._waiting:
                nxt = self._waiting[0]
                nxt.lead = True
                self._persister = nxt
                nxt.settle(None, None)
            else:
                self._persister = None

    def _await(self, w):
        """Full mode: wait until w's storage commit is durable; publish it."""
        if w.error is not None:
            raise w.error
        if not w.lead:
            self._await_commit(w.fut, w.handed, w.rollbacks)
            return
        t0 = time.perf_counter()
        self._await_commit(w.fut, w.handed, w.rollbacks)
        self._fsync_ewma += (time.perf_counter() - t0 - self._fsync_ewma) * 0.25

    def _await_commit(self, fut, state, rollbacks):
        """Wait until the storage commit of ``state`` is as durable as the mode promises;
        publish the state."""
        try:
            fut.result()
        except StorageError:
            with self._commit_lock:
                if self._pending is state:
                    self._pending = self._head
            raise
        except BaseException:
            fut.add_done_callback(lambda f, s=state, r=rollbacks: self._on_durable(f, s, r))
            raise
        if not self._publish(state, rollbacks):
            with self._commit_lock:
                self._catch_up_rollback()

    @staticmethod
    def _merged_colls(tx, base):
        """The collections table of ``base`` with every handle of ``tx`` that wrote or
        (serializable) read committed onto it; raises ConflictError."""
        colls = base.colls.mutate()
        dirty = {id(h) for h in tx._dirty}      # by identity: handles' == reads them
        handles = tx._dirty
        if tx._serializable:
            handles = handles + [h for h in tx._handles.values()
                                 if h._reads and id(h) not in dirty]
        for h in handles:
            if base is tx._snapshot and h._reads is None:
                head_cs = h._base            # nothing committed since our snapshot
            else:
                head_cs = base.colls.get(h._cid)
            colls[h._cid] = h._commit_state(head_cs)
        for h in tx._new:
            if h._cid not in colls:
                colls[h._cid] = h._commit_state(None)
        return colls.finish()

    # Typed by its return value only: a keyword (retries) cannot follow a ParamSpec's args.
    def run(self, fn: Callable[Concatenate[Transaction, ...], _R], *args: Any, retries: int = 10,
            **kwargs: Any) -> _R:
        """Call fn(tx, *args, **kwargs) in a transaction and commit it, retrying up to
        `retries` times (with a short randomized backoff) when the commit conflicts."""
        _check_retries(retries)
        for attempt in range(retries + 1):
            tx = self.transaction()
            try:
                result = fn(tx, *args, **kwargs)
                tx.commit()
                return result
            except ConflictError as exc:
                if attempt == retries:
                    raise exc._gave_up(attempt + 1, retries) from None
                time.sleep(random.uniform(0, 0.0005 * (2 ** min(attempt, 6))))
            finally:
                if not tx.closed:
                    tx.abort()
        raise AssertionError("unreachable")

    def transactional(self, retries: int = 10) -> Callable[[Callable[Concatenate[Transaction, _P], _R]],
                                                          Callable[_P, _R]]:
        """Decorator: the function runs in a transaction (received as its first argument),
        committed on return and retried on ConflictError."""
        _check_retries(retries)
        def decorate(fn):
            @wraps(fn)
            def wrapper(*args, **kwargs):
                return self.run(fn, *args, retries=retries, **kwargs)
            return wrapper
        return decorate

    # -- maintenance -------------------------------------------------------------------

    def _wait_pending(self):
        """Caller holds the commit lock: hand over every queued state, then wait until
        every handed-over commit is settled."""
        if self._waiting:
            self._flush_waiting()
        last = self._last_future
        if last is not None:
            try:
                last.result()
            except StorageError:
                self._pending = self._head

    def _settle_pending(self):
        """Caller holds the commit lock: every handed-over commit is settled and the pending
        state is one storage holds. After a failed write the published head can lag behind
        commits that did become durable (their committers have not published yet), so the
        state is reloaded from storage rather than taken from the head."""
        self._wait_pending()
        if self._store is not None:
            self._catch_up_rollback()

    def _flush_waiting(self):
        """Caller holds the commit lock: write the queued states now, whoever holds the
        role (compaction, close and rollback recovery leave none behind)."""
        self._hand_over(gather=False)

    @staticmethod
    def _write_copy(store, state, changed=None, trust=None):
        """Write a fresh copy of `state` (or only its `changed` collections on top of what
        `store` already holds) as one commit of `store`; returns the copied State. `trust`:
        the modules the database trusts (for nodes whose keys are their Enum members)."""
        io = StoreIO(store, trust)
        if changed is None:
            colls = hamt.Map().mutate()
            items = state.colls.items()
        else:
            colls = changed[0].colls.mutate()
            items = ((cid, state.colls[cid]) for cid in changed[1])
        for cid, cs in items:
            colls[cid] = copy_collection(cs)
        if changed is not None:
            for cid in list(colls):
                if cid not in state.colls:
                    del colls[cid]
        copy = State(colls.finish(), state.next_coll_id, state.seq)
        try:
            c = store.begin_commit()
            io.commit = c
            root_ptr = copy.persist(io)
            fut = c.finish(root_ptr)
        except BaseException:
            store.abort_own_commit()
            raise
        fut.result()
        return copy

    def compact(self) -> dict[str, int]:
        """Rewrite the file to hold only the live data of the newest state, while reads and
        writes go on; commits made meanwhile are carried over, and the new file replaces the
        old atomically (a crash at any point leaves a valid database). Returns a dict with
        the file size before and after."""
        self._check_open()
        if self._store is None:
            return {"before": 0, "after": 0}
        if self._readonly:
            raise self._readonly_error("compact()")
        from .storage import LogStore
        path = self._store.path
        # One compaction at a time: they share the .compact file (a second one would
        # delete the first one's copy under it).
        with self._compacting:
            tmp = path + ".compact"
            if os.path.exists(tmp):
                os.remove(tmp)
            before = os.path.getsize(path)
            try:
                new = LogStore.open(tmp, durability=self._durability, file_layer=self._file_layer,
                                    database_id=self._store.database_id)   # the same database
            except BaseException:
                if os.path.exists(tmp):      # created, then its header failed: leave no debris
                    os.remove(tmp)
                raise
            try:
                with self._commit_lock:
                    self._settle_pending()
                    first = self._pending
                # the long part: commits go on meanwhile
                copy = self._write_copy(new, first, trust=self._trust)
                with self._commit_lock:
                    self._settle_pending()
                    last = self._pending
                    if last is not first:
                        changed = [cid for cid, cs in last.colls.items()
                                   if first.colls.get(cid) is not cs]
                        copy = self._write_copy(new, last, changed=(copy, changed),
                                                 trust=self._trust)
                    new.checkpoint()
                    io = StoreIO(new, self._trust)
                    head = State.load(new.head[1], io)
                    os.replace(tmp, path)
                    # The path now names the new file: switch to it before anything else can
                    # fail, so no commit is ever written to the old, unlinked one. Old
                    # snapshots keep reading the old file until close.
                    new.path = path
                    old = self._store
                    self._store, self._io = new, io
                    self._file_id = _file_id(new)
                    self._head = self._pending = head
                    self._last_future = None
                    self._retire(old)    # after the switch: a transaction on the old head is in _live
                    try:
                        _sync_directory(path)
                    except OSError as exc:
                        raise StorageError(exc.errno or 5, f"compacting {path!r}: syncing the "
                                           f"directory after the swap failed: {exc}") from exc
            except BaseException:
                if self._store is not new:
                    new.close()
                    if os.path.exists(tmp):
                        os.remove(tmp)
                raise
            return {"before": before, "after": os.path.getsize(path)}

    def backup(self, path: Union[str, os.PathLike]) -> None:
        """Write a consistent copy of the newest state to a new database file at `path`
        while this database stays in use."""
        self._check_open()
        from .storage import LogStore
        path = os.fspath(path)
        if os.path.exists(path) and os.path.getsize(path) > 0:
            raise FileExistsError(f"{path!r} already exists; backup writes a new database file")
        if self._readonly and self._store is not None:
            self._refresh()          # the newest state is what the writer last committed
        state = self._head
        # Written beside the target and renamed into place once complete and synced: a
        # failed or interrupted backup never leaves a valid-looking (empty or partial)
        # database at `path`, and the next attempt is not refused.
        tmp = path + ".partial"
        if os.path.exists(tmp):
            os.remove(tmp)
        written = []                 # side files, removed again if the backup fails
        try:
            store = LogStore.open(tmp, durability="full",    # a backup is the same database
                                  database_id=self._store.database_id if self._store else None)
            try:
                self._write_copy(store, state, trust=self._trust)
            finally:
                store.close()
            self._backup_side_files(path, state.seq, written)
            os.replace(tmp, path)
            _sync_directory(path)
        except BaseException:
            for leftover in [tmp] + written:
                if os.path.exists(leftover):
                    os.remove(leftover)
            raise

    def _backup_side_files(self, path, seq, written):
        """The vector checkpoints of a backup at `path` (the same database, so its side files
        are trusted there): a loaded index writes its graph as it is now, any other index's
        checkpoint is copied. Each is written whole and renamed into place; opening the copy
        catches each up with the rows it holds. Appends each path to `written` as it is
        written (a failed backup removes them)."""
        if self._store is None or self._store.database_id is None:
            return
        source = self._store.path
        for (cid, field), ix in list(self._vectors.items()):
            target = _side_file(path, cid, field)
            written.append(target)
            ix.checkpoint(target, seq)
        prefix = source + "-vec-"
        for side in sorted(glob.glob(glob.escape(prefix) + "*.hnsw")):
            target = path + side[len(source):]
            if target in written:
                continue
            written.append(target)
            _copy_whole(side, target)

    def checkpoint(self) -> None:
        """Write and fsync every commit made so far, now: once this returns they survive a
        power cut in any durability mode. For durability="none" bulk loads (commit often,
        checkpoint now and then); "full" commits are durable already. An in-memory or
        read-only database has nothing to sync, so it returns at once."""
        self._check_open()
        store = self._store
        if store is None or self._readonly:
            return
        # Every acknowledged commit was queued to the writer before its commit() returned
        # (normal/none write on the committer's thread), so a checkpoint queued now follows
        # them all; a failed write or fsync raises StorageError here.
        store.checkpoint()

    def check(self) -> CheckReport:
        """Verify every checksum in the file and every structure reachable from the newest
        state, and that every stored reference names a collection that exists. Returns a
        report whose `problems` list is empty when all is well."""
        self._check_open()
        report = self._store.check() if self._store is not None else CheckReport([], 0, 0, 0, 0, 0)
        try:
            colls = list(self._head.colls.items())
        except CorruptionError as exc:
            report.problems.append(Problem(exc.offset, f"collections table: {exc}"))
            return report
        present = {cid for cid, _ in colls}
        for cid, cs in colls:
            damaged = False
            for name in sorted(cs.part_names()):
                try:
                    cs.part(name)._check()
                except (CorruptionError, AssertionError) as exc:
                    damaged = damaged or name == "data"
                    report.problems.append(Problem(getattr(exc, "offset", None),
                                                   f"collection {cid}, part {name}: {exc}"))
            if not damaged:
                report.problems.extend(_reference_problems(cid, cs, present))
        return report

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def path(self) -> Optional[str]:
        """The database file's path as resolved at open: absolute, with symbolic links
        followed (the file compaction replaces and side files are named after); None in
        memory."""
        return None if self._store is None else self._store.path

    @property
    def trust(self) -> Optional[frozenset]:
        """The module names given to open(trust=...) (a frozenset), or None."""
        return self._trust

    @property
    def opaque(self) -> bool:
        """Whether instances of untrusted classes read as codec.Opaque (open(opaque=True))."""
        return self._opaque

    @property
    def durability(self) -> str:
        return self._durability

    @property
    def readonly(self) -> bool:
        return self._readonly

    def close(self) -> None:
        """Wait for background work, make everything durable and release the file."""
        if self._closed:
            return                   # closed, or abandoned in a forked child: nothing to do
        _open_databases.discard(self)
        with self._commit_lock:
            self._closed = True
            if self._waiting:
                self._flush_waiting()        # queued commits are written before the file closes
            for (cid, field), ix in self._vectors.items():
                path = self._vector_path(cid, {"field": field})
                if path is not None and not self._readonly:
                    ix.checkpoint(path, self._head.seq)
            for store, _ in self._retired:
                store.close()
            if self._store is not None:
                self._store.close()

    def __enter__(self) -> "Database":
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.close()
        return False

    def stats(self) -> dict[str, Any]:
        """Counters: commits, conflicts, sequence, collections, and storage figures."""
        if self._abandoned:
            self._check_open()
        out = {"commits": self._commits, "conflicts": self._conflicts, "sequence": self._head.seq,
               "collections": len(self._head.colls), "durability": self._durability,
               "in_memory": self._store is None}
        if self._store is not None:
            out.update(self._store.stats())
        return out

    def __repr__(self) -> str:
        where = self.path or ":memory:"
        state = ("abandoned after fork" if self._abandoned else
                 "closed" if self._closed else self._durability)
        return f"<pb.Database {where!s} {state}>"
