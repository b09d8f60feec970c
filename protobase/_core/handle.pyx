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
``_schema``; all are ``public`` so the Python layer reads and writes them as attributes.
``MapCore`` adds no fields, only the slots, so a Python class may inherit from both
``collections._Collection`` (a ``HandleCore``) and ``MapCore``: their layouts are the same.

A subclass must not define ``__getitem__``, ``__setitem__`` or ``__delitem__`` in Python:
that would put Python's generic slot wrapper back in front of these.

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


cdef class MapCore(HandleCore):
    """A map handle's subscripts in C (Dict, SortedDict)."""

    def __getitem__(self, key):
        tx = self._tx
        if tx is None:
            return self._initial[key]
        if tx._closed:
            self._struct()                       # raises TransactionClosedError
        m = self._mut
        reads = self._reads
        try:
            raw = (self._base.data if m is None else m)[key]
        except KeyError:
            if reads is not None:
                reads.add(key)                   # an absent key is a read too (serializable)
            raise
        if reads is not None:                    # after the lookup: a refused key is no read
            reads.add(key)
        return tx._decode(raw)

    def __setitem__(self, key, value):
        m = self._mut
        tx = self._tx
        if m is None or tx._closed:              # first write, free-standing, or ended
            m = self._writable()
            if m is None:
                self._initial[key] = value
                return
            tx = self._tx
        raw = tx._encode(value)
        ix = self._ix
        if ix is None:
            m[key] = raw
        else:
            ix.put(key, raw, value)
        self._writes.append(key)

    def __delitem__(self, key):
        self._delete(key)
