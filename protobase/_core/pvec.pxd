# C-level interface of the persistent vector (see the essay at the top of pvec.pyx).

cdef enum:
    LEAF_MAX = 64        # items in a leaf (and in the tail buffer)
    LEAF_MIN = 32        # items in a leaf that is not the root
    BRANCH_MAX = 64      # children of a branch
    BRANCH_MIN = 32      # children of a branch that is not the root


cdef class _Node:
    cdef object owner    # the token of the mutation allowed to edit it in place
    cdef Py_ssize_t ptr  # atom pointer once persisted, else -1


cdef class _Leaf(_Node):
    cdef list items


cdef class _Branch(_Node):
    cdef list children   # _Node, or an int atom pointer until first touched
    cdef Py_ssize_t n    # len(children)
    # cum[j]: items under children[0..j]; one spare slot for a transient overflow
    cdef Py_ssize_t cum[BRANCH_MAX + 1]


cdef class _VectorBase:
    cdef object _root        # _Node, or the int pointer of a not yet loaded root
    cdef int _height         # 0: the root is a leaf
    cdef Py_ssize_t _tcount  # items in the tree
    cdef object _tail        # _Leaf, or the int pointer of a not yet loaded tail
    cdef Py_ssize_t _tlen    # items in the tail
    cdef object _io

    cdef _Node _rootnode(self)
    cdef _Leaf _tailnode(self)
    cdef object _get(self, Py_ssize_t i)
    cdef int _set(self, Py_ssize_t i, object x, object tok) except -1
    cdef int _append(self, object x, object tok) except -1
    cdef int _insert(self, Py_ssize_t i, object x, object tok) except -1
    cdef object _delete(self, Py_ssize_t i, object tok)
    cdef int _push_leaf(self, _Leaf leaf, object tok) except -1
    cdef int _pull_tail(self, object tok) except -1
    cdef int _flush(self, object tok) except -1
    cdef int _join_with(self, _VectorBase other, object tok) except -1
    cdef int _keep_range(self, Py_ssize_t a, Py_ssize_t b, object tok) except -1
    cdef int _replace_range(self, Py_ssize_t a, Py_ssize_t b, list items, object tok) except -1


cdef class Vector(_VectorBase):
    cdef Vector _derive(self)


cdef class VectorMutation(_VectorBase):
    cdef object _token
    cdef Vector _snapshot(self)
