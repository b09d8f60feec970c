# C-level interface of the persistent hash trie (see hamt.pyx for the layout and invariants).
from libc.stdint cimport uint32_t, uint64_t, int64_t
from cpython.ref cimport PyObject

cimport cython


@cython.final
cdef class Node:
    # A variable-size object: the slot array and then the entry hashes follow the struct in
    # the same allocation, so a node is one block (one memory miss per level, not two).
    # `cap` sits where PyVarObject keeps ob_size, which the allocator sets to the capacity.
    cdef Py_ssize_t cap            # allocated slots (ob_size)
    cdef uint32_t datamap          # bit b set: an inline entry for 5-bit chunk b
    cdef uint32_t nodemap          # bit b set: a child node for chunk b
    cdef bint collision
    cdef Py_ssize_t n              # used slots: 2 * entries + children
    cdef PyObject **slots          # the trailing array: [k0, v0, k1, v1, ..., child0, ...]
    cdef uint64_t *hashes          # after the slots: hashes[e] = stable hash of entry e's key
    cdef Py_ssize_t hcap           # room in hashes (entries)
    cdef uint64_t chash            # collision nodes: the hash every key shares
    cdef int64_t ptr               # atom pointer once persisted, else -1
    cdef object owner              # token of the mutation allowed to edit in place, or None


@cython.final
cdef class _Loader:
    cdef object io
    cdef bint is_set


cdef class _TrieBase:
    cdef Node root                 # None until a lazily loaded root is first touched
    cdef Py_ssize_t count
    cdef _Loader loader
    cdef bint atomic               # no key or value is GC-tracked: its new nodes stay untracked


cdef class _Persistent(_TrieBase):
    cdef int64_t root_ptr          # the root's atom while root is None (a loaded structure)
    cdef int64_t header_ptr        # the header atom once persisted, else -1


cdef class _Transient(_TrieBase):
    cdef object token              # owner token of the nodes this mutation edits in place


cdef class Map(_Persistent):
    pass


cdef class MapMutation(_Transient):
    pass


cdef class HashSet(_Persistent):
    pass


cdef class HashSetMutation(_Transient):
    pass


cdef uint64_t stable_hash_c(object key) except? 0xFFFFFFFFFFFFFFFF
cdef bint key_eq(object a, object b) except -1
