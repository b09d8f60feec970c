# cython: language_level=3
"""Atom framing for the storage log: the atoms of one commit, and their bytes on disk.

Why this module exists
----------------------
A commit is a run of atoms, each written behind an 8-byte prefix (storage/log.py)::

    pointer p                 p + 8              p + 8 + n
    |                         |                  |
    v                         v                  v
    +------------+------------+------------------+------------+-----------+-- ...
    | length n   | crc32      |  n bytes of data | length n'  | crc32'    |  data'
    | u32 LE     | u32 LE     |                  |            |           |
    +------------+------------+------------------+------------+-----------+-- ...
     crc32 = zlib.crc32(data, salt): the file's salt seeds every checksum

The kernels persist a structure by calling ``write_atom`` once per new node, so a bulk
load of 100k records makes tens of thousands of calls, and a one-key commit makes about
seven. In Python each call cost a frame plus two list appends, and framing the commit
cost a struct pack, a crc call and two join items per atom (about 1.5 us per atom on the
reference machine). Here ``append`` is a C method the kernels reach without a Python
frame, and ``frame`` writes every prefix and copies every atom into one preallocated
``bytes`` in a single pass: the per-atom cost is the crc of the data plus a memcpy.

Layout and invariants
---------------------
An ``AtomBatch`` holds two parallel lists, ``datas`` (the atoms' ``bytes``, in order)
and ``ptrs`` (their pointers), plus ``start`` (the pointer of the first atom) and ``pos``
(where the next atom goes). Always::

    ptrs[0] == start,  ptrs[i + 1] == ptrs[i] + 8 + len(datas[i]),  pos == end of last
    payload == sum(len(d) for d in datas)

so ``ptrs`` is strictly increasing and ``find`` is a binary search. Once ``close()`` is
called (the commit was finished or aborted) ``append`` and ``extend`` raise
TransactionClosedError; the lists stay readable, because a reader may still be looking
up an atom of a commit that another thread is finishing.

Complexity: ``append`` O(1) amortized; ``find`` O(log n); ``frame`` O(total bytes),
one allocation. Every atom is at most 2**32 - 1 bytes (its length is a u32).

Checksums are computed by ``zlib.crc32`` itself (one C call per atom), so the framing is
byte-identical to the pure Python writer's by construction.

Reading atoms back: AtomReader
------------------------------
Structures load lazily, one node per ``read_atom(ptr)``, and a query on a freshly opened
database touches a few nodes for the first time each (an index leaf, two hash trie
paths). Through Python each miss cost five frames (the store, the cache, the file, the
struct unpack, the cache insert): several microseconds a node, more than decoding it.
``AtomReader.read`` is the whole hot path as one C method the kernels call directly::

    read(ptr) --hit--> cache dict, reference bit set                  -> bytes
        |
        +--miss, real file, atom inside the part known fsynced (mapped read-only)
        |       prefix {n, crc} and n bytes copied from the mapping
        |       crc32(data, salt) == crc                                 -> bytes
        |
        +--miss, real file, ptr inside the written log
        |       one pread of up to 4 KiB (GIL released) -> prefix {n, crc}
        |       bytes of n: copy what came, pread the rest straight into it
        |       crc32(data, salt) == crc -> cache insert                -> bytes
        |
        +--anything else: the store's Python path (other file layers, pointers not yet
           written, a closed store, and every damaged atom, which it reads again and
           turns into the right CorruptionError / StorageError)

So there is one definition of what is valid (the Python path) and the C path only ever
returns atoms that pass the very same checks: inside the log, length within bounds,
checksum equal. Invariants: ``start`` is the size of the file's header (64 in format
version 2, 32 in version 1), below which no atom starts; ``limit`` never exceeds the end
of the data committed to the file (the store sets it on open and refresh; a writer's
``_written_end`` is read per miss), so a read never runs past what a footer covers;
``mapped <= durable``, the offset below which a footer says every byte was fsynced. A
healthy writer never cuts the file below that point (it cuts back only to its last
fsync), so no read of the mapping can fall past the end of the file (which would be
SIGBUS, not an exception). The mapping
grows in steps of at least REMAP_STEP as more becomes durable; mapped atoms skip the
bytes cache, since copying them out of the page cache costs no more than a hit. Copies
out of the mapping hold the GIL, so no other thread can unmap it (close, refresh,
remap) in the middle of one.

Finishing through an interrupt: complete
---------------------------------------
CPython runs a signal handler (the one raising KeyboardInterrupt, a SIGTERM handler
calling sys.exit) on the main thread at the next call boundary of Python code, so it can
land between any two calls of a Python ``finally`` or ``except`` block too: a cleanup
written in Python can be cut short after its first statement (a role never passed on, a
store never closed). ``complete(fn, *args)`` calls ``fn`` from C, where no handler runs:
when an interrupt (an exception that is not an ``Exception``) escapes ``fn``, it calls
``fn`` again, and raises the first interrupt only once ``fn`` has returned; an ordinary
exception propagates at once. So ``fn`` must be safe to restart from its top after being
cut anywhere (each step checks whether it is done). A ``fn`` that keeps raising an
interrupt by itself is given up after COMPLETE_TRIES calls, with that interrupt raised.

Why map at all: on the reference machine (a virtual machine, where system calls are
dear) a pread of one node cost 2-4 us and a copy out of the mapping 0.6 us, first
touch included; a cold query reads about five nodes.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t
from libc.string cimport memcpy
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from posix.types cimport off_t
from posix.unistd cimport pread

import mmap as _mmap

from zlib import crc32 as _crc32

from protobase.errors import TransactionClosedError

cdef extern from *:
    const char *PB_SOURCE_DIGEST
__source_digest__ = PB_SOURCE_DIGEST.decode("ascii")

__all__ = ["AtomBatch", "AtomReader", "frame_atoms", "complete", "PREFIX_SIZE", "MAX_ATOM",
           "COMPLETE_TRIES"]

PREFIX_SIZE = ATOM_PREFIX
MAX_ATOM = 0xFFFFFFFF


COMPLETE_TRIES = 1000


def complete(fn, *args):
    """fn(*args), called again while an interrupt escapes it; the first interrupt is
    raised once it has returned (see the essay: "Finishing through an interrupt")."""
    cdef object pending = None
    cdef int tries = 0
    while True:
        try:
            result = fn(*args)
            break
        except BaseException as exc:
            if isinstance(exc, Exception):
                raise
            if pending is None:
                pending = exc
            tries += 1
            if tries >= COMPLETE_TRIES:
                raise
    if pending is not None:
        raise pending
    return result


cdef inline void _put_u32(char *p, uint32_t v) noexcept:
    p[0] = <char>(v & 0xFF)
    p[1] = <char>((v >> 8) & 0xFF)
    p[2] = <char>((v >> 16) & 0xFF)
    p[3] = <char>((v >> 24) & 0xFF)


cdef bytes _frame(list datas, Py_ssize_t total, object salt):
    """datas' atoms, each behind its prefix, in one new bytes of ``total`` bytes."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char *p = PyBytes_AS_STRING(out)
    cdef char *end = p + total
    cdef Py_ssize_t n
    cdef uint32_t crc
    cdef bytes d
    for obj in datas:
        d = <bytes>obj
        n = PyBytes_GET_SIZE(d)
        if end - p < ATOM_PREFIX + n:
            raise ValueError("the atoms do not add up to the commit's size")
        crc = <uint32_t>_crc32(d, salt)
        _put_u32(p, <uint32_t>n)
        _put_u32(p + 4, crc)
        memcpy(p + ATOM_PREFIX, PyBytes_AS_STRING(d), n)
        p += ATOM_PREFIX + n
    if p != end:
        raise ValueError("the atoms do not add up to the commit's size")
    return out


def frame_atoms(datas, uint32_t salt):
    """The framed bytes of ``datas`` (a sequence of bytes): each behind its
    {u32 length, u32 crc32(data, salt)} prefix, little-endian."""
    cdef list lst = []
    cdef Py_ssize_t total = 0
    for d in datas:
        if type(d) is not bytes:
            d = bytes(memoryview(d))   # buffers only: bytes(12) would be 12 zeros
        if PyBytes_GET_SIZE(d) > MAX_ATOM:
            raise ValueError(f"an atom holds at most {MAX_ATOM} bytes")
        total += ATOM_PREFIX + PyBytes_GET_SIZE(d)
        lst.append(d)
    return _frame(lst, total, salt)


cdef class AtomBatch:
    """The atoms of one commit being built, with the pointers handed out for them."""

    def __cinit__(self, Py_ssize_t start):
        if start < 0:
            raise ValueError("an atom pointer is >= 0")
        self.datas = []
        self.ptrs = []
        self.start = self.pos = start
        self.payload = 0
        self.closed = False

    cpdef Py_ssize_t append(self, data) except -1:
        """Add one atom; returns its pointer."""
        if self.closed:
            raise TransactionClosedError("this commit was already finished or aborted")
        if type(data) is not bytes:
            data = bytes(memoryview(data))
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if n > MAX_ATOM:
            raise ValueError(f"an atom holds at most {MAX_ATOM} bytes, got {n}")
        cdef Py_ssize_t ptr = self.pos
        self.datas.append(data)
        self.ptrs.append(ptr)
        self.pos = ptr + ATOM_PREFIX + n
        self.payload += n
        return ptr

    def extend(self, datas):
        """Add many atoms; returns their pointers (as append on each, all or nothing)."""
        if self.closed:
            raise TransactionClosedError("this commit was already finished or aborted")
        cdef list new = []
        for d in datas:
            if type(d) is not bytes:
                d = bytes(memoryview(d))   # buffers only: bytes(12) would be 12 zeros
            if PyBytes_GET_SIZE(d) > MAX_ATOM:
                raise ValueError(f"an atom holds at most {MAX_ATOM} bytes")
            new.append(d)
        cdef list out = []
        for d in new:
            out.append(self.append(d))
        return out

    def find(self, Py_ssize_t ptr):
        """The bytes of the atom at ``ptr``, or None when no atom of this batch starts there."""
        cdef list ptrs = self.ptrs
        cdef Py_ssize_t lo = 0, hi = len(ptrs), mid, p
        while lo < hi:
            mid = (lo + hi) >> 1
            p = ptrs[mid]
            if p < ptr:
                lo = mid + 1
            elif p > ptr:
                hi = mid
            else:
                return self.datas[mid]
        return None

    def close(self):
        """No more atoms: append and extend raise TransactionClosedError from now on."""
        self.closed = True

    def frame(self, uint32_t salt):
        """Every atom behind its prefix, in order: the commit's bytes before its footer."""
        return _frame(self.datas, self.pos - self.start, salt)

    def __len__(self):
        return len(self.datas)


cdef enum:
    FIRST_READ = 4096     # one pread usually brings a whole node with its prefix
    REMAP_STEP = 1 << 20  # grow the mapping once at least this much more is durable


cdef inline uint32_t _get_u32(const unsigned char *p) noexcept:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef class AtomReader:
    """The read path of a log store in C (see the essay): ``read(ptr)`` returns the
    checked bytes of the atom at ``ptr``, from the cache or the file.

    ``cache`` is the store's AtomBytesCache, ``fd`` the file's descriptor (-1: not an OS
    file, every miss takes ``fallback``), ``fallback(ptr)`` the store's Python read path,
    ``stats`` the store's counters (``"reads"``: file reads, one per mapped atom and one
    per pread, as the Python path counts them),
    ``writer`` the store's writer or None, ``start`` the size of the file's header. The
    store keeps ``salt`` and ``start`` (None and the smallest header until the file
    has a header), ``limit`` and ``durable`` (read-only stores: the writer's are read
    live) and ``closed`` current."""

    cdef object cache
    cdef dict _d                  # the cache's entries and reference bits, reached through
    cdef set _ref                 # the C API (a lookup and a set add per hit)
    cdef long long[::1] _counts   # the cache's hit and miss counters, counted in place
    cdef object _lock
    cdef Py_ssize_t _overhead
    cdef object fallback
    cdef dict stats
    cdef object writer
    cdef int fd
    cdef object _map              # the mmap object behind _view, or None
    cdef Py_buffer _view
    cdef const unsigned char *_base
    cdef readonly Py_ssize_t mapped   # bytes [0, mapped) of the file are mapped
    cdef bint _no_map                 # the system refused a mapping: pread only
    cdef public object salt
    cdef public Py_ssize_t limit
    cdef public Py_ssize_t durable
    cdef public bint closed
    cdef public Py_ssize_t start      # the header's size: no atom starts below it

    def __cinit__(self, cache, int fd, salt, fallback, dict stats, writer, Py_ssize_t limit,
                  Py_ssize_t durable=0, Py_ssize_t start=HEADER_BYTES):
        self.cache = cache
        self._d = cache._d
        self._ref = cache._ref
        self._counts = cache._counts
        self._lock = cache._lock
        self._overhead = cache.ENTRY_OVERHEAD
        self.fd = fd
        self.salt = salt
        self.fallback = fallback
        self.stats = stats
        self.writer = writer
        self.limit = limit
        self.durable = durable
        self.closed = False
        self.start = start if start > HEADER_BYTES else HEADER_BYTES
        self._map = None
        self._base = NULL
        self.mapped = 0
        self._no_map = False

    def __dealloc__(self):
        if self._map is not None:
            PyBuffer_Release(&self._view)

    def unmap(self):
        """Drop the mapping (reads go through pread until it is made again)."""
        if self._map is not None:
            self._base = NULL
            self.mapped = 0
            PyBuffer_Release(&self._view)
            self._map = None

    cdef int _remap(self, Py_ssize_t end) except -1:
        # Map [0, end): only bytes a footer says were fsynced, which no healthy writer
        # ever cuts back, so no read of the mapping can fall past the end of the file.
        # If the system refuses the mapping, reads simply stay on pread.
        try:
            m = _mmap.mmap(self.fd, end, access=_mmap.ACCESS_READ)
        except (OSError, ValueError, OverflowError):
            self._no_map = True
            return 0
        self.unmap()
        PyObject_GetBuffer(m, &self._view, PyBUF_SIMPLE)
        self._map = m
        self._base = <const unsigned char *>self._view.buf
        self.mapped = end
        return 0

    def read(self, ptr):
        """The bytes of the atom at ``ptr``; CorruptionError(offset=ptr) if they fail their
        checksum or ``ptr`` is not inside the committed log."""
        cdef Py_ssize_t p, limit, want, got, n, have, more, durable, reads = 1
        cdef unsigned char buf[FIRST_READ]
        cdef bytes data
        cdef char *out
        cdef uint32_t crc
        hit = self._d.get(ptr)
        if hit is not None:
            self._ref.add(ptr)
            self._counts[0] += 1
            return hit
        self._counts[1] += 1
        if self.fd < 0 or self.closed or self.salt is None or type(ptr) is not int:
            return self.fallback(ptr)
        try:
            p = ptr
        except OverflowError:              # far outside any file: the slow path says so
            return self.fallback(ptr)
        limit = self.limit if self.writer is None else self.writer._written_end
        if p < self.start or p + ATOM_PREFIX > limit:
            return self.fallback(ptr)      # not yet written, or outside the log
        if p + ATOM_PREFIX > self.mapped and not self._no_map:
            durable = self.durable if self.writer is None else self.writer._synced_end
            if durable > limit:
                durable = limit
            if p + ATOM_PREFIX <= durable and (self.mapped == 0
                                               or durable - self.mapped >= REMAP_STEP):
                self._remap(durable)
        if p + ATOM_PREFIX <= self.mapped:
            n = _get_u32(self._base + p)
            crc = _get_u32(self._base + p + 4)
            if p + ATOM_PREFIX + n > self.mapped:
                return self.fallback(ptr)  # runs past the durable part: the slow path decides
            data = PyBytes_FromStringAndSize(<const char *>self._base + p + ATOM_PREFIX, n)
        else:
            want = limit - p
            if want > FIRST_READ:
                want = FIRST_READ
            with nogil:
                got = pread(self.fd, buf, <size_t>want, <off_t>p)
            if got < ATOM_PREFIX:
                return self.fallback(ptr)  # an I/O error or a short file: the slow path explains
            n = _get_u32(buf)
            crc = _get_u32(buf + 4)
            if p + ATOM_PREFIX + n > limit:
                return self.fallback(ptr)
            data = PyBytes_FromStringAndSize(NULL, n)
            out = PyBytes_AS_STRING(data)
            have = got - ATOM_PREFIX
            if have >= n:
                memcpy(out, buf + ATOM_PREFIX, n)
            else:
                memcpy(out, buf + ATOM_PREFIX, have)
                with nogil:
                    more = pread(self.fd, out + have, <size_t>(n - have), <off_t>(p + got))
                if more != n - have:
                    return self.fallback(ptr)
                reads = 2
        if <uint32_t>_crc32(data, self.salt) != crc:
            return self.fallback(ptr)
        self.stats["reads"] += reads
        if p + ATOM_PREFIX > self.mapped:
            # A pread costs a system call: keep the bytes. A mapped atom is a copy from
            # the OS page cache, no dearer than a hit, so it stays out of the cache.
            self._put(ptr, data, n)
        return data

    cdef int _put(self, ptr, bytes data, Py_ssize_t n) except -1:
        # AtomBytesCache.put without its Python frame: the same steps under the same lock,
        # so the cache's byte count stays exact whichever path inserted an entry.
        cdef Py_ssize_t cost = n + self._overhead
        cache = self.cache
        self._lock.acquire()
        try:
            old = self._d.pop(ptr, None)
            if old is not None:
                self._ref.discard(ptr)
                cache.bytes -= len(old) + self._overhead
            if cost > cache.max_bytes:
                return 0
            self._d[ptr] = data
            cache.bytes += cost
            if cache.bytes > cache.max_bytes:
                cache._evict()
        finally:
            self._lock.release()
        return 0
