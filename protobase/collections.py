"""`Dict`, `List`, `Set` and `SortedDict`: persistent collections as Python containers.

A collection object is in one of two modes:

- *free-standing*: ``pb.Dict({"a": 1})`` holds its initial contents in a plain container
  until it is stored into a transaction (assigned into ``tx.root`` or into a value);
- *bound*: the handle of one collection inside one transaction. It is at the same time
  that transaction's working copy of the collection: the snapshot's structure (`_base`),
  the transient it writes into (`_mut`, made on the first write) and the write set the
  commit replays when another transaction committed first (`_writes`).

Values are encoded by the codec at the write (so later changes to the caller's object
change nothing) and decoded at every read (so the caller owns what it gets back).
A handle stays usable only while its transaction is open.

Pickling and copy.copy/deepcopy: a free-standing collection gives a free-standing copy of
its contents (storable anywhere); a handle refuses with a TypeError, since it is a view
into one transaction: what to pickle is its contents (``dict(handle)``, ``list(handle)``).
"""
from collections.abc import ItemsView, KeysView, MutableMapping, MutableSequence, MutableSet, ValuesView
import math
from fractions import Fraction
from functools import cmp_to_key
from itertools import islice, repeat
import operator
from typing import (TYPE_CHECKING, Any, Generic, Iterable, Iterator, Mapping, Optional, Tuple,
                    TypeVar, Union, overload)

from .errors import ConflictError, CorruptionError, TransactionClosedError
from . import vector
from .errors import QueryError, VectorError
from .index import Index, IndexSpec, refuse_references
from .query import Query, make_predicate
from .query.expr import MISSING as FIELD_MISSING, extract, split_path
from .state import MISSING, CollState, btree, codec, hamt, idset
from ._core import load as _load_core

if TYPE_CHECKING:
    from ._core import handle as _handle
    from .vector.search import Hits
else:
    _handle = _load_core("handle")

_K = TypeVar("_K")   # a map's key type
_V = TypeVar("_V")   # a collection's value type
_T = TypeVar("_T")

IdSet = idset.IdSet

__all__ = ["Dict", "List", "Set", "SortedDict"]

ALL = object()      # the whole collection was read (iteration, len, queries) or edited
_APPEND = object()  # List write marker: one append (appends from concurrent commits commute)


def _same(a, b):
    """Is the stored value unchanged? Identity first; equal bytes count as unchanged."""
    return a is b or (a is not MISSING and b is not MISSING and a == b)


def _repr_items(parts, limit=10):
    """The first `limit` of the formatted items `parts`, then "..." if there are more."""
    parts = list(islice(parts, limit + 1))
    if len(parts) > limit:
        parts[limit:] = ["..."]
    return ", ".join(parts)


class _Collection(_handle.HandleCore):
    """What every collection kind shares: binding, transaction checks, value coding. The
    fields (set in __init__ and _bind) are C slots of _core.handle.HandleCore."""

    __slots__ = ()
    KIND = None

    def __init__(self, initial=None):
        self._tx = None
        self._cid = None
        self._base = None
        self._mut = None
        self._writes = None
        self._reads = None
        self._initial = initial
        self._ix = None          # indexed maps: the working row-id and index mutations
        self._schema = False     # indexes created or dropped in this transaction

    # -- binding -------------------------------------------------------------------

    @classmethod
    def _bind(cls, tx, cid, base):
        self = cls.__new__(cls)
        self._tx = tx
        self._cid = cid
        self._base = base          # CollState in the snapshot, None for a new collection
        self._mut = None
        self._writes = []        # keys/members written (repeats allowed), or List markers
        self._reads = set() if tx._serializable else None
        self._initial = None
        self._ix = None
        self._schema = False
        return self

    def _adopt(self, tx, cid):
        """Turn a free-standing collection into the handle of a new collection in tx."""
        initial, self._initial = self._initial, None
        self._tx, self._cid, self._base = tx, cid, None
        self._writes = []
        self._reads = set() if tx._serializable else None
        self._mut = CollState.new(self.KIND).data.mutate()
        self._load_initial(initial)

    def _disown(self, initial):
        """Undo _adopt (its transaction aborted, or the adoption failed): free-standing
        again, holding ``initial``, the contents it was adopted with."""
        self._tx = self._cid = self._base = self._mut = self._writes = self._reads = None
        self._ix = None
        self._schema = False
        self._initial = initial

    def _struct(self):
        """The structure reads go to: the transient once written, else the snapshot's."""
        tx = self._tx
        if tx is None:
            raise TypeError(f"this {type(self).__name__} is not stored in a database yet")
        if tx._closed:
            raise TransactionClosedError(
                f"the transaction of this {type(self).__name__} has ended; open a new transaction "
                "and read the collection again")
        m = self._mut
        return m if m is not None else self._base.data

    def _writable(self):
        tx = self._tx
        if tx is None:
            return None
        if tx._closed:
            self._struct()
        if tx._readonly:
            raise tx._readonly_error()
        if self._mut is None:
            self._mut = self._base.data.mutate()
            if self._base.meta.get("rowids"):
                self._ix = self._ROWS(self._base, self._mut, self)
            tx._dirty.append(self)
        return self._mut

    def _encode(self, value):
        encode = self._tx._encode
        return encode(value)

    def _decode(self, raw):
        decode = self._tx._decode
        return decode(raw)

    def _read_all(self):
        if self._reads is not None:
            self._reads.add(ALL)

    def __len__(self):
        if self._tx is None:
            return len(self._initial)
        self._read_all()
        return len(self._struct())

    def __iter__(self):
        if self._tx is None:
            return iter(self._initial)
        self._read_all()
        return iter(self._struct())

    # -- commit --------------------------------------------------------------------

    def _commit_state(self, head):
        """The CollState to publish on top of `head` (the latest committed version of this
        collection, or None when it is new); raises ConflictError when it cannot merge."""
        if head is None or head is self._base:      # nobody else touched it: publish as is
            if self._ix is not None:
                return self._ix.state()
            if self._mut is None:
                return self._base
            data = self._mut.finish()
            return CollState.new(self.KIND).replace(data=data) if self._base is None \
                else self._base.replace(data=data)
        if self._schema:
            self._conflict(None, "indexes were changed while another transaction wrote the collection")
        self._check_reads(head)
        if self._mut is None:
            return head
        return self._merge(head, self._mut.finish())

    def _check_reads(self, head):
        if not self._reads:
            return
        if ALL in self._reads:
            self._conflict(None, "the collection was read whole and changed since")
        snap, cur = self._base.data, head.data
        for key in self._reads:
            if not _same(cur.get(key, MISSING), snap.get(key, MISSING)):
                self._conflict(key, "a value this transaction read was changed")

    def _conflict(self, key, reason):
        name = None
        if self._cid == 0:
            where = "the root" if key is None else f"root name {key!r}"
        else:
            name = self._root_name()
            kind = type(self).__name__
            where = f"{kind} #{self._cid}" if name is None else f"{kind} {name!r}"
            if key is not None:
                where += f" key {key!r}"
        raise ConflictError(f"{reason}: {where} was changed by a transaction that committed "
                            f"first{ConflictError._RETRY_HINT}", collection=self._cid, key=key,
                            reason=reason, collection_name=name)

    def _root_name(self):
        """The root name this collection is stored under directly, as this transaction
        sees the root, or None (nested deeper, or not named at all). A conflict is rare:
        the root's raw values are compared with the bytes of a reference to this one."""
        tx = self._tx
        ref = codec.dumps(self, ref_hook=lambda obj, cid=self._cid: cid)
        root = tx._handles.get(0)
        if root is not None and root._mut is not None:
            struct = root._mut
        else:
            base = tx._snapshot.colls.get(0)
            struct = base.data if base is not None else None
        if struct is None:
            return None
        for name, raw in struct.items():
            if raw == ref:
                return name
        return None

    def _check_writes(self, head, present=lambda s, k: s.get(k, MISSING)):
        snap, cur = self._base.data, head.data
        for key in dict.fromkeys(self._writes):
            if not _same(present(cur, key), present(snap, key)):
                self._conflict(key, "write-write conflict")

    _PLAIN = None    # the built-in type a copy of the contents is (dict, list, set)

    def __reduce_ex__(self, protocol):
        """Pickling and copy.copy/deepcopy. A free-standing collection gives a free-standing
        copy of its contents; a handle refuses: it is a view into one transaction."""
        if self._tx is None:
            return type(self), (self._initial,)
        plain = self._PLAIN.__name__
        raise TypeError(
            f"a pb.{type(self).__name__} read from a transaction cannot be pickled or copied: "
            f"it is a handle that lives only as long as its transaction; pickle or copy its "
            f"contents instead: {plain}(handle) is a plain {plain} you own (a collection "
            f"stored inside it is a handle too: convert it the same way)")

    def __repr__(self):
        if self._tx is not None and self._tx._closed:
            return f"<pb.{type(self).__name__} #{self._cid} (transaction ended)>"
        return f"pb.{type(self).__name__}({self._repr_body()})"

    __hash__ = None  # type: ignore[assignment]   # mutable containers are unhashable


class _Queryable(Generic[_K, _V]):
    """Secondary indexes, vector indexes and queries: shared by the maps and List. A
    subclass names the working row state (`_ROWS`) and the query source (`_SOURCE`)
    for its kind."""

    __slots__ = ()

    @property
    def indexes(self) -> "list[str]":
        """The field paths this collection is indexed on."""
        if self._tx is None:
            return []
        self._struct()
        if self._ix is not None:
            return list(self._ix.indexes)
        return [] if self._base is None else list(self._base.meta.get("indexes", ()))

    def create_index(self, field: str) -> None:
        """Index entries by `field` (a dict key or attribute; "a.b" nests). The index is
        built over the current contents, persisted with the collection and maintained by
        every write. Creating an index that exists already does nothing.

        A field holding a stored collection (a pb.Set, pb.List or pb.Dict inside the
        entry, at any depth) cannot be indexed: the collection can change without its
        entry being written, so the index would go stale. create_index refuses such a
        field with QueryError, and so does a later write (or a commit) that puts one into
        an indexed field; queries on the field answer by scan."""
        if isinstance(field, tuple):
            raise QueryError(f"create_index({field!r}): composite indexes are not supported "
                             f"yet, and a tuple never means a nested path; index each field "
                             f"on its own (create_index({field[0]!r}) ...), or give a nested "
                             f"path as one string such as 'a.b'" if field else
                             "create_index(()): give a field path such as 'price'")
        if not isinstance(field, str):
            raise QueryError(f"create_index() takes a field path such as 'price' or 'a.b', "
                             f"not {type(field).__name__}")
        spec = IndexSpec(field)
        if self._tx is None:
            raise TypeError(f"store this {type(self).__name__} in a transaction before indexing it")
        if spec.field in self.indexes:
            return
        self._writable()
        if self._ix is None:
            self._ix = self._ROWS(self._base or CollState.new(self.KIND), self._mut, self)
        self._ix.add_index(spec.field)
        self._schema = True

    def drop_index(self, field: str) -> None:
        """Remove the index on `field`; KeyError if there is none."""
        spec = IndexSpec(field)
        if spec.field not in self.indexes:
            raise KeyError(f"no index on {spec.field!r}")
        self._writable()
        self._ix.drop_index(spec.field)
        self._schema = True

    def create_vector_index(self, field: str, dim: int, metric: str = "cosine", M: int = 16,
                            ef_construction: int = 200) -> None:
        """Index the vectors at `field` (numpy arrays or sequences of floats of length `dim`)
        for nearest-neighbour search with hnswlib ("cosine", "l2" or "ip"). Every existing
        and future vector at `field` must have that dimension. Needs protobase[vector]."""
        vector.require_hnswlib()
        spec = vector.make_spec(IndexSpec(field).field, dim, metric, M, ef_construction)
        if self._tx is None:
            raise TypeError(f"store this {type(self).__name__} in a transaction before indexing it")
        self._struct()
        self._writable()
        if self._ix is None:
            self._ix = self._ROWS(self._base or CollState.new(self.KIND), self._mut, self)
        self._ix.add_vector_index(spec)
        self._schema = True

    @property
    def vector_indexes(self) -> "dict[str, dict[str, Any]]":
        """Field path -> settings of each vector index."""
        if self._tx is None:
            return {}
        self._struct()
        if self._ix is not None:
            return dict(self._ix.vectors)
        return {} if self._base is None else dict(self._base.meta.get("vectors", {}))

    def nearest(self, field: str, vector: Any, k: int = 10, ef: Optional[int] = None) -> "Hits[_K, _V]":
        """The k entries whose vector at `field` is nearest to `vector`: where().nearest()."""
        return self.where().nearest(field, vector, k=k, ef=ef)

    def where(self, *predicates: Any, **equalities: Any) -> "Query[_K, _V]":
        """A lazy Query over this collection: predicates (F expressions) and keyword
        equalities are ANDed; no arguments selects everything."""
        self._struct()
        self._read_all()
        return Query(self._SOURCE(self), make_predicate(*predicates, **equalities))


class _MapBase(_Queryable[_K, _V], _Collection, _handle.MapCore, MutableMapping[_K, _V]):
    """Shared by Dict and SortedDict: a mapping from keys to encoded values."""

    __slots__ = ()
    _PLAIN = dict

    if TYPE_CHECKING:   # MapCore's C slots, as the type checker should see them
        def __getitem__(self, key: _K) -> _V: ...
        def __setitem__(self, key: _K, value: _V) -> None: ...
        def __delitem__(self, key: _K) -> None: ...
        def __contains__(self, key: object) -> bool: ...
        @overload
        def get(self, key: _K) -> Optional[_V]: ...
        @overload
        def get(self, key: _K, default: Union[_V, _T]) -> Union[_V, _T]: ...

    def __init__(self, mapping: Union[Mapping[_K, _V], Iterable[Tuple[_K, _V]]] = (), **kwargs: _V) -> None:
        d = dict(mapping, **kwargs)
        super().__init__(d)

    def _load_initial(self, initial):
        for k, v in initial.items():
            self[k] = v

    # d[k], d[k] = v, del d[k], get and `in` are _core.handle.MapCore's (C); del d[k]
    # comes here.
    def _delete(self, key):
        m = self._writable()
        if m is None:
            del self._initial[key]
            return
        if key not in m:
            raise KeyError(key)
        if self._ix is None:
            del m[key]
        else:
            self._ix.put(key, MISSING, MISSING)
        self._writes.append(key)

    def keys(self) -> KeysView[_K]:
        return KeysView(self)

    def items(self) -> ItemsView[_K, _V]:
        return _ItemsView(self)

    def values(self) -> ValuesView[_V]:
        return _ValuesView(self)

    def _iter_items(self):
        if self._tx is None:
            yield from self._initial.items()
            return
        self._read_all()
        decode = self._tx._decode
        for k, raw in self._struct().items():
            yield k, decode(raw)

    def copy(self) -> "dict[_K, _V]":
        """A plain dict with the current contents (the caller owns it)."""
        return dict(self._iter_items())

    def __eq__(self, other):
        if isinstance(other, (_MapBase, dict)):
            if len(self) != len(other):
                return False
            return all(k in other and other[k] == v for k, v in self._iter_items())
        return NotImplemented

    def _repr_body(self):
        return "{" + _repr_items(f"{k!r}: {v!r}" for k, v in self._iter_items()) + "}"

    def _changed_rows(self, before, after):
        """(row id, raw value or MISSING) of each row this committed transaction wrote:
        `after` is the collection as committed, `before` as it was just before."""
        rowid = after.part("rowid")
        old_rowid = before.part("rowid") if before is not None and before.meta.get("rowids") else None
        data = after.data
        for key in dict.fromkeys(self._writes):
            rid = rowid.get(key)
            old = old_rowid.get(key) if old_rowid is not None else None
            if old is not None and old != rid:
                yield old, MISSING      # deleted, or deleted and put again under a new row id
            if rid is not None:
                yield rid, data[key]

    def _merge(self, head, mine):
        self._check_writes(head)
        m = head.data.mutate()
        if head.meta.get("rowids"):                # replay through the head's indexes
            ix = _Indexed(head, m, self)
            rowids = self._ix.rowid if self._ix is not None else None
            for key in dict.fromkeys(self._writes):
                raw = mine.get(key, MISSING)
                value = MISSING if raw is MISSING else self._decode(raw)
                rid = rowids.get(key) if rowids is not None else None
                ix.put(key, raw, value, rid)
            return ix.state()
        for key in dict.fromkeys(self._writes):
            raw = mine.get(key, MISSING)
            if raw is MISSING:
                m.pop(key, None)
            else:
                m[key] = raw
        return head.replace(data=m.finish())


_PLAIN_FIELD = frozenset((str, int, float, bool, bytes, type(None)))   # never hold a reference
_WHOLE = object()   # decode_field's answer for a stored value that is not a plain dict


class _Rows:
    """What the indexed map and the indexed list share: row ids, the set of live ids, one
    IndexMutation per index and the vector index settings, built from a CollState.
    A subclass opens (`_open_rows`) or creates (`_number_rows`) its own row parts.

    Row ids come from a per-collection counter in the Database, so concurrent transactions
    never hand out the same id and merges keep the ids they chose."""

    __slots__ = ("kind", "meta", "data", "ids", "indexes", "vectors", "owner", "next_rowid",
                 "_row_cache", "_spare", "_spare_end")
    ROW_ID_BLOCK = 256     # ids reserved at a time for single inserts (the lock is not free)

    def __init__(self, cs, data_mut, owner):
        self.kind = cs.kind
        self.meta = dict(cs.meta)
        self.data = data_mut
        self.owner = owner
        self.next_rowid = self.meta.get("next_rowid", 0)
        self._row_cache = None # (row ids, stored values) while indexes are being built
        self._spare = self._spare_end = 0
        self.vectors = dict(self.meta.get("vectors", {}))
        if self.meta.get("rowids"):
            self._open_rows(cs)
            self.ids = cs.part("ids").mutate()
        else:                      # the first index: number the existing entries
            n = len(data_mut)
            first = self._allocate(n)
            with Index.bulk:
                self._number_rows(first)
            self.ids = IdSet.from_range(first, first + n).mutate()
        self.indexes = {f: Index.from_parts(f, {n: cs.part(f"ix/{f}/{n}") for n in _INDEX_PARTS}).mutate()
                        for f in self.meta.get("indexes", [])}

    def _allocate(self, n=1):
        """The first of n consecutive fresh row ids."""
        if n == 1 and self._spare < self._spare_end:
            self._spare += 1
            return self._spare - 1
        owner = self.owner
        block = self.ROW_ID_BLOCK if n == 1 else n
        rid = owner._tx._db._allocate_row_id(owner._cid, self.next_rowid, block)
        self.next_rowid = rid + block
        if n == 1:
            self._spare, self._spare_end = rid + 1, rid + block
        return rid

    def add_index(self, field):
        """Index ``field`` over every row, reading only that field of each stored value
        (``Decoder.decode_fields``: no row is decoded whole unless it is not a plain dict)."""
        parts = IndexSpec(field).parts
        tx = self.owner._tx
        decode, decoder = tx._decode, tx._decoder
        with Index.bulk:
            if self._row_cache is None:            # kept for the next index built
                self._row_cache = self._row_raws()
            rowids, raws = self._row_cache
            values = decoder.decode_fields(raws, parts[0], FIELD_MISSING, _WHOLE)
            if len(parts) > 1:
                rest = parts[1:]
                values = [v if v is _WHOLE or v is FIELD_MISSING else extract(v, rest)
                          for v in values]
            if any(map(operator.is_, values, repeat(_WHOLE))):
                values = [extract(decode(raw), parts) if v is _WHOLE else v
                          for v, raw in zip(values, raws)]
            index = Index.from_field_values(field, rowids, values)
        self.indexes[field] = index.mutate()

    def drop_index(self, field):
        del self.indexes[field]

    def _check_row(self, value):
        """Refuse a row value an index or vector index cannot take, before any change."""
        for field, spec in self.vectors.items():
            _check_vector(value, field, spec)
        for field, ix in self.indexes.items():
            fv = ix.spec.extract(value)
            if type(fv) not in _PLAIN_FIELD:
                refuse_references(field, fv)

    def add_vector_index(self, spec):
        decode = self.owner._decode
        for raw in self._raws():
            _check_vector(decode(raw), spec["field"], spec)
        self.vectors[spec["field"]] = spec

    def snapshot_indexes(self):
        return {f: m.finish() for f, m in self.indexes.items()}

    def state(self):
        """The CollState holding everything written so far."""
        meta = dict(self.meta, next_rowid=self.next_rowid, indexes=sorted(self.indexes),
                    vectors=self.vectors, rowids=True)
        parts = {"data": self.data.finish()}
        if self.indexes or self.vectors:
            parts.update(self._row_parts(), ids=self.ids.finish())
            for f, ix in self.snapshot_indexes().items():
                for n, struct in ix.parts().items():
                    parts[f"ix/{f}/{n}"] = struct
        for name in ("indexes", "vectors"):
            if not meta[name]:
                del meta[name]
        if not (self.indexes or self.vectors):
            del meta["rowids"]
        self._row_cache = None
        return CollState(self.kind, parts, meta)



class _Indexed(_Rows):
    """The working state of an indexed map inside one transaction (or one merge): the data
    transient plus row ids (key <-> row id) kept in step with the indexes by put()."""

    __slots__ = ("rowid", "keyof")

    def _open_rows(self, cs):
        self.rowid = cs.part("rowid").mutate()
        self.keyof = cs.part("keyof").mutate()

    def _number_rows(self, first):
        rowid, keyof = self.rowid, self.keyof = hamt.Map().mutate(), hamt.Map().mutate()
        for rid, key in enumerate(self.data, first):
            rowid[key] = rid
            keyof[rid] = key
        # Row ids follow the data's own order, which its values() walk repeats.
        self._row_cache = list(range(first, first + len(keyof))), list(self.data.values())

    def _row_parts(self):
        return {"rowid": self.rowid.finish(), "keyof": self.keyof.finish()}

    def _raws(self):
        return self.data.values()

    def put(self, key, raw, value, rid=None):
        """Set key to (raw, value), or delete it when raw is MISSING; indexes follow."""
        self._row_cache = None
        if raw is not MISSING:
            self._check_row(value)
        old_raw = self.data.get(key, MISSING)
        if old_raw is MISSING:
            if raw is MISSING:
                return
            if rid is None:
                rid = self._allocate()
            else:
                self.next_rowid = max(self.next_rowid, rid + 1)
            self.rowid[key] = rid
            self.keyof[rid] = key
            self.ids.add(rid)
            for ix in self.indexes.values():
                ix.insert(rid, value)
            self.data[key] = raw
            return
        rid = self.rowid[key]
        old = self.owner._decode(old_raw)
        if raw is MISSING:
            for ix in self.indexes.values():
                ix.delete(rid, old)
            del self.data[key]
            del self.rowid[key]
            del self.keyof[rid]
            self.ids.discard(rid)
        else:
            for ix in self.indexes.values():
                ix.update(rid, old, value)
            self.data[key] = raw

    def _row_raws(self):
        return list(map(self.rowid.__getitem__, self.data)), list(self.data.values())





class _IndexedList(_Rows):
    """The working state of an indexed List in one transaction (or one merge).

    A position is no name for a row: an insert shifts every row after it. So each row has
    a *label*, a number that rises along the list and never changes while the row lives:
    ``order`` (a counted B+tree) maps label -> row id, so the row at position i is its
    i-th entry and a row's position is the rank of its label; ``label`` maps row id ->
    label. An append takes a label SPACING past the last, an insert the midpoint of its
    neighbours (a Fraction once they are adjacent integers). Only when a midpoint gets
    finer than 1/MAX_DENOMINATOR (many inserts at one place) are all rows relabelled.

        data   [ r7    r3    r9    r4  ]        positions 0..3
        order  { 0:7  2^20:3  1.5*2^20:9  2^21:4 }     label -> row id, counted
        label  { 7:0  3:2^20  9:1.5*2^20  4:2^21 }     row id -> label
    """

    __slots__ = ("order", "label", "touched")
    SPACING = 1 << 20
    MAX_DENOMINATOR = 1 << 16

    def __init__(self, cs, data_mut, owner):
        self.touched = set()       # row ids this transaction inserted, changed or deleted
        super().__init__(cs, data_mut, owner)

    def _open_rows(self, cs):
        self.order = cs.part("order").mutate()
        self.label = cs.part("label").mutate()

    def _number_rows(self, first):
        self._relabel(range(first, first + len(self.data)))

    def _raws(self):
        return iter(self.data)

    def _relabel(self, rowids):
        step = self.SPACING
        self.order = btree.SortedMap((i * step, rid) for i, rid in enumerate(rowids)).mutate()
        self.label = hamt.Map().mutate()
        for lab, rid in self.order.items():
            self.label[rid] = lab

    def _label_at(self, pos):
        """A label for a new row at position pos (before the row now there)."""
        order, n = self.order, len(self.order)
        if n == 0:
            return 0
        if pos >= n:
            return math.floor(order.peekitem(-1)[0]) + self.SPACING
        hi = order.peekitem(pos)[0]
        if pos == 0:
            return math.ceil(hi) - self.SPACING
        lo = order.peekitem(pos - 1)[0]
        if type(lo) is int and type(hi) is int and hi - lo > 1:
            return (lo + hi) // 2
        mid = (Fraction(lo) + hi) / 2
        if mid.denominator > self.MAX_DENOMINATOR:
            self._relabel(list(order.values()))
            return self._label_at(pos)
        return int(mid) if mid.denominator == 1 else mid

    def rowid_at(self, pos):
        return self.order.peekitem(pos)[1]

    def insert(self, pos, raw, value, rid=None):
        """Insert (raw, value) as the row at position pos (0 <= pos <= len)."""
        self._row_cache = None
        self._check_row(value)
        if rid is None:
            rid = self._allocate()
        else:
            self.next_rowid = max(self.next_rowid, rid + 1)
        lab = self._label_at(pos)
        self.order[lab] = rid
        self.label[rid] = lab
        self.ids.add(rid)
        for ix in self.indexes.values():
            ix.insert(rid, value)
        if pos == len(self.data):
            self.data.append(raw)
        else:
            self.data.insert(pos, raw)
        self.touched.add(rid)

    def set(self, pos, raw, value):
        self._row_cache = None
        self._check_row(value)
        rid = self.rowid_at(pos)
        old = self.owner._decode(self.data[pos])
        for ix in self.indexes.values():
            ix.update(rid, old, value)
        self.data[pos] = raw
        self.touched.add(rid)

    def delete(self, pos):
        """Remove the row at position pos and return its raw value."""
        self._row_cache = None
        rid = self.rowid_at(pos)
        raw = self.data.pop(pos)
        old = self.owner._decode(raw)
        for ix in self.indexes.values():
            ix.delete(rid, old)
        del self.order[self.label.pop(rid)]
        self.ids.discard(rid)
        self.touched.add(rid)
        return raw

    def _row_raws(self):
        return list(self.order.values()), list(self.data)

    def _row_parts(self):
        return {"order": self.order.finish(), "label": self.label.finish()}


def indexed_rows(cs):
    """(row id, raw value) of every row of a collection state that has row ids."""
    if cs.kind == "list":
        return zip(cs.part("order").values(), cs.data)
    data = cs.data
    return ((rid, data[key]) for rid, key in cs.part("keyof").items())


def _check_vector(value, field, spec):
    v = extract(value, split_path(field))
    if v is not FIELD_MISSING:
        try:
            vector.as_vector(v, spec["dim"])
        except VectorError as exc:
            raise VectorError(f"field {field!r}: {exc}") from None


_INDEX_PARTS = ("tree", "other", "missing")


class _Source:
    """One map collection in one transaction, as the query layer reads it (QuerySource)."""

    __slots__ = ("h",)
    # Committed states are frozen, so the Index objects over one state (and the spans
    # they cache) serve every query on it: id(state) -> (state, indexes). Holding the
    # state keeps its id from being reused; the bound keeps old states from piling up.
    _index_cache = {}
    _INDEX_CACHE_SIZE = 16

    def __init__(self, handle):
        self.h = handle

    def scan(self):
        return self.h._iter_items()

    def indexes(self):
        h = self.h
        h._struct()
        if h._ix is not None:
            return h._ix.snapshot_indexes()
        cs = h._base
        if cs is None:                 # created in this transaction and never indexed
            return {}
        hit = self._index_cache.get(id(cs))
        if hit is not None and hit[0] is cs:
            return hit[1]
        found = {f: Index.from_parts(f, {n: cs.part(f"ix/{f}/{n}") for n in _INDEX_PARTS})
                 for f in cs.meta.get("indexes", ())}
        if len(self._index_cache) >= self._INDEX_CACHE_SIZE:
            self._index_cache.clear()
        self._index_cache[id(cs)] = (cs, found)
        return found

    def _stored_rows(self):
        """The CollState whose row parts a query reads (the handle has no working rows);
        QueryError when the collection has no row ids (no index of any kind)."""
        cs = self.h._base
        if cs is None or not cs.meta.get("rowids"):
            raise QueryError(
                f"this {type(self.h).__name__} has no index, so its entries have no row ids: "
                "call create_index(field) (or create_vector_index) first to use "
                "matching_ids(); iterating a query answers by scan without one")
        return cs

    def _parts(self):
        h = self.h
        h._struct()
        if h._ix is not None:
            return h._ix.keyof, h._ix.ids.finish()
        cs = self._stored_rows()
        return cs.part("keyof"), cs.part("ids")

    def _missing_row(self, rowid):
        return CorruptionError(
            f"an index of this {type(self.h).__name__} names row {rowid!r}, which holds no "
            "entry: the file is damaged or forged; run `protobase check PATH` and restore "
            "from a backup")

    def all_ids(self):
        return self._parts()[1]

    def row(self, rowid):
        key = self.key(rowid)
        try:
            raw = self.h._struct()[key]
        except KeyError:
            raise self._missing_row(rowid) from None
        return key, self.h._decode(raw)

    def key(self, rowid):
        """The key of the entry with row id ``rowid``, its value left undecoded."""
        try:
            return self._parts()[0][rowid]
        except KeyError:
            raise self._missing_row(rowid) from None

    def keys_of(self, rowids):
        """key() of each row id in the sequence ``rowids``, as a list."""
        keyof = self._parts()[0]
        try:
            return [keyof[rid] for rid in rowids]
        except KeyError as exc:
            raise self._missing_row(exc.args[0] if exc.args else None) from None

    def unwritten(self):
        """Whether the transaction is open and the collection has no writes of its own in
        it: while so, the snapshot this source reads (and value_reader()) stays the same,
        and once false it stays false for the rest of the transaction."""
        h = self.h
        tx = h._tx
        return tx is not None and h._mut is None and not tx._closed

    def value_reader(self):
        """``key -> value`` for the entries as this transaction sees them now (the key as
        ``key``/``row`` give it), or None while the collection has writes of its own: its
        working copy changes under later writes, so such a caller decodes at once. Read
        after the transaction ended, it raises TransactionClosedError as any read does."""
        h = self.h
        h._struct()
        if h._mut is not None:
            return None
        tx, data = h._tx, h._base.data
        # tx._decode looked up per read: a closed transaction swaps in one that raises.
        return lambda key: tx._decode(data[key])

    def rows(self, ids):
        h = self.h
        data = h._struct()
        ix = h._ix
        keyof = self._stored_rows().part("keyof") if ix is None else ix.keyof
        decode = h._tx._decode         # what h._decode calls, one frame less per row
        try:
            if h.KIND == "sorted":    # a SortedDict answers in key order, as its scan does
                for key in sorted((keyof[rid] for rid in ids), key=_sort_key):
                    yield key, decode(data[key])
                return
            for rid in ids:
                key = keyof[rid]
                yield key, decode(data[key])
        except KeyError as exc:
            raise self._missing_row(exc.args[0] if exc.args else None) from None

    def count(self):
        return len(self.h._struct())

    def vector_spec(self, field):
        h = self.h
        if h._tx is None:
            return None
        h._struct()
        if h._ix is not None:
            vectors = h._ix.vectors
        elif h._base is not None:
            vectors = h._base.meta.get("vectors")
        else:
            return None
        if not vectors:
            return None
        # Asked by the stored (normalised) path nearly always: one dict lookup, no copy.
        spec = vectors.get(field)
        return spec if spec is not None else vectors.get(IndexSpec(field).field)

    def vector_fields(self):
        """The field paths of this collection's vector indexes, sorted."""
        return sorted(self.h.vector_indexes)

    def vector_index(self, field):
        spec = self.vector_spec(field)
        if spec is None:
            return None
        h = self.h
        return h._tx._db._vector_index(h._cid, spec)

    def snapshot_seq(self):
        """The commit sequence of the snapshot this source reads (vector search uses it to
        tell which rows the shared HNSW index may hold newer vectors for)."""
        return self.h._tx._snapshot.seq

    def written_ids(self):
        h = self.h
        h._struct()
        if h._ix is None:
            return IdSet()
        rowid = h._ix.rowid
        return IdSet(r for r in (rowid.get(k) for k in dict.fromkeys(h._writes)) if r is not None)


class _ListSource(_Source):
    """One List in one transaction, as the query layer reads it: keys are positions, and
    rows come back in list order."""

    __slots__ = ()

    def _rows_parts(self):
        h = self.h
        data = h._struct()
        if h._ix is not None:
            return data, h._ix.order, h._ix.label, h._ix.ids.finish()
        cs = self._stored_rows()
        return data, cs.part("order"), cs.part("label"), cs.part("ids")

    def _position(self, order, label, rowid):
        try:
            pos = order.bisect_left(label[rowid])
        except KeyError:
            raise self._missing_row(rowid) from None
        if pos >= len(self.h._struct()):      # the order names more rows than the data holds
            raise self._missing_row(rowid)
        return pos

    def all_ids(self):
        return self._rows_parts()[3]

    def row(self, rowid):
        data, order, label, _ = self._rows_parts()
        pos = self._position(order, label, rowid)
        return pos, self.h._decode(data[pos])

    def key(self, rowid):
        _, order, label, _ = self._rows_parts()
        return self._position(order, label, rowid)

    def keys_of(self, rowids):
        _, order, label, _ = self._rows_parts()
        return [self._position(order, label, rid) for rid in rowids]

    def rows(self, ids):
        data, order, label, _ = self._rows_parts()
        decode = self.h._decode
        for pos in sorted(self._position(order, label, rid) for rid in ids):
            yield pos, decode(data[pos])

    def written_ids(self):
        h = self.h
        h._struct()
        return IdSet() if h._ix is None else IdSet(h._ix.touched) & self.all_ids()


class _ItemsView(ItemsView):
    __slots__ = ()

    def __iter__(self):
        return self._mapping._iter_items()


class _ValuesView(ValuesView):
    __slots__ = ()

    def __iter__(self):
        for _, v in self._mapping._iter_items():
            yield v


class Dict(_MapBase[_K, _V]):
    """A persistent mapping (``collections.abc.MutableMapping``), insertion order not kept:
    iteration follows the hash trie. ``len()`` is O(1)."""

    __slots__ = ()
    KIND = "dict"
    _ROWS = _Indexed
    _SOURCE = _Source


class SortedDict(_MapBase[_K, _V]):
    """A persistent mapping whose keys are kept in order. Keys of different types never
    raise: they sort by type first (None < numbers < str < bytes < date < naive datetime
    < aware datetime < time < timedelta < UUID < tuple < frozenset < Enum), then by value
    (1, 1.0 and True are one key). Rank operations are O(log n)."""

    __slots__ = ()
    KIND = "sorted"
    _ROWS = _Indexed
    _SOURCE = _Source

    def _load_initial(self, initial):
        for k in sorted(initial, key=_sort_key):
            self[k] = initial[k]

    def __iter__(self):
        if self._tx is None:
            return iter(sorted(self._initial, key=_sort_key))
        return super().__iter__()

    def _iter_items(self):
        if self._tx is None:
            for k in sorted(self._initial, key=_sort_key):
                yield k, self._initial[k]
            return
        yield from super()._iter_items()

    def irange(self, minimum: Optional[_K] = None, maximum: Optional[_K] = None,
               inclusive: Tuple[bool, bool] = (True, True), reverse: bool = False) -> Iterator[_K]:
        """Keys from minimum to maximum (None: unbounded) in order, or reversed."""
        self._read_all()
        return iter(self._bound_struct().irange(minimum, maximum, inclusive, reverse))

    def peekitem(self, index: int = -1) -> Tuple[_K, _V]:
        """The (key, value) pair at a position in key order; IndexError if out of range."""
        self._read_all()
        k, raw = self._bound_struct().peekitem(index)
        return k, self._decode(raw)

    def bisect_left(self, key: _K) -> int:
        self._read_all()
        return self._bound_struct().bisect_left(key)

    def bisect_right(self, key: _K) -> int:
        self._read_all()
        return self._bound_struct().bisect_right(key)

    bisect = bisect_right

    def _bound_struct(self):
        if self._tx is None:
            raise TypeError("store this SortedDict in a transaction before range queries")
        return self._struct()


_sort_key = cmp_to_key(btree.compare)


class Set(_Collection, MutableSet[_T]):
    """A persistent set (``collections.abc.MutableSet``) of immutable built-in values."""

    __slots__ = ()
    KIND = "set"
    _PLAIN = set

    def __init__(self, iterable: Iterable[_T] = ()) -> None:
        super().__init__(set(iterable))

    @classmethod
    def _from_iterable(cls, it):
        return set(it)  # operators return plain sets the caller owns

    def _load_initial(self, initial):
        for x in initial:
            self.add(x)

    def __contains__(self, x: object) -> bool:
        if self._tx is None:
            return x in self._initial
        if self._reads is not None:
            self._reads.add(x)
        return x in self._struct()

    def add(self, x: _T) -> None:
        m = self._writable()
        if m is None:
            self._initial.add(x)
            return
        m.add(x)
        self._writes.append(x)

    def discard(self, x: _T) -> None:
        m = self._writable()
        if m is None:
            self._initial.discard(x)
            return
        m.discard(x)
        self._writes.append(x)

    def update(self, *iterables: Iterable[_T]) -> None:
        for it in iterables:
            for x in it:
                self.add(x)

    def __eq__(self, other):
        if isinstance(other, (Set, set, frozenset)):
            return len(self) == len(other) and all(x in other for x in self)
        return NotImplemented

    def _repr_body(self):
        return "{" + _repr_items(map(repr, self)) + "}"

    def _merge(self, head, mine):
        self._check_writes(head, present=lambda s, k: k in s)
        m = head.data.mutate()
        for x in dict.fromkeys(self._writes):
            if x in mine:
                m.add(x)
            else:
                m.discard(x)
        return head.replace(data=m.finish())


class List(_Queryable[int, _T], _Collection, MutableSequence[_T]):
    """A persistent list (``collections.abc.MutableSequence``): index, assign, insert and
    delete anywhere in O(log n), append amortized O(1). Appends from concurrent
    transactions never conflict; other concurrent edits of one list do. Queries answer
    in list order with positions as keys."""

    __slots__ = ()
    KIND = "list"
    _PLAIN = list
    _ROWS = _IndexedList
    _SOURCE = _ListSource

    def __init__(self, iterable: Iterable[_T] = ()) -> None:
        super().__init__(list(iterable))

    def _load_initial(self, initial):
        self.extend(initial)

    def _note_edit(self):
        self._writes.append(ALL)   # anything but an append: merges at list level

    @overload
    def __getitem__(self, index: int) -> _T: ...
    @overload
    def __getitem__(self, index: slice) -> "list[_T]": ...

    def __getitem__(self, index):
        if self._tx is None:
            return self._initial[index]
        s = self._struct()
        self._read_all()
        decode = self._tx._decode
        if isinstance(index, slice):
            return [decode(raw) for raw in _slice(s, index)]
        return decode(s[_index(index)])

    def __iter__(self) -> Iterator[_T]:
        if self._tx is None:
            yield from self._initial
            return
        s = self._struct()
        self._read_all()
        decode = self._tx._decode
        for raw in s:
            yield decode(raw)

    def _iter_items(self):
        return enumerate(self)

    def __setitem__(self, index, value):
        m = self._writable()
        if m is None:
            self._initial[index] = value
            return
        ix = self._ix
        if isinstance(index, slice):
            start, stop, step = index.indices(len(m))
            values = list(value)
            new = [self._encode(v) for v in values]
            if step == 1:
                stop = max(stop, start)
                if ix is None:
                    m[start:stop] = new
                else:
                    for i in range(stop - 1, start - 1, -1):
                        ix.delete(i)
                    for i, (raw, v) in enumerate(zip(new, values), start):
                        ix.insert(i, raw, v)
            else:
                positions = range(start, stop, step)
                if len(positions) != len(new):
                    raise ValueError(f"attempt to assign sequence of size {len(new)} "
                                     f"to extended slice of size {len(positions)}")
                for i, raw, v in zip(positions, new, values):
                    if ix is None:
                        m[i] = raw
                    else:
                        ix.set(i, raw, v)
        else:
            i = _position(index, len(m))
            raw = self._encode(value)
            if ix is None:
                m[i] = raw
            else:
                ix.set(i, raw, value)
        self._note_edit()

    def __delitem__(self, index):
        m = self._writable()
        if m is None:
            del self._initial[index]
            return
        if isinstance(index, slice):
            start, stop, step = index.indices(len(m))
            if self._ix is None and step == 1:
                if stop > start:
                    del m[start:stop]
            else:
                for i in sorted(range(start, stop, step), reverse=True):
                    self._delete(m, i)
        else:
            self._delete(m, _position(index, len(m)))
        self._note_edit()

    def _delete(self, m, i):
        if self._ix is None:
            return m.pop(i)
        return self._ix.delete(i)

    def insert(self, index, value):
        m = self._writable()
        if m is None:
            self._initial.insert(index, value)
            return
        n = len(m)
        index = _index(index)
        index = max(0, min(n, index + n if index < 0 else index))
        raw = self._encode(value)
        if self._ix is None:
            m.insert(index, raw)
        else:
            self._ix.insert(index, raw, value)
        self._note_edit()

    def append(self, value):
        m = self._writable()
        if m is None:
            self._initial.append(value)
            return
        raw = self._tx._encode(value)
        if self._ix is None:
            m.append(raw)
        else:
            self._ix.insert(len(m), raw, value)
        self._writes.append(_APPEND)

    def extend(self, values):
        if self._tx is None:
            self._initial.extend(values)
            return
        for v in list(values):
            self.append(v)

    def __iadd__(self, values):
        self.extend(values)
        return self

    def pop(self, index: int = -1) -> _T:
        m = self._writable()
        if m is None:
            return self._initial.pop(index)
        if not len(m):
            raise IndexError("pop from empty list")
        raw = self._delete(m, _position(index, len(m)))
        self._note_edit()
        return self._decode(raw)

    def __eq__(self, other):
        if isinstance(other, (List, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def _repr_body(self):
        return "[" + _repr_items(map(repr, self)) + "]"

    def _changed_rows(self, before, after):
        if self._ix is None:
            return
        order, label, ids, data = after.part("order"), after.part("label"), after.part("ids"), after.data
        for rid in self._ix.touched:
            yield rid, (data[order.bisect_left(label[rid])] if rid in ids else MISSING)

    def _merge(self, head, mine):
        if ALL in self._writes:
            self._conflict(None, "concurrent edits of one List (only appends merge)")
        # Only appends: they commute. Land ours after what the head already has.
        appended = range(len(mine) - self._writes.count(_APPEND), len(mine))
        m = head.data.mutate()
        if head.meta.get("rowids"):               # replay through the head's indexes
            ix, mine_ix = _IndexedList(head, m, self), self._ix
            for pos in appended:
                raw = mine[pos]
                rid = mine_ix.rowid_at(pos) if mine_ix is not None else None
                ix.insert(len(m), raw, self._decode(raw), rid)
            self._ix = ix                         # what the commit wrote, for the vector hook
            return ix.state()
        for pos in appended:
            m.append(mine[pos])
        return head.replace(data=m.finish())


def _position(index, n):
    """A list index made absolute and checked, as list does it."""
    i = _index(index)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError("list index out of range")
    return i


def _index(i):
    try:
        return i.__index__()
    except AttributeError:
        raise TypeError(f"list indices must be integers or slices, not {type(i).__name__}") from None


def _slice(s, sl):
    start, stop, step = sl.indices(len(s))
    if step == 1:
        return s[start:stop] if stop > start else ()
    return [s[i] for i in range(start, stop, step)]
