"""The committed state of a database and how it is written to and read from storage.

A database state is one immutable object, `State`: a hash trie from collection id to
`CollState`, plus the next free collection id. A `CollState` names a collection's kind and
holds its *parts*: persistent structures from `_core` (the main one is ``"data"``; indexes
add more). Taking a snapshot is taking a reference to a `State` (O(1)); a commit builds a
new `State` that shares every untouched collection and node with the old one.

On disk a state is a tree of atoms (DESIGN.md "Storage"):

    footer.root_ptr -> [FORMAT, colls_ptr, next_coll_id]            (state header atom)
    colls (hamt.Map): coll id -> CollState, encoded inline as ext 64:
                      [kind, meta, {part name: [part type, ptr]}]
    each part: that structure's own header atom and nodes, loaded lazily

`StoreIO` is the atom I/O object the kernels persist through (docs/internals.md).
"""
import gc
import threading

from ._core import load as _load_core
from .errors import CorruptionError

codec = _load_core("codec")
hamt = _load_core("hamt")
pvec = _load_core("pvec")
btree = _load_core("btree")
idset = _load_core("idset")

__all__ = ["FORMAT", "CollState", "State", "StoreIO", "MISSING", "copy_part", "copy_collection",
           "gc_paused"]

FORMAT = 1
EXT_COLLSTATE = 64
EXT_IDSET = 65

MISSING = object()


class _GCPause:
    """``with gc_paused:`` pauses Python's cyclic garbage collector around a bulk build.

    Building an index over every row, or encoding a large commit, allocates a burst of
    container objects that all survive. Each burst triggers collections that traverse the
    old generation too, i.e. the whole heap, and on a heap of a few million objects those
    cost several times the build itself. Nothing built in such a block is garbage, so the
    collector has nothing to find there. Pauses nest and may overlap between threads: the
    first one in notes whether the collector was on, the last one out restores that."""

    __slots__ = ("_lock", "_depth", "_was_enabled")

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._was_enabled = False

    def __enter__(self):
        with self._lock:
            if not self._depth:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._depth += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if not self._depth and self._was_enabled:
                gc.enable()


gc_paused = _GCPause()

# part type tag -> structure class; an IdSet is stored as one atom of its own bytes.
_PART_TYPES = {"map": hamt.Map, "hset": hamt.HashSet, "vec": pvec.Vector,
               "smap": btree.SortedMap, "ids": idset.IdSet}
_PART_TAGS = {cls: tag for tag, cls in _PART_TYPES.items()}
_IdSet = idset.IdSet
_idset_from_bytes = _IdSet.from_bytes
_EMPTY = {"dict": hamt.Map, "set": hamt.HashSet, "list": pvec.Vector, "sorted": btree.SortedMap}
# What a descriptor must name, part by part (name -> part type tag), for its kind and meta:
# every reader takes these parts as present and of their type.
_DATA_TAG = {"dict": "map", "set": "hset", "list": "vec", "sorted": "smap"}
_ROW_PARTS = {"dict": {"rowid": "map", "keyof": "map", "ids": "ids"},
              "sorted": {"rowid": "map", "keyof": "map", "ids": "ids"},
              "list": {"order": "smap", "label": "map", "ids": "ids"}}
_INDEX_PART_TAGS = {"tree": "smap", "other": "ids", "missing": "ids"}


def _persist_part(struct, io):
    tag = _PART_TAGS[type(struct)]
    ptr = io.write_atom(struct.to_bytes()) if tag == "ids" else struct._persist(io)
    return [tag, ptr]


def _load_part(tag, ptr, io):
    cls = _PART_TYPES.get(tag)
    if cls is None:
        raise CorruptionError(f"unknown collection part type {tag!r}", offset=ptr)
    if tag == "ids":
        try:
            return idset.IdSet.from_bytes(io.read_atom(ptr))
        except ValueError as exc:
            raise CorruptionError(f"damaged id set at offset {ptr}: {exc}", offset=ptr) from exc
    return cls._load(ptr, io)


class CollState:
    """One collection as of one state: kind, small metadata and its structures (parts).

    Frozen once created; parts stored on disk load on first use."""

    __slots__ = ("kind", "meta", "_parts", "_ptrs", "_io", "_enc")

    def __init__(self, kind, parts, meta=None):
        self.kind = kind
        self.meta = meta or {}
        self._parts = dict(parts)
        self._ptrs = {}
        self._io = None
        self._enc = None     # the encoded descriptor, once every part is stored

    @classmethod
    def new(cls, kind):
        return cls(kind, {"data": _EMPTY[kind]()})

    def part(self, name, default=None):
        s = self._parts.get(name)
        if s is None:
            ref = self._ptrs.get(name)
            if ref is None:
                return default
            s = self._parts[name] = _load_part(ref[0], ref[1], self._io)
        return s

    @property
    def data(self):
        s = self._parts.get("data")
        return s if s is not None else self.part("data")

    def part_names(self):
        return set(self._parts) | set(self._ptrs)

    def replace(self, meta=None, **parts):
        """A new CollState with some parts replaced (a part set to None is removed).

        Parts not named keep what this one has: loaded structures stay loaded, stored
        ones keep their pointers (nothing is loaded or written again for them)."""
        new = CollState.__new__(CollState)
        new.kind = self.kind
        new.meta = self.meta if meta is None else (meta or {})
        kept, ptrs = dict(self._parts), dict(self._ptrs)
        for n, s in parts.items():
            ptrs.pop(n, None)
            if s is None:
                kept.pop(n, None)
            else:
                kept[n] = s
        new._parts = kept
        new._ptrs = ptrs
        new._io = self._io
        new._enc = None
        return new

    # -- persistence ---------------------------------------------------------------

    def _descriptor(self, io):
        for name, s in self._parts.items():
            if name not in self._ptrs:
                self._ptrs[name] = _persist_part(s, io)
        return [self.kind, self.meta, self._ptrs]

    def _encoded(self, io):
        """The descriptor's bytes. Every commit rewrites the node of the collections table
        that holds its collection, with the descriptors of its untouched neighbours: those
        are encoded once, when their parts were first stored, and reused from then on."""
        enc = self._enc
        if enc is None:
            enc = self._enc = codec.dumps(self._descriptor(io))
        return enc

    @classmethod
    def _from_descriptor(cls, data, io):
        """The CollState stored as ``data`` (its descriptor's bytes)."""
        desc = codec.loads(data)
        try:
            kind, meta, ptrs = desc
            if kind not in _EMPTY or not isinstance(meta, dict) or not isinstance(ptrs, dict):
                raise ValueError(kind)
            cs = cls(kind, {}, meta)
            cs._ptrs = {str(n): (str(r[0]), int(r[1])) for n, r in ptrs.items()}
            _check_descriptor(kind, meta, cs._ptrs)
        except (TypeError, ValueError, IndexError) as exc:
            raise CorruptionError(f"damaged collection descriptor ({exc}): {desc!r:.80}") from exc
        cs._io = io
        cs._enc = data
        return cs


def _check_descriptor(kind, meta, ptrs):
    """ValueError unless ``meta`` is well formed and ``ptrs`` names every part the kind and
    meta need, each of its type (a checksum-valid forged descriptor stops here, not as an
    AttributeError deep in a read)."""
    need = {"data": _DATA_TAG[kind]}
    rowids = meta.get("rowids", False)
    indexes = meta.get("indexes", [])
    vectors = meta.get("vectors", {})
    if rowids is not True and rowids is not False:
        raise ValueError(f"rowids is {rowids!r}")
    if not isinstance(indexes, list) or not all(type(f) is str and f for f in indexes):
        raise ValueError("bad index list")
    if not isinstance(vectors, dict) or not all(type(f) is str and isinstance(v, dict)
                                                for f, v in vectors.items()):
        raise ValueError("bad vector index settings")
    next_rowid = meta.get("next_rowid", 0)
    if type(next_rowid) is not int or next_rowid < 0:
        raise ValueError(f"next_rowid is {next_rowid!r}")
    if rowids:
        if kind not in _ROW_PARTS:
            raise ValueError(f"a {kind} has no row ids")
        need.update(_ROW_PARTS[kind])
    elif indexes or vectors:
        raise ValueError("indexes without row ids")
    for field in indexes:
        for name, tag in _INDEX_PART_TAGS.items():
            need[f"ix/{field}/{name}"] = tag
    for name, tag in need.items():
        ref = ptrs.get(name)
        if ref is None:
            raise ValueError(f"the {kind} has no {name!r} part")
        if ref[0] != tag:
            raise ValueError(f"part {name!r} is a {ref[0]!r}, not a {tag!r}")


class State:
    """An immutable database state: collection id -> CollState, plus the next free id."""

    __slots__ = ("colls", "next_coll_id", "seq", "ptr")

    def __init__(self, colls, next_coll_id, seq=0, ptr=-1):
        self.colls = colls
        self.next_coll_id = next_coll_id
        self.seq = seq
        self.ptr = ptr

    @classmethod
    def initial(cls):
        """An empty database: just the root Dict, collection 0."""
        return cls(hamt.Map({0: CollState.new("dict")}), 1)

    def persist(self, io, bulk=True):
        """Write every node not stored yet and the state header; returns the header's
        pointer. ``bulk``: pause the cyclic collector meanwhile (see _GCPause); a small
        commit allocates too little to set it off, so there the pause is pure cost."""
        if bulk:
            with gc_paused:
                colls_ptr = self.colls._persist(io)
        else:
            colls_ptr = self.colls._persist(io)
        self.ptr = io.write_atom(io.encode([FORMAT, colls_ptr, self.next_coll_id, self.seq]))
        return self.ptr

    @classmethod
    def load(cls, ptr, io):
        """The state whose header atom is at ptr. Its sequence number is the database's own
        commit counter, kept in the header, so it keeps rising across compactions (which
        start a new file whose storage sequence starts again)."""
        try:
            fmt, colls_ptr, next_id, seq = io.decode(io.read_atom(ptr))
        except (TypeError, ValueError) as exc:
            raise CorruptionError(f"damaged state header at offset {ptr}", offset=ptr) from exc
        if fmt != FORMAT:
            raise CorruptionError(f"unsupported state format {fmt!r} at offset {ptr}; "
                                  f"this ProtoBase reads format {FORMAT}", offset=ptr)
        return cls(hamt.Map._load(colls_ptr, io), next_id, seq, ptr)


def copy_part(struct):
    """A fresh copy of a structure: same contents, new unwritten nodes (for compaction and
    backup, which write live data into a new file)."""
    if type(struct) is idset.IdSet:
        return struct
    if type(struct) is pvec.Vector:
        return pvec.Vector(struct)
    m = type(struct)().mutate()
    if type(struct) is hamt.HashSet:
        for x in struct:
            m.add(x)
    else:
        for k, v in struct.items():
            m[k] = v
    return m.finish()


def copy_collection(cs):
    return CollState(cs.kind, {n: copy_part(cs.part(n)) for n in cs.part_names()}, cs.meta)


class StoreIO:
    """Atom I/O for the kernels (docs/internals.md): reads from the store, writes into the
    commit being built, and encodes node contents with the codec plus our ext types.

    The kernels call these once per node, so each is bound straight to its C function
    (no Python frame in between): ``write_atom`` follows ``commit``, ``encode`` and
    ``decode`` are the methods of a codec Encoder/Decoder holding our hooks (no keyword
    handling per node; id sets are encoded through codec.ExtDefault, with no Python
    frame either)."""

    __slots__ = ("store", "_commit", "write_atom", "read_atom", "encode", "decode")

    def __init__(self, store, trust=None):
        self.store = store
        self.read_atom = store.read_atom
        # Id sets (one per posting of an index leaf) are written by the codec in C; only
        # collection descriptors reach the Python hook.
        self.encode = codec.Encoder(default=codec.ExtDefault(
            _IdSet, EXT_IDSET, _IdSet.to_bytes, self._default)).encode
        # Keys in nodes may be Enum members: decoded with the database's trusted modules.
        self.decode = codec.Decoder(ext_hook=self._ext_hook, trust=trust).decode
        self.commit = None

    @property
    def commit(self):
        """The store commit that write_atom appends to (None outside a commit)."""
        return self._commit

    @commit.setter
    def commit(self, c):
        self._commit = c
        self.write_atom = c.write_atom if c is not None else _no_commit

    def _default(self, obj):
        if type(obj) is CollState:     # every collection in a rewritten table node
            return EXT_COLLSTATE, obj._encoded(self)
        return None

    def _ext_hook(self, code, data):
        if code == EXT_IDSET:          # dozens per index leaf: the common case first
            return _idset_from_bytes(data)
        if code == EXT_COLLSTATE:
            return CollState._from_descriptor(data, self)
        raise CorruptionError(f"unknown extension type {code} in a stored node")


def _no_commit(data):
    raise RuntimeError("no commit is being built: atoms are written only inside one")
