# C-level interface of the persistent B+tree (see btree.pyx for the essay).

cdef enum:
    WIDTH = 64           # most keys in a leaf, most children in an inner node
    MIN_FILL = 32        # fewest in any node but the root (WIDTH // 2)
    BULK_FILL = 48       # what a bulk build (SortedMap.from_sorted) aims for per node
    MAX_DEPTH = 48       # far beyond any reachable height; bounds the iterator's path


cdef class _Node:
    cdef list keys       # leaf: the keys; inner: the separators (len(kids) - 1 of them)
    cdef object owner    # the mutation token that may edit this node in place, or None
    cdef Py_ssize_t ptr  # atom pointer once persisted, else -1
    cdef signed char ikstate        # int64 shadow of keys: 0 stale, 1 valid, 2 not all ints
    cdef Py_ssize_t ikn             # len(keys) when ikstate == 1
    cdef long long ik[WIDTH + 1]    # keys as C integers when ikstate == 1


cdef class _Leaf(_Node):
    cdef list vals


cdef class _Inner(_Node):
    cdef list kids                          # _Node, or int atom pointer not yet loaded
    cdef Py_ssize_t level                   # 1 when the children are leaves
    cdef Py_ssize_t counts[WIDTH + 1]       # entries under each child (+1: transient overflow)


cdef class _Base:
    cdef object root     # None (empty), a _Node, or an int pointer not yet loaded
    cdef Py_ssize_t root_level
    cdef Py_ssize_t count
    cdef object io
    cdef Py_ssize_t version

    cdef object _root(self)
    cdef tuple _span(self, object minimum, object maximum, object inclusive)


cdef class SortedMap(_Base):
    pass


cdef class SortedMapMutation(_Base):
    cdef object owner

    cdef _Node _owned_root(self)
    cdef object _remove(self, object key)


cpdef int compare(object a, object b) except? -2
cpdef int type_class(object x) except -1
