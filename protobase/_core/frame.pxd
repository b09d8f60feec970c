# C-level interface of the atom framing kernel (see the essay at the top of frame.pyx).

cdef enum:
    ATOM_PREFIX = 8      # u32 length + u32 crc32 before each atom
    HEADER_BYTES = 32    # the smallest file header (format 1; storage/log.py): no atom starts below it


cdef class AtomBatch:
    cdef readonly list datas        # the atoms' bytes, in order
    cdef readonly list ptrs         # their pointers (strictly increasing)
    cdef readonly Py_ssize_t start  # pointer of the first atom
    cdef readonly Py_ssize_t pos    # pointer of the next atom
    cdef readonly Py_ssize_t payload  # sum of the atoms' lengths
    cdef readonly bint closed

    cpdef Py_ssize_t append(self, data) except -1
