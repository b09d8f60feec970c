# C-level interface of idset.pyx: sets of int64 row ids in Roaring-style containers.
# The essay at the top of idset.pyx describes the layout and its invariants.
from libc.stdint cimport int32_t, int64_t, uint16_t, uint64_t


cdef class _Cont:
    # One container: the ids whose high bits equal `key`, low 16 bits stored either as a
    # sorted array (`arr`, card <= 4096) or as a 1024-word bitmap (`words`, card > 4096).
    cdef int64_t key
    cdef int32_t card
    cdef int32_t cap           # slots allocated in `arr` (array containers only)
    cdef uint16_t *arr
    cdef uint64_t *words
    cdef object owner          # mutation token allowed to edit in place; None when frozen


cdef class IdSet:
    cdef list conts            # _Cont objects in ascending key order, none empty
    cdef int64_t count         # total number of ids (sum of the containers' cards)
    cdef Py_hash_t hash_cache  # -1 until first hashed


cdef class IdSetMutation:
    cdef list conts
    cdef int64_t count
    cdef object token          # containers whose owner is this token are edited in place
    cdef _Cont _own(self, Py_ssize_t idx)
