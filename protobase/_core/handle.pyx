# cython: language_level=3
"""Collection handles: their fields as C slots, and a map's get/set/delete in C.

Why this module exists
----------------------
A read or write through a ``Dict`` handle does little real work: a hamt lookup or a
transient insert (C), and a codec call (C). Written in Python, the method around them
was a third of the cost: a frame, and a dozen attribute loads of the handle's slots.
Here the handle's fields are C members of ``HandleCore`` and the three subscript methods
of a map are C functions in the type's own slots (``mp_subscript``,
``mp_ass_subscript``), so ``d[k]`` and ``d[k] = v`` reach the structure with no Python
frame at all::

    d[k] = v
      |  mp_ass_subscript (C)
      v
    MapCore.__setitem__ --- tx open, already written? --no--> handle._writable() (Python)
      |  yes
      v
    raw = tx._encode(v)                      codec.Encoder.encode (C)
    ix is None ? mut[k] = raw                hamt transient insert (C)
               : ix.put(k, raw, v)           indexed map: row ids, indexes (Python)
    writes.append(k)

Everything not on that path (the first write of a transaction, free-standing
collections, indexed maps, errors) calls the Python methods of the handle class, which
live in ``protobase/collections.py`` with the rest of the semantics; this module imports
nothing from the package.

Layout and invariants
---------------------
``HandleCore`` holds the fields of every handle (documented where they are set, in
``collections._Collection``): ``_tx`` (the transaction, None while free-standing),
``_cid``, ``_base`` (the snapshot's CollState or None), ``_mut`` (the transient once
written, else None), ``_writes``, ``_reads`` (a set in serializable transactions, else
None), ``_initial`` (the contents of a free-standing collection), ``_ix`` and
``_schema``; the Python layer reads and writes them all as attributes.

Five more are C-only caches, each kept with what it was read from and used only while
that is still the handle's: ``snap`` (``_base.data``, the snapshot's structure: a Python
property, read once per ``_base``) and ``dec``/``enc`` (the transaction's
``_decode``/``_encode``, read once per ``_tx``). The codec methods are used only after the
transaction was seen open: a closed transaction swaps its methods for ones that raise,
and the open check comes first on every path.
``MapCore`` adds no fields, only the slots, so a Python class may inherit from both
``collections._Collection`` (a ``HandleCore``) and ``MapCore``: their layouts are the same.

``get`` and ``__contains__`` are here too (C methods, no Python frame). A subclass must
not define any of the five in Python: for the subscripts that would put Python's generic
slot wrapper back in front of these.

Complexity: one hamt lookup or insert, O(log32 n); the Python calls are the codec's.
"""
cimport cython

cdef extern from *:
    const char *PB_SOURCE_DIGEST
__source_digest__ = PB_SOURCE_DIGEST.decode("ascii")


cdef class HandleCore:
    """The fields of a collection handle (see collections._Collection)."""

    cdef public object _tx, _cid, _base, _mut, _writes, _reads, _initial, _ix, _schema
    cdef object __weakref__
    # C-only caches, each with what it was read from (compared by identity on use):
    cdef object snap, snap_of          # _base.data (a Python property) of _base snap_of
    cdef object dec, enc, codec_of     # _decode/_encode of the transaction codec_of



cdef object _ABSENT = object()     # get()'s marker for a key the structure lacks


# Module functions, not cdef methods: a vtable would change the types' tp_new, and
# Python's own classes deriving from them are created through object.__new__ checks.
cdef inline object _snapshot(HandleCore h):
    base = h._base
    if h.snap_of is not base:
        h.snap = base.data
        h.snap_of = base
    return h.snap


cdef inline int _codec(HandleCore h, tx) except -1:
    if h.codec_of is not tx:
        h.dec = tx._decode
        h.enc = tx._encode
        h.codec_of = tx
    return 0


cdef class MapCore(HandleCore):
    """A map handle's subscripts in C (Dict, SortedDict)."""

    def __getitem__(self, key):
        tx = self._tx
        if tx is None:
            return self._initial[key]
        if tx._closed:
            self._struct()                       # raises TransactionClosedError
        data = self._mut
        if data is None:
            data = _snapshot(self)
        reads = self._reads
        try:
            raw = data[key]
        except KeyError:
            if reads is not None:
                reads.add(key)                   # an absent key is a read too (serializable)
            raise
        if reads is not None:                    # after the lookup: a refused key is no read
            reads.add(key)
        _codec(self, tx)                         # the transaction is open: checked above
        return self.dec(raw)

    def __setitem__(self, key, value):
        m = self._mut
        tx = self._tx
        if m is None or tx._closed:              # first write, free-standing, or ended
            m = self._writable()
            if m is None:
                self._initial[key] = value
                return
            tx = self._tx
        _codec(self, tx)                         # the transaction is open: checked above
        raw = self.enc(value)
        ix = self._ix
        if ix is None:
            m[key] = raw
        else:
            ix.put(key, raw, value)
        self._writes.append(key)

    def __delitem__(self, key):
        self._delete(key)

    def get(self, key, default=None):
        tx = self._tx
        if tx is None:
            return self._initial.get(key, default)
        if tx._closed:
            self._struct()                       # raises TransactionClosedError
        data = self._mut
        if data is None:
            data = _snapshot(self)
        raw = data.get(key, _ABSENT)
        reads = self._reads
        if reads is not None:
            reads.add(key)
        if raw is _ABSENT:
            return default
        _codec(self, tx)
        return self.dec(raw)

    def __contains__(self, key):
        tx = self._tx
        if tx is None:
            return key in self._initial
        if tx._closed:
            self._struct()                       # raises TransactionClosedError
        data = self._mut
        if data is None:
            data = _snapshot(self)
        found = key in data
        reads = self._reads
        if reads is not None:                    # after the lookup: a refused key is no read
            reads.add(key)
        return found
