"""Transactions: a snapshot, the handles that work on it, and what commit hands the database.

A transaction starts from one immutable `State` (its snapshot, taken in O(1)). Each
collection it touches gets one handle (protobase.collections), which is also the
transaction's working copy of that collection. Commit hands the written handles to the
database, which publishes them directly when nothing committed since the snapshot and
otherwise merges them key by key onto the newer state (Database._commit).

Isolation: "snapshot" (default) checks write sets only; "serializable" also records
every key read (and whole-collection reads: iteration, len, queries) and fails the commit
when a concurrent commit changed any of them, which rules out write skew.
"""
from time import monotonic as _monotonic
from types import MappingProxyType, TracebackType
from typing import Any, Iterator, Literal, Mapping, Optional, Type

from .collections import Dict, List, Set, SortedDict, _Collection
from .state import codec
from .errors import (CorruptionError, ProtoBaseError, ReadOnlyError, SerializationError,
                     TransactionClosedError)

__all__ = ["Transaction"]

_KINDS = {"dict": Dict, "list": List, "set": Set, "sorted": SortedDict}
ISOLATION_LEVELS = ("snapshot", "serializable")
_NO_HANDLES: Mapping[Any, Any] = MappingProxyType({})   # a closed transaction's handle table: empty, read-only


class Transaction:
    """One unit of work on a snapshot of the database. Belongs to one thread.

    Use as a context manager (commit on normal exit, abort on exception) or call
    commit()/abort() yourself."""

    __slots__ = ("_db", "_snapshot", "_readonly", "_serializable", "_closed", "_handles",
                 "_dirty", "_new", "_adopted", "_foreign", "_hook", "_resolver", "_encode",
                 "_decode", "_decoder", "_started", "__weakref__")

    def __init__(self, db, snapshot, readonly=False, isolation="snapshot"):
        if isolation not in ISOLATION_LEVELS:
            raise ValueError(f"isolation must be one of {ISOLATION_LEVELS}, not {isolation!r}")
        self._db = db
        self._snapshot = snapshot
        self._readonly = bool(readonly)
        self._serializable = isolation == "serializable"
        self._closed = False
        self._started = _monotonic()   # a full-mode commit group waits for young ones only
        self._handles = {}    # coll id -> handle (also the working copy)
        self._dirty = []      # handles written in this transaction, in first-write order
        self._new = []        # handles of collections created in this transaction
        self._adopted = []    # (handle, its free-standing contents): undone unless committed
        self._foreign = None  # {coll id: kind} stored through other transactions' handles
        self._hook = self._ref_hook        # bound once: the codec hooks run on every write/read
        self._resolver = self._resolve
        # Every value written or read goes through these: the hooks are bound once here
        # instead of being passed by keyword on each call.
        # The database's trusted modules admit their classes (and silence the warning about
        # storing them); the command line's opaque mode carries untrusted classes undecoded.
        self._encode = codec.Encoder(ref_hook=self._hook, trust=db.trust).encode
        self._decoder = codec.Decoder(ref_resolver=self._resolver, trust=db.trust,
                                      opaque=db.opaque)  # index builds read fields
        self._decode = self._decoder.decode

    # -- the root ----------------------------------------------------------------------

    @property
    def root(self) -> "Dict[str, Any]":
        """The persistent root mapping (a pb.Dict)."""
        return self._handle(0)

    def __getitem__(self, name: str) -> Any:
        return self._handle(0)[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.root[name] = value

    def __delitem__(self, name: str) -> None:
        del self.root[name]

    def __contains__(self, name: object) -> bool:
        return name in self.root

    def __iter__(self) -> Iterator[str]:
        """The root's names, as iterating a mapping gives its keys."""
        return iter(self.root)

    def __len__(self) -> int:
        """How many names the root holds."""
        return len(self.root)

    def __bool__(self) -> bool:
        # A transaction is an object, not a container: an empty root must not make
        # `if tx:` false (and a closed one must not raise there).
        return True

    def get(self, name: str, default: Any = None) -> Optional[Any]:
        return self.root.get(name, default)

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def isolation(self) -> Literal["snapshot", "serializable"]:
        return "serializable" if self._serializable else "snapshot"

    # -- handles ---------------------------------------------------------------------

    def _check_open(self):
        if self._closed:
            raise TransactionClosedError("this transaction has ended (committed or aborted); "
                                         "start a new one with db.transaction()")

    def _handle(self, cid):
        if self._closed:
            self._check_open()
        h = self._handles.get(cid)
        if h is None:
            cs = self._snapshot.colls.get(cid)
            if cs is None:
                raise CorruptionError(f"a stored reference names collection #{cid}, which does not exist")
            h = self._handles[cid] = _KINDS[cs.kind]._bind(self, cid, cs)
        return h

    def _resolve(self, cid):
        """Codec hook: a stored reference to collection cid -> its handle in this transaction."""
        return self._handle(cid)

    def _ref_hook(self, obj):
        """Codec hook: a collection inside a value being written is stored by reference."""
        if not isinstance(obj, _Collection):
            return None
        tx = obj._tx
        if tx is self:
            return obj._cid
        if tx is None:                         # free-standing: it becomes a new collection here
            if self._readonly:
                raise self._readonly_error()
            cid = self._db._allocate_collection_id()
            initial = obj._initial
            self._handles[cid] = obj
            self._new.append(obj)
            self._adopted.append((obj, initial))
            try:
                obj._adopt(self, cid)
            except BaseException:
                # Its contents did not encode: the value holding it is not written, and
                # the object stays free-standing (the id is left unused).
                del self._handles[cid]
                self._new.remove(obj)
                self._adopted.pop()
                obj._disown(initial)
                raise
            return cid
        if tx._db is self._db:                 # a handle from another transaction: same collection
            # It exists only if that transaction committed (or it was read there): the
            # commit checks that against the state it builds (Database._check_references).
            foreign = self._foreign
            if foreign is None:
                foreign = self._foreign = {}
            foreign[obj._cid] = type(obj).__name__
            return obj._cid
        raise SerializationError(
            "a collection from another database cannot be stored here; copy its contents "
            "into a new pb collection instead", type_name=type(obj).__name__)

    def _readonly_error(self):
        """The ReadOnlyError for a write here: the database's own when it was opened
        read-only (db.transaction() cannot help then), else this transaction's."""
        if self._db._readonly:
            return self._db._readonly_error()
        return ReadOnlyError("a write cannot be made: this transaction is read-only "
                             "(db.transaction(readonly=True)); write in one from db.transaction()")

    # -- ending ------------------------------------------------------------------------

    def commit(self) -> None:
        """Make every write durable and visible (per the database's durability mode), or
        raise ConflictError and leave the database unchanged."""
        self._check_open()
        try:
            self._db._commit(self)
        except ProtoBaseError:
            # Refused or failed (conflict, storage error, a dangling reference): nothing of
            # it was committed, so its adoptions are undone as by abort().
            self._disown_adopted()
            raise
        finally:
            self._close()

    def abort(self) -> None:
        """Drop every write of this transaction. Aborting twice is harmless. Free-standing
        collections it adopted (stored) are free-standing again, with the contents they
        were built with, so a retry stores them afresh."""
        self._disown_adopted()
        self._close()

    def _disown_adopted(self):
        adopted, self._adopted = self._adopted, []
        for obj, initial in reversed(adopted):
            if obj._tx is self:
                obj._disown(initial)

    def _close(self):
        # Drop every reference back to this transaction (handles, bound hooks): a closed
        # transaction is then freed by reference counting alone. Left in place, these
        # cycles keep each transaction, its snapshot and its handles alive until the cyclic
        # collector runs, and with small commits that collector becomes the main cost.
        self._closed = True
        self._db._live.pop(id(self), None)
        self._handles = _NO_HANDLES
        self._dirty = self._new = ()
        self._adopted = []
        self._foreign = None
        self._hook = self._resolver = self._encode = self._decode = self._ended
        self._decoder = None

    @staticmethod
    def _ended(*args):
        raise TransactionClosedError("this transaction has ended (committed or aborted); "
                                     "start a new one with db.transaction()")

    def __enter__(self) -> "Transaction":
        self._check_open()
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> Literal[False]:
        if self._closed:
            return False
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self._readonly else "open")
        return f"<pb.Transaction {state} at seq {self._snapshot.seq}, {self.isolation}>"
