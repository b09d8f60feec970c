"""Persistent hash array mapped trie: `Map`/`MapMutation` and `HashSet`/`HashSetMutation`.

Why a HAMT
----------
ProtoBase's `Dict` and `Set` must be snapshots: a transaction starts by taking the current
root in O(1), and a commit must not disturb readers of older versions. A hash trie gives
that with path copying: changing one key copies only the nodes on the path from the root to
that key (about log32(n) nodes, 4 for a million keys), while every other node is shared by
the old and the new version. Lookups walk the same short path, reading 5 bits of the key's
hash per level, so a 1M-key map is four pointer hops from any key.

Hashing
-------
The trie is persisted, so it cannot use `hash()` (randomized per process for str/bytes).
`stable_hash(key)` is a signed 64-bit hash fixed across processes and runs:

  numbers (bool, int, float, Decimal, Fraction)   Python's numeric hash (deterministic,
                                                  so 1, 1.0, True, Decimal(1) collide and
                                                  then compare equal); every NaN -> NAN_HASH
  str / bytes                                     seeded 64-bit multiply-fold hash of the
                                                  UTF-8 / raw bytes (different seeds)
  tuple / frozenset                               element hashes combined, order-sensitive /
                                                  order-insensitive
  date, datetime, time, timedelta, UUID, Enum     a seeded combination of canonical integer
                                                  fields (aware datetimes by UTC instant)

Anything else is a SerializationError (a TypeError) naming the type and the allowed key
types, raised before the structure is touched; so is a signaling NaN (`Decimal('sNaN')`,
which `dict` refuses too: it cannot be hashed). Keys compare as in `dict` (identity, then
==), except that all NaNs are one key: a NaN must find itself again after a round trip
through the file, where identity is lost.

Node layout (CHAMP)
-------------------
A bitmap node keeps two 32-bit maps, one array of slots and one array of entry hashes. The
inline entries come first in chunk order, the child nodes after them, also in chunk order;
hashes[i] is the full 64-bit stable hash of entry i's key:

    datamap = 0b...0100_0010      nodemap = 0b...1000_0000
                    |     |                      |
    slots:  [ k1, v1, k6, v6 | child7 ]          (chunk 1, chunk 6 inline; chunk 7 a node)
              entry i at 2*i      child j at 2*popcount(datamap) + j
    hashes: [ h(k1), h(k6) ]                     (one per entry; children have none)

    root (shift 0) ──chunk 7──> node (shift 5) ──chunk 19──> node (shift 10) ...
                                   └─> collision node: [k, v, k', v'] (same 64-bit hash)

The index of chunk b is popcount(map & ((1 << b) - 1)), so a node holds exactly the slots
it uses. Keys whose whole 64-bit hashes are equal share a collision node (a flat list of
pairs, compared with ==; every entry's stored hash is that hash). A set stores None in
every value slot.

Why store the hashes: a key stored inline is otherwise only reachable through its object, so
splitting a slot into a sub-node (the common step while a map grows) had to re-read the old
key and rehash it, one more memory miss and a hash computation per split; and telling a
different key apart needed `==` on it. With the hash beside the slot, a split reads nothing
outside the node, and a lookup or delete compares hashes first and only calls `==` when the
64-bit hashes agree (for a hit, or a true collision). The hashes are memory only: the file
format does not hold them, `_load` recomputes them (it hashes every key anyway to validate
placement), and `_check()` verifies each one against its key.

A node is one variable-size object: the slot array, then the hash array, follow the header
in the same block (Node gets a tp_itemsize and its own tp_alloc), so descending a level costs
one memory miss (header and slots are adjacent, and the lookup prefetches a node's first
lines as soon as it has the pointer), not a miss for the object and another for a separate
array. The hashes start right after slot `cap`, with room for `hcap` of them:

    [ header: cap, hcap, maps, n, ..., owner | slot 0 .. cap-1 | hash 0 .. hcap-1 ]

A node a mutation owns may fill its free slots with entries, so it gets hcap = (cap+1)/2
(at least its entries plus half its free slots). A frozen node is never edited, so a
persistent update or a load sizes it exactly (hcap = its entries): a frozen node of 32
children carries no hash room at all (344 bytes, within the 512-byte small-object limit of
CPython's allocator).

The allocator zeroes only the header: nothing reads a slot at or past `n` or a hash past the
node's entries, and the slots below `n` are either copied in or zeroed for the caller to fill,
so a copy is one memcpy of the used slots (plus a loop of increfs) and one of the used
hashes. Cycles through values are visible to the garbage collector through a hand-written
tp_traverse/tp_clear; tp_dealloc is hand-written too (it only drops the slot references,
with no exception save/restore around it).

Garbage collection: a trie is *atomic* while none of its keys or values is tracked by the
cycle collector (str, int, bytes, float... the database stores only such keys and encoded
bytes). No reference cycle can pass through an atomic trie's nodes, so the nodes its
operations allocate are left untracked: building 100k entries then costs the collector
nothing (it halved the write path of a transaction). The first tracked key or value
makes a mutation non-atomic and tracks its whole tree once; a persistent `set` with one
tracks only the new path (the shared rest holds nothing tracked); a structure loaded from
disk is never atomic, and of its nodes only leaves holding nothing tracked are left
untracked (loaded nodes are never edited in place). `_check()` verifies that no tracked
key or value sits below an untracked node.

Invariants (checked by `_check()`)
---------------------------------
- datamap & nodemap == 0; n == 2*popcount(datamap) + popcount(nodemap).
- Every key sits where its hash sends it: the bits below `shift` equal the node's path
  prefix and the chunk at `shift` is the key's bit in datamap. Bitmap nodes exist only at
  shift <= 60 (the last chunk has 4 bits); collision nodes hold >= 2 keys of one hash.
- Canonical form: a non-root bitmap node holds >= 2 entries/children, or exactly one child
  that is itself a bitmap node (a run of equal chunks). A single remaining entry is pulled
  up into its parent and a lone collision child replaces its parent on deletion. So the
  shape depends only on the set of keys (and, inside a collision node, their order), never
  on the history of edits: the same keys give the same trie in every process.
- hashes[i] == stable_hash(key of entry i) for every entry of every node; n <= cap and
  entries <= hcap, and a node a live mutation owns has hash room for an entry in every two
  free slots (so in-place inserts never run out of it).
- Ownership: a node whose `owner` is a live mutation's token is reachable only through
  nodes with that owner and has never been persisted (`ptr == -1`). A persisted node is
  frozen (owner None) and never edited again; it only references persisted children.

Transients
----------
A mutation carries a token (a fresh object). Editing a node it owns happens in place;
editing any other node first copies it (path copying) and the copy is owned by the token, so
a batch of k edits copies each shared node at most once: building 100k keys costs a small
multiple (under 3x) of 100k dict inserts. Owned nodes keep spare capacity; when one is full
it moves its references into a node twice its size (no reference counting traffic) and the
parent's slot is repointed. A mutation's edit first walks down without recursion while every
node on the path is its own, editing in place (only a node that had to grow is repointed in
its parent); the first shared or collision node on the path sends it to the general
recursive edit, which copies that part of the path. `finish()` returns a snapshot sharing
every node, and the mutation takes a fresh token, so later edits copy again and never touch
that snapshot. Iterating a mutation rotates its token the same way, so the iterator walks a
stable snapshot.
Persistent operations (`Map.set`) are the same code with token None: every touched node is
copied. `set`/`add` have their own loop for that: walk down remembering the path (at most 13
bitmap nodes), build the new bottom node, then copy each ancestor with one memcpy of its slots
and a loop of increfs, pointing its child slot at the new node below; only a path ending in a
collision node takes the recursive route.

Persistence and lazy loading
----------------------------
`_persist(io)` writes, children first, every node with ptr < 0 as `io.encode(list)`:

    map  bitmap node     [1, datamap, nodemap, [keys], [values], [child ptrs]]
    map  collision node  [2, hash, [keys], [values]]
    set  bitmap node     [3, datamap, nodemap, [keys], [child ptrs]]
    set  collision node  [4, hash, [keys]]
    header               [16 (map) | 17 (set), count, root ptr]

then the header, and returns the header's pointer. `_load(ptr, io)` reads only the header.
A child slot then holds the child's pointer (a Python int) until first touched; the node is
read, decoded, validated (shape, counts, bitmaps, hash placement) and stored in the slot, a
benign write that does not change the node's logical content. Malformed node data raises
CorruptionError(offset=ptr).

Classes
-------
The four public types hold the same three things (root node, count, loader) and differ
along two independent axes: persistent or transient, map or set. A cdef class has one base,
so the classes follow the first axis and the second travels as a constant argument:

                         _TrieBase: root, count, loader; len, ==, repr
                  +---------------+----------------+
             _Persistent                      _Transient
       root_ptr, header_ptr;             token: the owner-token protocol;
       lazy root, in, iteration,         in, snapshot iteration (rotates
       mutate, _persist, _load, _check   the token), finish, _check
          +-------+--------+                +-------+-----------+
         Map            HashSet        MapMutation       HashSetMutation
    [], get, set,     add, discard,   [], get, []=, del,  add, discard,
    delete, discard,  remove          set, pop, update,   remove, update
    views                             views

Most leaf methods are one line over a module function shared by both kinds (`_frozen_put`,
`_frozen_drop`, `_transient_put`, `_transient_drop`, `_add_all`); the caller passes its
kind as a literal `is_set`, so no hot path tests a type or makes a virtual call. Cold code
that needs the kind (`==`, repr, `_persist`, `mutate`, `finish`) asks `isinstance`. The
view methods are three module functions both map classes bind as class attributes. Map and
HashSet add no fields, so they use _TrieBase's own tp_new/tp_dealloc: a `set` allocates and
frees its result as a flat class did. `get` stays written out in both map classes: it is a
plain C method (binding=False) because the layers above call it on every read, and its two
lines differ in how the root is reached (`_root()` loads a lazy one; a mutation's root is
always there); a shared helper cost it two instructions a call (callgrind).

Complexity
----------
get/set/delete O(log32 n) (hashes are 64-bit: at most 13 levels, then a collision node);
len O(1); iteration O(n); one persistent set copies O(log32 n) nodes of <= 64 slots.
"""
cimport cython
from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memmove, memset
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from cpython.object cimport PyObject_RichCompareBool, Py_EQ, PyObject_Hash

import datetime as _dt
import decimal as _decimal
import enum as _enum
import fractions as _fractions
import uuid as _uuid
from collections.abc import (ItemsView, KeysView, Mapping, MutableMapping, MutableSet, Set,
                             ValuesView)

from protobase.errors import CorruptionError, SerializationError

cdef extern from *:
    const char *PB_SOURCE_DIGEST
__source_digest__ = PB_SOURCE_DIGEST.decode("ascii")

__all__ = ["Map", "MapMutation", "HashSet", "HashSetMutation", "stable_hash"]

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* Odd 64-bit constants (golden ratio and three arbitrary odd words). */
    #define PB_K1 0x9E3779B97F4A7C15ULL
    #define PB_K2 0xD6E8FEB86659FD93ULL
    #define PB_K3 0xCA5A826395121157ULL
    #define PB_K4 0x8CB92BA72F3D8DD7ULL

    static inline uint64_t pb_bswap_le64(uint64_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        return __builtin_bswap64(v);
    #else
        return v;
    #endif
    }
    static inline uint32_t pb_bswap_le32(uint32_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        return __builtin_bswap32(v);
    #else
        return v;
    #endif
    }
    static inline uint64_t pb_rd64(const unsigned char *p) {
        uint64_t v; memcpy(&v, p, 8); return pb_bswap_le64(v);
    }
    static inline uint64_t pb_rd32(const unsigned char *p) {
        uint32_t v; memcpy(&v, p, 4); return pb_bswap_le32(v);
    }

    /* 64x64 -> 128-bit multiply, folded back to 64 bits by xor of the halves. */
    static inline uint64_t pb_mum(uint64_t a, uint64_t b) {
    #ifdef __SIZEOF_INT128__
        __uint128_t r = (__uint128_t)a * b;
        return (uint64_t)r ^ (uint64_t)(r >> 64);
    #else
        uint64_t ah = a >> 32, al = (uint32_t)a, bh = b >> 32, bl = (uint32_t)b;
        uint64_t ll = al * bl, lh = al * bh, hl = ah * bl, hh = ah * bh;
        uint64_t mid = (ll >> 32) + (uint32_t)lh + (uint32_t)hl;
        uint64_t lo = (mid << 32) | (uint32_t)ll;
        uint64_t hi = hh + (lh >> 32) + (hl >> 32) + (mid >> 32);
        return lo ^ hi;
    #endif
    }

    /* Seeded hash of a byte string: 16 bytes per round, the tail read as two (possibly
       overlapping) words, the length folded in at the start and the end. */
    static uint64_t pb_hash_bytes(const unsigned char *p, size_t n, uint64_t seed) {
        uint64_t h = pb_mum(seed ^ PB_K1, (uint64_t)n ^ PB_K2);
        uint64_t a, b;
        if (n <= 16) {
            if (n >= 8) { a = pb_rd64(p); b = pb_rd64(p + n - 8); }
            else if (n >= 4) { a = pb_rd32(p); b = pb_rd32(p + n - 4); }
            else if (n > 0) {
                a = ((uint64_t)p[0] << 16) | ((uint64_t)p[n >> 1] << 8) | p[n - 1]; b = 0;
            } else { a = 0; b = 0; }
        } else {
            size_t i = n;
            while (i > 16) {
                h = pb_mum(pb_rd64(p) ^ PB_K3, pb_rd64(p + 8) ^ h);
                p += 16; i -= 16;
            }
            a = pb_rd64(p + i - 16); b = pb_rd64(p + i - 8);
        }
        h = pb_mum(a ^ PB_K3 ^ h, b ^ PB_K4);
        return pb_mum(h ^ (uint64_t)n, PB_K1 ^ seed);
    }

    /* Order-sensitive step (tuples, canonical field lists). */
    static inline uint64_t pb_combine(uint64_t h, uint64_t x) {
        return pb_mum(h ^ PB_K2, x ^ PB_K3);
    }
    /* Per-element scramble for order-insensitive sums (frozensets). */
    static inline uint64_t pb_scramble(uint64_t x) {
        return pb_mum(x ^ PB_K4, PB_K1);
    }

    /* Population count without relying on a POPCNT instruction (no -march flags). */
    static inline uint32_t pb_popcount(uint32_t x) {
        x = x - ((x >> 1) & 0x55555555u);
        x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
        x = (x + (x >> 4)) & 0x0F0F0F0Fu;
        return (x * 0x01010101u) >> 24;
    }
    static inline int pb_same_type(PyObject *o, PyObject *t) {
        return (PyObject *)Py_TYPE(o) == t;
    }
    static inline int pb_is_nan_double(double d) { return d != d; }

    /* Node allocation: Cython's tp_new asks tp_alloc for 0 items, so the capacities of the
       next node (slots, then 64-bit hashes) travel in these variables (set right before,
       read once, under the GIL). Only the header is zeroed: see the module docstring. */
    static Py_ssize_t pb_next_node_cap = 0;
    static Py_ssize_t pb_next_node_hcap = 0;
    /* Set while an operation of an atomic trie runs (see "Garbage collection" in the module
       docstring): the nodes it allocates are left untracked by the cycle collector. */
    static int pb_untracked_alloc = 0;
    static inline int pb_swap_untracked_alloc(int on) {
        int prev = pb_untracked_alloc;
        pb_untracked_alloc = on;
        return prev;
    }
    static PyObject *pb_node_tp_alloc(PyTypeObject *t, Py_ssize_t unused) {
        Py_ssize_t items = pb_next_node_cap
            + pb_next_node_hcap * (Py_ssize_t)(sizeof(uint64_t) / sizeof(PyObject *));
        PyVarObject *o;
        (void)unused;
        o = PyObject_GC_NewVar(PyVarObject, t, items);
        if (o == NULL) return NULL;
        memset((char *)o + sizeof(PyVarObject), 0,
               (size_t)(t->tp_basicsize - sizeof(PyVarObject)));
        if (!pb_untracked_alloc) PyObject_GC_Track((PyObject *)o);
        return (PyObject *)o;
    }
    static inline void pb_set_next_node_cap(Py_ssize_t cap, Py_ssize_t hcap) {
        pb_next_node_cap = cap;
        pb_next_node_hcap = hcap;
    }
    /* A copy's new references: the slots were memcpy'd, so only the counts move. */
    static inline void pb_incref_slots(PyObject **slots, Py_ssize_t n) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) Py_INCREF(slots[i]);
    }
    /* Ask for a node's first lines at once: its header and the slot we are about to read
       are then fetched in parallel instead of one miss after the other. */
    static inline void pb_prefetch_node(PyObject *o) {
    #if defined(__GNUC__) || defined(__clang__)
        const char *p = (const char *)o;
        int line;
        for (line = 0; line < 8; line++) __builtin_prefetch(p + 64 * line, 0, 3);
    #else
        (void)o;
    #endif
    }
    static inline PyObject **pb_trailing_slots(PyObject *o) {
        return (PyObject **)((char *)o + Py_TYPE(o)->tp_basicsize);
    }
    """
    uint64_t pb_mum(uint64_t a, uint64_t b)
    uint64_t pb_hash_bytes(const unsigned char *p, size_t n, uint64_t seed)
    uint64_t pb_combine(uint64_t h, uint64_t x)
    uint64_t pb_scramble(uint64_t x)
    uint32_t pb_popcount(uint32_t x)
    int pb_same_type(PyObject *o, PyObject *t)
    int pb_is_nan_double(double d)
    void pb_set_next_node_cap(Py_ssize_t cap, Py_ssize_t hcap)
    int pb_swap_untracked_alloc(int on)
    void pb_incref_slots(PyObject **slots, Py_ssize_t n)
    void pb_prefetch_node(PyObject *o)
    PyObject **pb_trailing_slots(PyObject *o)
    PyObject *pb_node_tp_alloc(_PBTypeSlots *t, Py_ssize_t unused)

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL
    bint PyUnicode_IS_COMPACT_ASCII(PyObject *s)
    void *PyUnicode_DATA(PyObject *s)
    Py_ssize_t PyUnicode_GET_LENGTH(PyObject *s)
    char *PyBytes_AS_STRING(object b)
    Py_ssize_t PyBytes_GET_SIZE(object b)
    double PyFloat_AS_DOUBLE(object f)
    Py_ssize_t PyTuple_GET_SIZE(object t)
    PyObject *PyTuple_GET_ITEM(object t, Py_ssize_t i)
    ctypedef int (*visitproc)(PyObject *, void *) noexcept
    ctypedef int (*traverseproc)(PyObject *, visitproc, void *) noexcept
    ctypedef int (*inquiry)(PyObject *) noexcept
    ctypedef PyObject *(*allocfunc)(_PBTypeSlots *, Py_ssize_t)
    ctypedef void (*destructor)(PyObject *) noexcept
    ctypedef void (*freefunc)(void *) noexcept
    void PyObject_GC_UnTrack(void *o)
    void PyObject_GC_Track(void *o)
    bint PyObject_GC_IsTracked(PyObject *o)
    _PBTypeSlots *pb_type "Py_TYPE"(PyObject *o)
    ctypedef struct _PBTypeSlots "PyTypeObject":
        Py_ssize_t tp_basicsize
        Py_ssize_t tp_itemsize
        traverseproc tp_traverse
        inquiry tp_clear
        allocfunc tp_alloc
        destructor tp_dealloc
        freefunc tp_free


# Seeds keep values of different kinds apart even when their fields coincide.
cdef uint64_t SEED_STR = 0x243F6A8885A308D3ULL
cdef uint64_t SEED_BYTES = 0x13198A2E03707344ULL
cdef uint64_t SEED_TUPLE = 0xA4093822299F31D0ULL
cdef uint64_t SEED_FSET = 0x082EFA98EC4E6C89ULL
cdef uint64_t SEED_DATE = 0x452821E638D01377ULL
cdef uint64_t SEED_DT_NAIVE = 0xBE5466CF34E90C6CULL
cdef uint64_t SEED_DT_AWARE = 0xC0AC29B7C97C50DDULL
cdef uint64_t SEED_TIME_NAIVE = 0x3F84D5B5B5470917ULL
cdef uint64_t SEED_TIME_AWARE = 0x9216D5D98979FB1BULL
cdef uint64_t SEED_TIMEDELTA = 0xD1310BA698DFB5ACULL
cdef uint64_t SEED_UUID = 0x2FFD72DBD01ADFB7ULL
cdef uint64_t SEED_ENUM = 0xB8E1AFED6A267E96ULL
cdef uint64_t NAN_HASH = 0x7FF8A5A5C3C3F00DULL
SNAN_KEY = ("Decimal('sNaN') cannot be a key: a signaling NaN cannot be hashed or compared "
            "(dict refuses it too); use Decimal('NaN') or float('nan'), which are one key")
cdef uint64_t HASH_ERROR = 0xFFFFFFFFFFFFFFFFULL

cdef object _Decimal = _decimal.Decimal
cdef object _Fraction = _fractions.Fraction
cdef object _UUID = _uuid.UUID
cdef object _Enum = _enum.Enum
cdef object _date = _dt.date
cdef object _datetime = _dt.datetime
cdef object _time = _dt.time
cdef object _timedelta = _dt.timedelta
cdef object _MISSING = object()

# Node kinds on disk (see the essay).
cdef enum:
    K_MAP_NODE = 1
    K_MAP_COLL = 2
    K_SET_NODE = 3
    K_SET_COLL = 4
    K_MAP_HEADER = 16
    K_SET_HEADER = 17
    MAX_SHIFT = 60       # the last hash chunk (bits 60..63)
    MAX_DEPTH = 16       # levels 0..12 plus a collision node, with room to spare
    MAX_SLOTS = 66       # a bitmap node's 64 slots plus the 2 an edit may open at once


# ---------------------------------------------------------------------------------------
# Stable hashing and key equality

cdef inline uint64_t _hash_str(object s) except? 0xFFFFFFFFFFFFFFFF:
    # ASCII text is its own UTF-8: hash the characters in place (no conversion, no try).
    if PyUnicode_IS_COMPACT_ASCII(<PyObject *>s):
        return pb_hash_bytes(<const unsigned char *>PyUnicode_DATA(<PyObject *>s),
                             <size_t>PyUnicode_GET_LENGTH(<PyObject *>s), SEED_STR)
    return _hash_utf8(s)


cdef uint64_t _hash_utf8(object s) except? 0xFFFFFFFFFFFFFFFF:
    cdef Py_ssize_t n
    cdef const char *p
    try:
        p = PyUnicode_AsUTF8AndSize(s, &n)
    except UnicodeEncodeError:
        # Lone surrogates have no strict UTF-8 form; hash their surrogatepass bytes.
        b = (<str>s).encode("utf-8", "surrogatepass")
        return pb_hash_bytes(<const unsigned char *>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b),
                             SEED_STR)
    return pb_hash_bytes(<const unsigned char *>p, <size_t>n, SEED_STR)


cdef inline uint64_t _hash_number(object x) except? 0xFFFFFFFFFFFFFFFF:
    return <uint64_t>PyObject_Hash(x)


cdef inline uint64_t _hash_ticks(uint64_t seed, object ticks) except? 0xFFFFFFFFFFFFFFFF:
    return pb_combine(seed, <uint64_t>PyObject_Hash(ticks))


cdef inline object _td_micros(object td):
    return (td.days * 86400 + td.seconds) * 1000000 + td.microseconds


cdef uint64_t _hash_other(object key) except? 0xFFFFFFFFFFFFFFFF:
    cdef type t = type(key)
    cdef uint64_t h
    if t is _Decimal:
        if key.is_nan():
            if key.is_snan():
                raise SerializationError(SNAN_KEY, type_name="Decimal")
            return NAN_HASH
        return _hash_number(key)
    if t is _Fraction:
        return _hash_number(key)
    if t is frozenset:
        h = 0
        for item in key:
            h += pb_scramble(stable_hash_c(item))
        return pb_combine(SEED_FSET ^ <uint64_t>len(<frozenset>key), h)
    if t is _datetime:
        k = key.replace(fold=0) if key.fold else key
        off = k.utcoffset()
        ticks = (k.toordinal() * 86400 + k.hour * 3600 + k.minute * 60 + k.second) * 1000000 \
            + k.microsecond
        if off is None:
            return _hash_ticks(SEED_DT_NAIVE, ticks)
        return _hash_ticks(SEED_DT_AWARE, ticks - _td_micros(off))
    if t is _date:
        return _hash_ticks(SEED_DATE, key.toordinal())
    if t is _time:
        ticks = (key.hour * 3600 + key.minute * 60 + key.second) * 1000000 + key.microsecond
        off = key.utcoffset()
        if off is None:
            return _hash_ticks(SEED_TIME_NAIVE, ticks)
        return _hash_ticks(SEED_TIME_AWARE, ticks - _td_micros(off))
    if t is _timedelta:
        return _hash_ticks(SEED_TIMEDELTA, _td_micros(key))
    if t is _UUID:
        v = key.int
        h = pb_combine(SEED_UUID, <uint64_t>(v & 0xFFFFFFFFFFFFFFFF))
        return pb_combine(h, <uint64_t>(v >> 64))
    if isinstance(key, _Enum):
        # Mixed-in enums (IntEnum, StrEnum...) equal their value, so they hash as it does.
        if isinstance(key, int) or isinstance(key, float):
            return _hash_number(key)
        if isinstance(key, str):
            return _hash_str(key)
        h = pb_combine(SEED_ENUM, _hash_str(t.__module__))
        h = pb_combine(h, _hash_str(t.__qualname__))
        return pb_combine(h, _hash_str(key._name_))
    raise SerializationError(
        f"unsupported key type {t.__name__!r}: keys must be None, bool, int, float, str, "
        f"bytes, tuple/frozenset of keys, date/time/datetime/timedelta, Decimal, Fraction, "
        f"UUID or Enum members", type_name=t.__name__)


cdef uint64_t stable_hash_c(object key) except? 0xFFFFFFFFFFFFFFFF:
    cdef type t = type(key)
    cdef uint64_t h
    cdef Py_ssize_t i, n
    if t is int:
        return <uint64_t>PyObject_Hash(key)
    if t is str:
        return _hash_str(key)
    if t is float:
        if pb_is_nan_double(PyFloat_AS_DOUBLE(key)):
            return NAN_HASH
        return <uint64_t>PyObject_Hash(key)
    if t is bytes:
        return pb_hash_bytes(<const unsigned char *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                             SEED_BYTES)
    if t is tuple:
        n = PyTuple_GET_SIZE(key)
        h = SEED_TUPLE ^ <uint64_t>n
        for i in range(n):
            h = pb_combine(h, stable_hash_c(<object>PyTuple_GET_ITEM(key, i)))
        return h
    if t is bool:
        return 1 if key is True else 0
    if key is None:
        return 0x5A17C0DE5A17C0DEULL
    return _hash_other(key)


def stable_hash(key):
    """The key's 64-bit hash (signed), identical in every process whatever PYTHONHASHSEED is.

    Raises TypeError for keys that are not immutable built-ins (see the module docstring)."""
    return <int64_t>stable_hash_c(key)


cdef inline bint _is_nan(object x) except -1:
    cdef type t = type(x)
    if t is float:
        return pb_is_nan_double(PyFloat_AS_DOUBLE(x))
    if t is _Decimal:
        return x.is_nan()
    return False


cdef bint key_eq(object a, object b) except -1:
    """Key equality as in dict, with every NaN equal to every NaN (also inside tuples)."""
    cdef type ta, tb
    cdef Py_ssize_t i, n
    if a is b:
        return True
    ta = type(a)
    tb = type(b)
    if (ta is int and tb is int) or (ta is str and tb is str) or (ta is bytes and tb is bytes):
        return PyObject_RichCompareBool(a, b, Py_EQ)
    if ta is tuple and tb is tuple:
        n = PyTuple_GET_SIZE(a)
        if n != PyTuple_GET_SIZE(b):
            return False
        for i in range(n):
            if not key_eq(<object>PyTuple_GET_ITEM(a, i), <object>PyTuple_GET_ITEM(b, i)):
                return False
        return True
    if ta is float or ta is _Decimal or tb is float or tb is _Decimal:
        if _is_nan(a) or _is_nan(b):
            return _is_nan(a) and _is_nan(b)
    return PyObject_RichCompareBool(a, b, Py_EQ)


# ---------------------------------------------------------------------------------------
# Nodes: allocation and slot surgery. Slots hold strong references (or NULL while a
# freshly allocated node is being filled).

cdef class Node:
    """A trie node (internal). See the module docstring for the slot layout."""


# Node keeps its references in a C array, which Cython's generated GC support cannot see;
# these two functions show them to the cycle collector (values may point back at the map).
cdef int _node_traverse(PyObject *o, visitproc visit, void *arg) noexcept:
    # Borrowed access only: the collector must not see reference counts move.
    cdef Py_ssize_t i
    cdef int r
    cdef PyObject **slots = (<Node>o).slots
    cdef PyObject *owner = <PyObject *>(<Node>o).owner
    if owner != NULL:
        r = visit(owner, arg)
        if r:
            return r
    for i in range((<Node>o).n):
        if slots[i] != NULL:
            r = visit(slots[i], arg)
            if r:
                return r
    return 0


cdef int _node_clear(PyObject *o) noexcept:
    cdef Node node = <Node>o
    cdef Py_ssize_t i, n = node.n
    cdef PyObject **slots = node.slots
    node.n = 0
    node.datamap = 0
    node.nodemap = 0
    node.owner = None
    for i in range(n):
        Py_XDECREF(slots[i])
        slots[i] = NULL
    return 0


cdef void _node_dealloc(PyObject *o) noexcept:
    # Cython's generated dealloc would save and restore the pending exception around every
    # node; dropping references is all a node does on the way out (as a list), so go direct.
    cdef Py_ssize_t i, n = (<Node>o).n
    cdef PyObject **slots = (<Node>o).slots
    cdef PyObject *owner = <PyObject *>(<Node>o).owner
    PyObject_GC_UnTrack(o)
    (<Node>o).n = 0
    for i in range(n):
        Py_XDECREF(slots[i])
    Py_XDECREF(owner)
    pb_type(o).tp_free(o)


# Made variable-size before any node exists; slots live after tp_basicsize.
(<_PBTypeSlots *><PyObject *>Node).tp_itemsize = sizeof(PyObject *)
(<_PBTypeSlots *><PyObject *>Node).tp_alloc = pb_node_tp_alloc
(<_PBTypeSlots *><PyObject *>Node).tp_traverse = _node_traverse
(<_PBTypeSlots *><PyObject *>Node).tp_clear = _node_clear
(<_PBTypeSlots *><PyObject *>Node).tp_dealloc = _node_dealloc


cdef inline Node _alloc_raw(Py_ssize_t cap, Py_ssize_t hcap, object owner):
    """An empty node (n == 0) with room for cap slots and hcap entry hashes."""
    pb_set_next_node_cap(cap, hcap)
    cdef Node node = Node.__new__(Node)
    node.slots = pb_trailing_slots(<PyObject *>node)
    node.hashes = <uint64_t *>(node.slots + cap)
    node.cap = cap
    node.hcap = hcap
    node.owner = owner
    node.ptr = -1
    return node


cdef inline Py_ssize_t _owned_hcap(Py_ssize_t cap):
    # A node a mutation edits in place may fill all its slots with entries.
    return (cap + 1) >> 1


cdef Node _alloc(Py_ssize_t n, Py_ssize_t cap, Py_ssize_t hcap, object owner):
    """A node with room for cap slots and hcap hashes, the first n slots NULL (for _put)."""
    cdef Node node = _alloc_raw(cap, hcap, owner)
    memset(node.slots, 0, n * sizeof(PyObject *))
    node.n = n
    return node


cdef inline Py_ssize_t _entries(Node node):
    return node.n >> 1 if node.collision else pb_popcount(node.datamap)


cdef inline void _put(Node node, Py_ssize_t i, object obj):
    """Fill an empty (NULL) slot."""
    Py_INCREF(obj)
    node.slots[i] = <PyObject *>obj


cdef inline void _replace(Node node, Py_ssize_t i, object obj):
    cdef PyObject *old = node.slots[i]
    Py_INCREF(obj)
    node.slots[i] = <PyObject *>obj
    Py_XDECREF(old)


cdef Node _copy(Node src, object owner, Py_ssize_t cap, Py_ssize_t hcap):
    cdef Node dst = _alloc_raw(cap, hcap, owner)
    memcpy(dst.slots, src.slots, src.n * sizeof(PyObject *))
    pb_incref_slots(dst.slots, src.n)
    memcpy(dst.hashes, src.hashes, _entries(src) * sizeof(uint64_t))
    dst.n = src.n
    dst.datamap = src.datamap
    dst.nodemap = src.nodemap
    dst.chash = src.chash
    dst.collision = src.collision
    return dst


cdef inline Node _editable(Node node, object token, Py_ssize_t extra):
    """A node the token may edit with room for `extra` more slots: the node itself when the
    token owns it and it has room, else a copy owned by the token (the caller puts the
    result in the parent's slot). Copies made for a mutation get slack for later inserts."""
    cdef Py_ssize_t need = node.n + extra
    if token is None:
        # Frozen copies are exact: an edit that opens 2 slots may add one entry.
        return _copy(node, None, need, _entries(node) + (extra >> 1))
    if node.owner is not token:
        need += need // 2
        return _copy(node, token, need, _owned_hcap(need))
    if node.cap >= need:
        return node
    # Only the token's own tree holds an owned node, and the caller replaces it with the
    # grown one, so its references move over instead of being counted up and down again.
    return _grow_owned(node, 2 * need if node.collision or 2 * need < MAX_SLOTS else MAX_SLOTS)


cdef Node _grow_owned(Node node, Py_ssize_t cap):
    # _copy's field moves again, without the increfs: a shared helper for both was not
    # inlined by the C compiler and cost every persistent `set` 0.8% more instructions.
    cdef Node dst = _alloc_raw(cap, _owned_hcap(cap), node.owner)
    memcpy(dst.slots, node.slots, node.n * sizeof(PyObject *))
    memcpy(dst.hashes, node.hashes, _entries(node) * sizeof(uint64_t))
    dst.n = node.n
    dst.datamap = node.datamap
    dst.nodemap = node.nodemap
    dst.chash = node.chash
    dst.collision = node.collision
    node.n = 0               # left as a valid empty node
    node.datamap = 0
    node.nodemap = 0
    return dst


cdef int _open_gap(Node node, Py_ssize_t pos, Py_ssize_t k) except -1:
    """Insert k NULL slots at pos; _editable reserved the room."""
    if node.n + k > node.cap:
        raise SystemError("hamt: node capacity not reserved")
    memmove(&node.slots[pos + k], &node.slots[pos], (node.n - pos) * sizeof(PyObject *))
    cdef Py_ssize_t i
    for i in range(pos, pos + k):
        node.slots[i] = NULL
    node.n += k
    return 0


cdef void _close_gap(Node node, Py_ssize_t pos, Py_ssize_t k):
    """Remove k (<= 2) slots at pos; the references are dropped after the node is consistent,
    since dropping one may run arbitrary code."""
    cdef PyObject *dropped[2]
    cdef Py_ssize_t i
    for i in range(k):
        dropped[i] = node.slots[pos + i]
    memmove(&node.slots[pos], &node.slots[pos + k], (node.n - pos - k) * sizeof(PyObject *))
    node.n -= k
    for i in range(k):
        Py_XDECREF(dropped[i])


cdef int _insert_entry(Node node, Py_ssize_t e, Py_ssize_t nd, object key, object val,
                       uint64_t h) except -1:
    """Make key/val/h entry e of a node that holds nd entries (the caller updates datamap)."""
    if nd + 1 > node.hcap:
        raise SystemError("hamt: hash capacity not reserved")
    _open_gap(node, 2 * e, 2)
    memmove(&node.hashes[e + 1], &node.hashes[e], (nd - e) * sizeof(uint64_t))
    node.hashes[e] = h
    _put(node, 2 * e, key)
    _put(node, 2 * e + 1, val)
    return 0


cdef inline void _remove_entry(Node node, Py_ssize_t e, Py_ssize_t nd):
    """Drop entry e of a node that holds nd entries (the caller updates datamap)."""
    memmove(&node.hashes[e], &node.hashes[e + 1], (nd - e - 1) * sizeof(uint64_t))
    _close_gap(node, 2 * e, 2)


cdef inline uint32_t _bit(uint64_t h, int shift):
    return (<uint32_t>1) << <uint32_t>((h >> shift) & 31)


cdef inline uint64_t _mask(int shift):
    return 0xFFFFFFFFFFFFFFFFULL if shift >= 64 else (((<uint64_t>1) << shift) - 1)


cdef inline int _lowest_bit_index(uint32_t x):
    return pb_popcount((x & (~x + 1)) - 1)


cdef int _nth_bit_index(uint32_t bitmap, Py_ssize_t j):
    """Chunk number of the j-th set bit of bitmap."""
    while j > 0:
        bitmap &= bitmap - 1
        j -= 1
    return _lowest_bit_index(bitmap)


# ---------------------------------------------------------------------------------------
# Lazy loading

cdef class _Loader:
    """The atom I/O of a loaded structure and the node kinds it must contain (internal)."""

    def __cinit__(self, io, bint is_set):
        self.io = io
        self.is_set = is_set


cdef _corrupt(object ptr, str what):
    return CorruptionError(f"hamt node at offset {ptr} is damaged: {what}", offset=ptr)


cdef object _read(_Loader ld, object ptr):
    data = ld.io.read_atom(ptr)
    try:
        return ld.io.decode(data)
    except CorruptionError:
        raise
    except Exception as exc:
        raise _corrupt(ptr, f"undecodable ({type(exc).__name__}: {exc})") from exc


cdef uint32_t _bitmap_field(object ptr, object v) except? 0xFFFFFFFF:
    if type(v) is not int or not (0 <= v <= 0xFFFFFFFF):
        raise _corrupt(ptr, "bitmap is not a 32-bit unsigned int")
    return <uint32_t>v


cdef uint64_t _checked_hash(object ptr, object key) except? 0xFFFFFFFFFFFFFFFF:
    try:
        return stable_hash_c(key)
    except TypeError as exc:
        raise _corrupt(ptr, f"key of type {type(key).__name__!r} is not a valid key") from exc


cdef Node _load_node(_Loader ld, object ptr, int shift, uint64_t prefix):
    """Read, decode and validate one node reached at `shift` along hash prefix `prefix`."""
    cdef Py_ssize_t nd, nc, i
    cdef uint32_t datamap, nodemap, bit
    cdef uint64_t h, chash
    cdef Node node
    rec = _read(ld, ptr)
    if type(rec) is not list or len(<list>rec) == 0:
        raise _corrupt(ptr, "not a node record")
    kind = (<list>rec)[0]
    coll_kind = K_SET_COLL if ld.is_set else K_MAP_COLL
    node_kind = K_SET_NODE if ld.is_set else K_MAP_NODE
    width = 3 if ld.is_set else 4
    if kind == coll_kind and type(kind) is int:
        if len(<list>rec) != width:
            raise _corrupt(ptr, "collision node of the wrong length")
        hv = rec[1]
        if type(hv) is not int or not (-(1 << 63) <= hv < (1 << 63)):
            raise _corrupt(ptr, "collision hash is not a signed 64-bit int")
        chash = <uint64_t><int64_t>hv
        keys = rec[2]
        values = None if ld.is_set else rec[3]
        if type(keys) is not list or (values is not None and type(values) is not list):
            raise _corrupt(ptr, "collision node fields are not lists")
        nd = len(<list>keys)
        if nd < 2 or (values is not None and len(<list>values) != nd):
            raise _corrupt(ptr, "collision node entry counts are wrong")
        if shift == 0 or (chash & _mask(shift)) != prefix:
            raise _corrupt(ptr, "collision node is misplaced")
        for i in range(nd):
            if _checked_hash(ptr, keys[i]) != chash:
                raise _corrupt(ptr, "collision node key with a different hash")
            for j in range(i):
                if key_eq(keys[i], keys[j]):
                    raise _corrupt(ptr, "duplicate key in collision node")
        node = _alloc(2 * nd, 2 * nd, nd, None)
        node.collision = True
        node.chash = chash
        for i in range(nd):
            _put(node, 2 * i, keys[i])
            _put(node, 2 * i + 1, None if values is None else values[i])
            node.hashes[i] = chash
        node.ptr = ptr
        _settle_loaded(node, True)
        return node
    if kind != node_kind or type(kind) is not int:
        raise _corrupt(ptr, f"unexpected node kind {kind!r}")
    if len(<list>rec) != width + 2:
        raise _corrupt(ptr, "bitmap node of the wrong length")
    if shift > MAX_SHIFT:
        raise _corrupt(ptr, "bitmap node below the last hash level")
    datamap = _bitmap_field(ptr, rec[1])
    nodemap = _bitmap_field(ptr, rec[2])
    keys = rec[3]
    values = None if ld.is_set else rec[4]
    children = rec[width + 1]
    if type(keys) is not list or type(children) is not list or \
            (values is not None and type(values) is not list):
        raise _corrupt(ptr, "bitmap node fields are not lists")
    nd = pb_popcount(datamap)
    nc = pb_popcount(nodemap)
    if datamap & nodemap:
        raise _corrupt(ptr, "a chunk is both an entry and a child")
    if len(<list>keys) != nd or (values is not None and len(<list>values) != nd) \
            or len(<list>children) != nc:
        raise _corrupt(ptr, "entry or child counts disagree with the bitmaps")
    if shift > 0 and nd + nc < 2 and not (nd == 0 and nc == 1):
        raise _corrupt(ptr, "non-root node is not in canonical form")
    for i in range(nc):
        c = children[i]
        if type(c) is not int or c < 0:
            raise _corrupt(ptr, "child pointer is not a non-negative int")
    node = _alloc(2 * nd + nc, 2 * nd + nc, nd, None)
    node.datamap = datamap
    node.nodemap = nodemap
    for i in range(nd):
        k = keys[i]
        h = _checked_hash(ptr, k)
        bit = (<uint32_t>1) << _nth_bit_index(datamap, i)
        if (h & _mask(shift)) != prefix or _bit(h, shift) != bit:
            raise _corrupt(ptr, "key is not where its hash places it")
        node.hashes[i] = h
        _put(node, 2 * i, k)
        _put(node, 2 * i + 1, None if values is None else values[i])
    for i in range(nc):
        _put(node, 2 * nd + i, children[i])
    node.ptr = ptr
    _settle_loaded(node, nc == 0)
    return node


cdef void _settle_loaded(Node node, bint leaf):
    # Loaded nodes are never edited in place (only copied), so a leaf holding nothing
    # tracked can stay untracked for good; any other node is tracked, whatever operation
    # (maybe another trie's atomic one) the load happens in.
    cdef Py_ssize_t i
    if leaf:
        for i in range(node.n):
            if node.slots[i] != NULL and PyObject_GC_IsTracked(node.slots[i]):
                leaf = False
                break
    if leaf:
        PyObject_GC_UnTrack(<PyObject *>node)
    elif not PyObject_GC_IsTracked(<PyObject *>node):
        PyObject_GC_Track(<PyObject *>node)


cdef inline Node _child(Node node, Py_ssize_t slot, int shift, uint64_t prefix, _Loader ld):
    """The child node in `slot` (at `shift`, along `prefix`), loading it on first touch."""
    cdef PyObject *o = node.slots[slot]
    if pb_same_type(o, <PyObject *>Node):
        return <Node>o
    return _resolve(node, slot, shift, prefix, ld)


cdef Node _resolve(Node node, Py_ssize_t slot, int shift, uint64_t prefix, _Loader ld):
    cdef PyObject *o = node.slots[slot]
    if ld is None:
        raise RuntimeError("hamt: unloaded child pointer in a structure without atom I/O")
    child = _load_node(ld, <object>o, shift, prefix)
    _replace(node, slot, child)
    return child


cdef Node _load_root(int64_t root_ptr, _Loader ld):
    if ld is None:
        raise RuntimeError("hamt: structure has neither a root nor atom I/O")
    cdef Node root = _load_node(ld, root_ptr, 0, 0)
    if root.collision:
        raise _corrupt(root_ptr, "root is a collision node")
    return root


# ---------------------------------------------------------------------------------------
# Core operations. `token` is the mutation's owner token (None: persistent, copy all).

cdef object _find(Node root, object key, uint64_t h, _Loader ld):
    """The value stored under key, or _MISSING."""
    cdef int shift = 0
    cdef uint32_t bit, datamap, nodemap
    cdef Py_ssize_t i
    cdef PyObject *k
    cdef PyObject *cur = <PyObject *>root     # borrowed: each node is held by its parent
    cdef PyObject *nxt
    cdef Node resolved
    while True:
        if (<Node>cur).collision:
            return _find_collision(<Node>cur, key, h)
        bit = _bit(h, shift)
        datamap = (<Node>cur).datamap
        if datamap & bit:
            i = pb_popcount(datamap & (bit - 1))
            k = (<Node>cur).slots[2 * i]
            # A stored hash that differs proves a miss without touching the stored key.
            if k == <PyObject *>key or ((<Node>cur).hashes[i] == h and key_eq(<object>k, key)):
                return <object>(<Node>cur).slots[2 * i + 1]
            return _MISSING
        nodemap = (<Node>cur).nodemap
        if not (nodemap & bit):
            return _MISSING
        i = 2 * pb_popcount(datamap) + pb_popcount(nodemap & (bit - 1))
        shift += 5
        nxt = (<Node>cur).slots[i]
        if not pb_same_type(nxt, <PyObject *>Node):
            resolved = _resolve(<Node>cur, i, shift, h & _mask(shift), ld)
            nxt = <PyObject *>resolved     # now also held by the slot it was loaded into
        pb_prefetch_node(nxt)
        cur = nxt


cdef object _find_collision(Node node, object key, uint64_t h):
    cdef Py_ssize_t i
    cdef PyObject *k
    if h != node.chash:
        return _MISSING
    for i in range(0, node.n, 2):
        k = node.slots[i]
        if k == <PyObject *>key or key_eq(<object>k, key):
            return <object>node.slots[i + 1]
    return _MISSING


cdef inline void _put_two(Node node, object k1, object v1, uint64_t h1, object k2, object v2,
                          uint64_t h2):
    """Fill the first two entries of a fresh 4-slot node."""
    node.hashes[0] = h1
    node.hashes[1] = h2
    _put(node, 0, k1)
    _put(node, 1, v1)
    _put(node, 2, k2)
    _put(node, 3, v2)


cdef Node _merge(object k1, object v1, uint64_t h1, object k2, object v2, uint64_t h2,
                 int shift, object token):
    """The smallest subtree at `shift` holding two distinct keys."""
    cdef Node node
    cdef uint32_t b1, b2
    if h1 == h2:
        node = _alloc(4, 4, 2, token)
        node.collision = True
        node.chash = h1
        _put_two(node, k1, v1, h1, k2, v2, h2)
        return node
    b1 = _bit(h1, shift)
    b2 = _bit(h2, shift)
    if b1 == b2:
        sub = _merge(k1, v1, h1, k2, v2, h2, shift + 5, token)
        node = _alloc(1, 1, 0, token)
        node.nodemap = b1
        _put(node, 0, sub)
        return node
    # A mutation is likely to add more keys here: room for two more entries saves a move.
    node = _alloc(4, 4, 2, None) if token is None else _alloc(4, 8, 4, token)
    node.datamap = b1 | b2
    if b1 < b2:
        _put_two(node, k1, v1, h1, k2, v2, h2)
    else:
        _put_two(node, k2, v2, h2, k1, v1, h1)
    return node


cdef inline bint _entry_is(Node node, Py_ssize_t e, uint64_t h, object key) except -1:
    """Whether inline entry e holds key (of hash h)."""
    # Different hashes prove different keys without touching the stored key.
    cdef PyObject *k = node.slots[2 * e]
    return node.hashes[e] == h and (k == <PyObject *>key or key_eq(<object>k, key))


cdef inline Node _push_down(Node node, Py_ssize_t e, uint32_t bit, int shift, uint64_t h,
                            object key, object val, object token):
    """node (or the copy the token may edit) with its entry e, whose chunk key shares, moved
    into a new child holding both keys."""
    cdef Node sub = _merge(<object>node.slots[2 * e], <object>node.slots[2 * e + 1],
                           node.hashes[e], key, val, h, shift + 5, token)
    cdef Node n2 = _editable(node, token, 1)
    cdef Py_ssize_t nd = pb_popcount(n2.datamap)
    cdef Py_ssize_t j = 2 * nd + pb_popcount(n2.nodemap & (bit - 1))
    _open_gap(n2, j, 1)
    _put(n2, j, sub)
    _remove_entry(n2, e, nd)
    n2.datamap ^= bit
    n2.nodemap |= bit
    return n2


cdef inline Node _add_entry(Node node, uint32_t bit, uint64_t h, object key, object val,
                            object token):
    """node (or the copy the token may edit) with key -> val inline in its free chunk bit."""
    cdef Node n2 = _editable(node, token, 2)
    _insert_entry(n2, pb_popcount(n2.datamap & (bit - 1)), pb_popcount(n2.datamap), key, val, h)
    n2.datamap |= bit
    return n2


cdef Node _assoc(Node node, int shift, uint64_t h, object key, object val, object token,
                 _Loader ld, bint *added):
    """Node with key -> val; the same node when it was edited in place or nothing changed."""
    cdef uint32_t bit
    cdef Py_ssize_t i, j, e, nd
    cdef Node n2, child, c2, wrap
    cdef PyObject *k
    if node.collision:
        if h == node.chash:
            for i in range(0, node.n, 2):
                k = node.slots[i]
                if k == <PyObject *>key or key_eq(<object>k, key):
                    if node.slots[i + 1] == <PyObject *>val:
                        return node
                    n2 = _editable(node, token, 0)
                    _replace(n2, i + 1, val)
                    return n2
            n2 = _editable(node, token, 2)
            _insert_entry(n2, n2.n >> 1, n2.n >> 1, key, val, h)
            added[0] = True
            return n2
        # A different hash reached this collision node: put a bitmap level above it.
        wrap = _alloc(1, 3, 1, token)
        wrap.nodemap = _bit(node.chash, shift)
        _put(wrap, 0, node)
        return _assoc(wrap, shift, h, key, val, token, ld, added)
    bit = _bit(h, shift)
    if node.datamap & bit:
        e = pb_popcount(node.datamap & (bit - 1))
        if _entry_is(node, e, h, key):
            if node.slots[2 * e + 1] == <PyObject *>val:
                return node
            n2 = _editable(node, token, 0)
            _replace(n2, 2 * e + 1, val)
            return n2
        n2 = _push_down(node, e, bit, shift, h, key, val, token)
        added[0] = True
        return n2
    if node.nodemap & bit:
        nd = pb_popcount(node.datamap)
        j = 2 * nd + pb_popcount(node.nodemap & (bit - 1))
        child = _child(node, j, shift + 5, h & _mask(shift + 5), ld)
        c2 = _assoc(child, shift + 5, h, key, val, token, ld, added)
        if c2 is child:
            return node
        n2 = _editable(node, token, 0)
        _replace(n2, j, c2)
        return n2
    n2 = _add_entry(node, bit, h, key, val, token)
    added[0] = True
    return n2


cdef Node _assoc_owned(Node root, uint64_t h, object key, object val, object token,
                       _Loader ld, bint *added):
    """_assoc for a mutation, without recursion, while every node on the path is the
    token's own: the edit happens in place and only a node that had to grow is repointed in
    its parent. Returns the (possibly new) root, or None before changing anything when the
    path reaches a shared or collision node, for the general _assoc to copy the path."""
    cdef Node node = root
    cdef Node parent = None
    cdef Node n2
    cdef Py_ssize_t pslot = 0, e, j
    cdef int shift = 0
    cdef uint32_t bit
    while True:
        if node.owner is not token or node.collision:
            return None
        bit = _bit(h, shift)
        if node.datamap & bit:
            e = pb_popcount(node.datamap & (bit - 1))
            if _entry_is(node, e, h, key):
                if node.slots[2 * e + 1] != <PyObject *>val:
                    _replace(node, 2 * e + 1, val)
                return root
            n2 = _push_down(node, e, bit, shift, h, key, val, token)
            break
        if node.nodemap & bit:
            j = 2 * pb_popcount(node.datamap) + pb_popcount(node.nodemap & (bit - 1))
            parent = node
            pslot = j
            shift += 5
            node = _child(parent, j, shift, h & _mask(shift), ld)
            pb_prefetch_node(<PyObject *>node)
            continue
        n2 = _add_entry(node, bit, h, key, val, token)
        break
    added[0] = True
    if n2 is node:
        return root
    if parent is None:
        return n2
    _replace(parent, pslot, n2)
    return root


cdef inline Node _mut_assoc(Node root, uint64_t h, object key, object val, object token,
                            _Loader ld, bint *added):
    """A mutation's edit: in place on its own path, else the general path-copying _assoc."""
    cdef Node r2 = _assoc_owned(root, h, key, val, token, ld, added)
    if r2 is None:
        r2 = _assoc(root, 0, h, key, val, token, ld, added)
    return r2


cdef Node _assoc_frozen(Node root, uint64_t h, object key, object val, _Loader ld,
                        bint *added):
    """_assoc with token None (a persistent update), without recursion: walk down keeping
    the path, build the new bottom node, then copy each ancestor with its child slot moved to
    the new node below it. Returns root itself when nothing changes, or None before changing
    anything when the path ends in a collision node (the recursive _assoc handles those)."""
    # Borrowed: each node on the path is held by its parent, and the root by the caller.
    cdef PyObject *path[MAX_DEPTH]
    cdef Py_ssize_t slot[MAX_DEPTH]
    cdef Py_ssize_t ents[MAX_DEPTH]
    cdef int depth = 0, shift = 0
    cdef Node node = root
    cdef Node n2, up
    cdef Py_ssize_t e, j, nd
    cdef uint32_t bit
    while True:
        if node.collision:
            return None
        bit = _bit(h, shift)
        if node.datamap & bit:
            e = pb_popcount(node.datamap & (bit - 1))
            if _entry_is(node, e, h, key):
                if node.slots[2 * e + 1] == <PyObject *>val:
                    return root
                n2 = _copy(node, None, node.n, _entries(node))
                _replace(n2, 2 * e + 1, val)
                break
            n2 = _push_down(node, e, bit, shift, h, key, val, None)
            added[0] = True
            break
        if node.nodemap & bit:
            nd = pb_popcount(node.datamap)
            j = 2 * nd + pb_popcount(node.nodemap & (bit - 1))
            path[depth] = <PyObject *>node
            slot[depth] = j
            ents[depth] = nd
            depth += 1
            shift += 5
            node = _child(node, j, shift, h & _mask(shift), ld)
            pb_prefetch_node(<PyObject *>node)
            continue
        n2 = _add_entry(node, bit, h, key, val, None)
        added[0] = True
        break
    while depth > 0:
        depth -= 1
        node = <Node>path[depth]
        up = _copy(node, None, node.n, ents[depth])
        _replace(up, slot[depth], n2)
        n2 = up
    return n2


cdef inline Node _persistent_assoc(Node root, uint64_t h, object key, object val, _Loader ld,
                                   bint *added):
    """A persistent update: the path copied without recursion, or by _assoc near collisions."""
    cdef Node r2 = _assoc_frozen(root, h, key, val, ld, added)
    if r2 is None:
        r2 = _assoc(root, 0, h, key, val, None, ld, added)
    return r2


cdef inline bint _is_single_entry(Node node):
    if node.collision:
        return node.n == 2
    return node.nodemap == 0 and pb_popcount(node.datamap) == 1


cdef Node _dissoc(Node node, int shift, uint64_t h, object key, object token, _Loader ld,
                  bint *removed):
    """Node without key; the same node when it was edited in place or key was absent."""
    cdef uint32_t bit
    cdef Py_ssize_t i, j, e, nd
    cdef Node n2, child, c2, grandchild
    cdef PyObject *k
    if node.collision:
        if h != node.chash:
            return node
        for i in range(0, node.n, 2):
            k = node.slots[i]
            if k == <PyObject *>key or key_eq(<object>k, key):
                n2 = _editable(node, token, 0)
                _remove_entry(n2, i >> 1, n2.n >> 1)
                removed[0] = True
                return n2
        return node
    bit = _bit(h, shift)
    if node.datamap & bit:
        e = pb_popcount(node.datamap & (bit - 1))
        if not _entry_is(node, e, h, key):
            return node
        n2 = _editable(node, token, 0)
        _remove_entry(n2, e, pb_popcount(n2.datamap))
        n2.datamap ^= bit
        removed[0] = True
        return n2
    if not (node.nodemap & bit):
        return node
    nd = pb_popcount(node.datamap)
    j = 2 * nd + pb_popcount(node.nodemap & (bit - 1))
    child = _child(node, j, shift + 5, h & _mask(shift + 5), ld)
    c2 = _dissoc(child, shift + 5, h, key, token, ld, removed)
    if not removed[0]:
        return node
    if _is_single_entry(c2):
        # Pull the last entry of the child up into this node.
        k_up = <object>c2.slots[0]
        v_up = <object>c2.slots[1]
        n2 = _editable(node, token, 2)
        _insert_entry(n2, pb_popcount(n2.datamap & (bit - 1)), pb_popcount(n2.datamap), k_up,
                      v_up, c2.hashes[0])
        _close_gap(n2, j + 2, 1)
        n2.datamap |= bit
        n2.nodemap ^= bit
        return n2
    if not c2.collision and c2.datamap == 0 and pb_popcount(c2.nodemap) == 1:
        grandchild = _child(c2, 0, shift + 10,
                            (h & _mask(shift + 5))
                            | ((<uint64_t>_lowest_bit_index(c2.nodemap)) << (shift + 5)), ld)
        if grandchild.collision:
            c2 = grandchild      # a lone collision node replaces its parent
    if c2 is child:
        return node
    n2 = _editable(node, token, 0)
    _replace(n2, j, c2)
    return n2


# ---------------------------------------------------------------------------------------
# Persistence

cdef int64_t _persist_node(Node node, object io, bint is_set) except -2:
    cdef Py_ssize_t i, nd
    cdef PyObject *o
    if node.ptr >= 0:
        return node.ptr
    if node.collision:
        nd = node.n // 2
        keys = [<object>node.slots[2 * i] for i in range(nd)]
        if is_set:
            rec = [K_SET_COLL, <int64_t>node.chash, keys]
        else:
            rec = [K_MAP_COLL, <int64_t>node.chash, keys,
                   [<object>node.slots[2 * i + 1] for i in range(nd)]]
    else:
        nd = pb_popcount(node.datamap)
        children = []
        for i in range(2 * nd, node.n):
            o = node.slots[i]
            if pb_same_type(o, <PyObject *>Node):
                children.append(_persist_node(<Node>o, io, is_set))
            else:
                children.append(<object>o)
        keys = [<object>node.slots[2 * i] for i in range(nd)]
        if is_set:
            rec = [K_SET_NODE, node.datamap, node.nodemap, keys, children]
        else:
            rec = [K_MAP_NODE, node.datamap, node.nodemap, keys,
                   [<object>node.slots[2 * i + 1] for i in range(nd)], children]
    ptr = io.write_atom(io.encode(rec))
    node.ptr = ptr
    node.owner = None
    return node.ptr


cdef object _read_header(object ptr, object io, bint is_set):
    ld = _Loader(io, is_set)
    rec = _read(ld, ptr)
    want = K_SET_HEADER if is_set else K_MAP_HEADER
    if type(rec) is not list or len(<list>rec) != 3 or type(rec[0]) is not int or rec[0] != want:
        raise _corrupt(ptr, f"not a hamt {'set' if is_set else 'map'} header")
    count, root_ptr = rec[1], rec[2]
    if type(count) is not int or count < 0 or type(root_ptr) is not int or root_ptr < 0:
        raise _corrupt(ptr, "header count or root pointer is invalid")
    return ld, count, root_ptr


# ---------------------------------------------------------------------------------------
# Iteration (depth first, entries of a node before its children: the trie's own order)

cdef class _Iter:
    cdef list stack
    cdef Py_ssize_t pos[MAX_DEPTH]
    cdef uint64_t prefix[MAX_DEPTH]
    cdef int depth
    cdef int mode          # 0 keys, 1 values, 2 items
    cdef _Loader ld
    cdef object keepalive

    def __iter__(self):
        return self

    def __next__(self):
        cdef Node node
        cdef Py_ssize_t p, nd, i
        cdef int shift
        cdef uint64_t pfx
        while self.depth >= 0:
            node = <Node>self.stack[self.depth]
            p = self.pos[self.depth]
            nd = node.n // 2 if node.collision else pb_popcount(node.datamap)
            if p < nd:
                self.pos[self.depth] = p + 1
                if self.mode == 0:
                    return <object>node.slots[2 * p]
                if self.mode == 1:
                    return <object>node.slots[2 * p + 1]
                return (<object>node.slots[2 * p], <object>node.slots[2 * p + 1])
            i = 2 * nd + (p - nd)
            if i < node.n:
                self.pos[self.depth] = p + 1
                shift = 5 * (self.depth + 1)
                pfx = self.prefix[self.depth] \
                    | ((<uint64_t>_nth_bit_index(node.nodemap, p - nd)) << (shift - 5))
                child = _child(node, i, shift, pfx, self.ld)
                self.depth += 1
                if self.depth >= MAX_DEPTH:
                    raise RuntimeError("hamt: trie deeper than a 64-bit hash allows")
                if len(self.stack) > self.depth:
                    self.stack[self.depth] = child
                else:
                    self.stack.append(child)
                self.pos[self.depth] = 0
                self.prefix[self.depth] = pfx
                continue
            self.stack[self.depth] = None
            self.depth -= 1
        raise StopIteration


cdef _Iter _iterate(Node root, _Loader ld, int mode, object keepalive):
    cdef _Iter it = _Iter.__new__(_Iter)
    it.stack = [root]
    it.pos[0] = 0
    it.prefix[0] = 0
    it.depth = 0
    it.mode = mode
    it.ld = ld
    it.keepalive = keepalive
    return it


# ---------------------------------------------------------------------------------------
# Invariant walker

cdef Py_ssize_t _check_node(Node node, int shift, uint64_t prefix, bint is_root,
                            object token, bint parent_owned, bint parent_persisted,
                            _Loader ld) except -1:
    cdef Py_ssize_t i, nd, nc, total
    cdef uint64_t h
    cdef Node child
    if not (node.slots != NULL and node.n <= node.cap and _entries(node) <= node.hcap):
        raise AssertionError("slot array broken")
    for i in range(node.n):
        if not (node.slots[i] != NULL):
            raise AssertionError("empty slot")
    owned = token is not None and node.owner is token
    if owned:
        if not (node.hcap >= _entries(node) + (node.cap - node.n) // 2):
            raise AssertionError("an owned node lacks hash room for its free slots")
        if not (node.ptr < 0):
            raise AssertionError("a node owned by a live mutation was persisted")
        if not parent_owned:
            raise AssertionError("an owned node is reachable through a shared parent")
    if parent_persisted:
        if not (node.ptr >= 0):
            raise AssertionError("a persisted node references an unpersisted child")
    if node.collision:
        if is_root:
            raise AssertionError("root is a collision node")
        if not (node.n % 2 == 0 and node.n >= 4):
            raise AssertionError("collision node with fewer than 2 keys")
        if not ((node.chash & _mask(shift)) == prefix):
            raise AssertionError("collision node is misplaced")
        for i in range(0, node.n, 2):
            if not (stable_hash_c(<object>node.slots[i]) == node.chash):
                raise AssertionError("collision key hash")
            if not (node.hashes[i >> 1] == node.chash):
                raise AssertionError("stored hash differs from the key's hash")
            for j in range(0, i, 2):
                if key_eq(<object>node.slots[i], <object>node.slots[j]):
                    raise AssertionError("duplicate key")
        return node.n // 2
    if not (shift <= MAX_SHIFT):
        raise AssertionError("bitmap node below the last level")
    if node.datamap & node.nodemap:
        raise AssertionError("chunk both entry and child")
    nd = pb_popcount(node.datamap)
    nc = pb_popcount(node.nodemap)
    if not (node.n == 2 * nd + nc):
        raise AssertionError("slot count disagrees with bitmaps")
    if not is_root:
        if not (nd + nc >= 2 or (nd == 0 and nc == 1)):
            raise AssertionError("non-canonical node")
    for i in range(nd):
        h = stable_hash_c(<object>node.slots[2 * i])
        if not (node.hashes[i] == h):
            raise AssertionError("stored hash differs from the key's hash")
        if not ((h & _mask(shift)) == prefix):
            raise AssertionError("key under the wrong prefix")
        if not (_bit(h, shift) == (<uint32_t>1) << _nth_bit_index(node.datamap, i)):
            raise AssertionError("key in the wrong slot")
    total = nd
    for i in range(nc):
        child = _child(node, 2 * nd + i, shift + 5,
                       prefix | ((<uint64_t>_nth_bit_index(node.nodemap, i)) << shift), ld)
        if nd == 0 and nc == 1 and not is_root:
            if child.collision:
                raise AssertionError("lone collision child not hoisted")
        total += _check_node(child, shift + 5,
                             prefix | ((<uint64_t>_nth_bit_index(node.nodemap, i)) << shift),
                             False, token, owned, node.ptr >= 0, ld)
    return total


cdef int _check(Node root, Py_ssize_t count, object token, _Loader ld) except -1:
    cdef Py_ssize_t total = _check_node(root, 0, 0, True, token, True, False, ld)
    if not (total == count):
        raise AssertionError(f"count {count} but the trie holds {total} keys")
    _check_gc(root, False)
    return 0


cdef int _check_gc(Node node, bint hidden) except -1:
    """No GC-tracked key or value below an untracked node (the collector cannot see past
    one, so a cycle through such an entry could never be collected)."""
    cdef Py_ssize_t i, nd
    cdef PyObject *o
    hidden = hidden or not PyObject_GC_IsTracked(<PyObject *>node)
    nd = node.n >> 1 if node.collision else pb_popcount(node.datamap)
    for i in range(2 * nd):
        o = node.slots[i]
        if hidden and o != NULL and PyObject_GC_IsTracked(o):
            raise AssertionError("a GC-tracked key or value below an untracked node")
    for i in range(2 * nd, node.n):
        o = node.slots[i]
        if pb_same_type(o, <PyObject *>Node):
            _check_gc(<Node>o, hidden)
    return 0


cdef void _track_all(Node node):
    """Track every node of the (fully loaded) subtree: its trie stops being atomic."""
    cdef Py_ssize_t i
    cdef PyObject *o
    if not PyObject_GC_IsTracked(<PyObject *>node):
        PyObject_GC_Track(<PyObject *>node)
    if node.collision:
        return
    for i in range(2 * pb_popcount(node.datamap), node.n):
        o = node.slots[i]
        if pb_same_type(o, <PyObject *>Node):
            _track_all(<Node>o)


cdef inline bint _atomic_entry(object key, object value):
    return not PyObject_GC_IsTracked(<PyObject *>key) and not PyObject_GC_IsTracked(<PyObject *>value)


# ---------------------------------------------------------------------------------------
# Public classes (the class structure is drawn in the module docstring)

cdef inline Node _empty():
    return _alloc(0, 0, 0, None)


cdef inline bint _is_set(object t):
    # Only for the cold shared methods; the hot ones get the kind as a constant argument.
    return isinstance(t, (HashSet, HashSetMutation))


cdef inline Node _root(_Persistent p):
    if p.root is None:
        p.root = _load_root(p.root_ptr, p.loader)
    return p.root


cdef inline _Persistent _new_persistent(Node root, Py_ssize_t count, _Loader loader,
                                        bint is_set, bint atomic):
    # Every Map/HashSet not made by __init__ comes from here (no __cinit__: `set` makes one
    # per call). The casts skip a subtype test that a typed assignment would make.
    cdef _Persistent p
    if is_set:
        p = <_Persistent>HashSet.__new__(HashSet)
    else:
        p = <_Persistent>Map.__new__(Map)
    p.root = root
    p.root_ptr = -1
    p.header_ptr = -1
    p.count = count
    p.loader = loader
    p.atomic = atomic
    return p


cdef _Transient _new_transient(bint is_set):
    if is_set:
        return <_Transient>HashSetMutation.__new__(HashSetMutation)
    return <_Transient>MapMutation.__new__(MapMutation)


cdef object _pairs(object src):
    if isinstance(src, (Map, MapMutation, dict, Mapping)):
        return src.items()
    if hasattr(src, "keys"):
        return ((k, src[k]) for k in src.keys())
    return src


cdef inline object _item(Node root, object key, _Loader ld):
    v = _find(root, key, stable_hash_c(key), ld)
    if v is _MISSING:
        raise KeyError(key)
    return v


cdef inline object _frozen_put(_Persistent p, object key, object value, bint is_set):
    """Map.set / HashSet.add: p with key -> value, or p itself when that changes nothing."""
    cdef bint added = False
    cdef uint64_t h = stable_hash_c(key)
    cdef Node root = _root(p)
    cdef Node r2
    # New path nodes only: with a tracked entry they are tracked (the shared rest holds
    # nothing tracked), so the result needs no walk.
    cdef bint atomic = p.atomic and _atomic_entry(key, value)
    cdef int prev = pb_swap_untracked_alloc(atomic)
    try:
        r2 = _persistent_assoc(root, h, key, value, p.loader, &added)
    finally:
        pb_swap_untracked_alloc(prev)
    if r2 is root:
        return p
    return _new_persistent(r2, p.count + added, p.loader, is_set, atomic)


cdef object _frozen_drop(_Persistent p, object key, bint strict, bint is_set):
    """p without key; when key is absent, KeyError if strict, else p itself."""
    cdef bint removed = False
    cdef uint64_t h = stable_hash_c(key)
    cdef Node root = _root(p)
    cdef Node r2
    cdef int prev = pb_swap_untracked_alloc(p.atomic)
    try:
        r2 = _dissoc(root, 0, h, key, None, p.loader, &removed)
    finally:
        pb_swap_untracked_alloc(prev)
    if not removed:
        if strict:
            raise KeyError(key)
        return p
    return _new_persistent(r2, p.count - 1, p.loader, is_set, p.atomic)


cdef inline int _transient_put(_Transient m, object key, object value) except -1:
    # The one path of `m[k] = v`, `m.set`, `s.add` and `update`: the key is hashed once,
    # before anything is touched.
    cdef bint added = False
    cdef uint64_t h = stable_hash_c(key)
    cdef int prev
    if m.atomic and not _atomic_entry(key, value):
        # The first tracked entry: the owned nodes edited in place from here on may be
        # untracked, so track the whole (in-memory) trie once.
        m.atomic = False
        _track_all(m.root)
    prev = pb_swap_untracked_alloc(m.atomic)
    try:
        m.root = _mut_assoc(m.root, h, key, value, m.token, m.loader, &added)
    finally:
        pb_swap_untracked_alloc(prev)
    m.count += added
    return 0


cdef int _transient_drop(_Transient m, object key, uint64_t h, bint strict) except -1:
    """Remove key (of hash h) in place; when it is absent, KeyError if strict, else nothing."""
    cdef bint removed = False
    cdef Node r2
    cdef int prev = pb_swap_untracked_alloc(m.atomic)
    try:
        r2 = _dissoc(m.root, 0, h, key, m.token, m.loader, &removed)
    finally:
        pb_swap_untracked_alloc(prev)
    if not removed:
        if strict:
            raise KeyError(key)
        return 0
    m.root = r2
    m.count -= 1
    return 0


cdef int _add_all(_Transient m, object items, bint pairs) except -1:
    # Each step stores root and count, so an item that fails leaves the earlier ones in.
    if pairs:
        for k, v in items:
            _transient_put(m, k, v)
    else:
        for k in items:
            _transient_put(m, k, None)
    return 0


cdef int _init_persistent(_Persistent p, object src, bint is_set) except -1:
    """__init__ of Map and HashSet: build src in a private mutation and keep its nodes."""
    cdef _Transient m
    p.root_ptr = -1
    p.header_ptr = -1
    if src is None:
        p.root = _empty()
        p.count = 0
        p.atomic = True
        return 0
    m = _new_transient(is_set)
    _add_all(m, src if is_set else _pairs(src), not is_set)
    p.root = m.root
    p.count = m.count
    p.atomic = m.atomic
    return 0


cdef _Iter _snapshot_iter(_Transient m, int mode):
    # Iterate a snapshot: the nodes become shared, so edits during iteration copy them.
    m.token = object()
    return _iterate(m.root, m.loader, mode, m)


cdef str _repr_items(it, bint is_set):
    parts = []
    for x in it:
        if len(parts) == 10:
            parts.append("...")
            break
        parts.append(repr(x) if is_set else f"{x[0]!r}: {x[1]!r}")
    return ", ".join(parts)


cdef object _map_eq(object self, object other):
    cdef Py_ssize_t n = len(self)
    if isinstance(other, (Map, MapMutation)):
        if len(other) != n:
            return False
        pairs = other.items()
    elif isinstance(other, Mapping):
        if len(other) != n:
            return False
        pairs = other.items()
    else:
        return NotImplemented
    for k, v in pairs:
        try:
            mine = self.get(k, _MISSING)
        except TypeError:
            return False
        if mine is _MISSING or not PyObject_RichCompareBool(mine, v, Py_EQ):
            return False
    return True


cdef object _set_eq(object self, object other):
    if isinstance(other, (HashSet, HashSetMutation, set, frozenset)):
        if len(other) != len(self):
            return False
        for x in other:
            try:
                if x not in self:
                    return False
            except TypeError:
                return False
        return True
    return NotImplemented


cdef class _TrieBase:
    """What all four public classes share: root, count, loader, len, ==, repr (internal)."""

    def __len__(self):
        return self.count

    def __eq__(self, other):
        return _set_eq(self, other) if _is_set(self) else _map_eq(self, other)

    __hash__ = None

    def __repr__(self):
        cdef bint is_set = _is_set(self)
        items = _repr_items(self._iter_mode(0 if is_set else 2), is_set)
        return f"{type(self).__name__}({{{items}}})"


cdef class _Persistent(_TrieBase):
    """Base of Map and HashSet (internal): the lazily loaded root, persistence, mutate()."""

    def __contains__(self, key):
        return _find(_root(self), key, stable_hash_c(key), self.loader) is not _MISSING

    def mutate(self):
        """A mutation starting from this structure (which never changes)."""
        cdef _Transient m = _new_transient(_is_set(self))
        m.root = _root(self)
        m.count = self.count
        m.loader = self.loader
        m.atomic = self.atomic
        return m

    def __iter__(self):
        return _iterate(_root(self), self.loader, 0, self)

    def _iter_mode(self, int mode):
        return _iterate(_root(self), self.loader, mode, self)

    def _check(self):
        """Walk every node (loading lazy ones) and raise AssertionError on a broken invariant."""
        _check(_root(self), self.count, None, self.loader)

    def _persist(self, io):
        """Write every unwritten node and a header atom; return the header's pointer."""
        cdef bint is_set = _is_set(self)
        cdef Node root = _root(self)
        if root.ptr >= 0 and self.header_ptr >= 0:
            return self.header_ptr
        root_ptr = _persist_node(root, io, is_set)
        kind = K_SET_HEADER if is_set else K_MAP_HEADER
        self.header_ptr = io.write_atom(io.encode([kind, self.count, root_ptr]))
        return self.header_ptr

    @classmethod
    def _load(cls, ptr, io):
        """The structure whose header atom is at ptr; nodes load lazily on first touch."""
        cdef bint is_set = issubclass(cls, HashSet)
        ld, count, root_ptr = _read_header(ptr, io, is_set)
        cdef _Persistent p = _new_persistent(None, count, ld, is_set, False)   # contents unknown
        p.root_ptr = root_ptr
        p.header_ptr = ptr
        return p


cdef class _Transient(_TrieBase):
    """Base of MapMutation and HashSetMutation (internal): the owner-token protocol."""

    def __cinit__(self):
        self.root = _empty()
        self.token = object()
        self.atomic = True

    def __contains__(self, key):
        return _find(self.root, key, stable_hash_c(key), self.loader) is not _MISSING

    def finish(self):
        """An immutable snapshot; this mutation goes on with a fresh owner token."""
        p = _new_persistent(self.root, self.count, self.loader, _is_set(self), self.atomic)
        self.token = object()
        return p

    def __iter__(self):
        return _snapshot_iter(self, 0)

    def _iter_mode(self, int mode):
        return _snapshot_iter(self, mode)

    def _check(self):
        """Walk every node and raise AssertionError on a broken invariant (ownership too)."""
        _check(self.root, self.count, self.token, self.loader)


def _keys(self):
    return _KeysView(self)


def _values(self):
    return _ValuesView(self)


def _items(self):
    return _ItemsView(self)


cdef class Map(_Persistent):
    """An immutable hash map: updates return new maps sharing structure with the old one."""

    def __init__(self, mapping_or_iterable=None):
        _init_persistent(self, mapping_or_iterable, False)

    def __getitem__(self, key):
        return _item(_root(self), key, self.loader)

    @cython.binding(False)     # a plain C method: the layers above call it on every read
    def get(self, key, default=None):
        v = _find(_root(self), key, stable_hash_c(key), self.loader)
        return default if v is _MISSING else v

    def set(self, key, value):
        """A map with key -> value (this map itself when that changes nothing)."""
        return _frozen_put(self, key, value, False)

    def delete(self, key):
        """A map without key; KeyError when key is absent."""
        return _frozen_drop(self, key, True, False)

    def discard(self, key):
        """A map without key (this map itself when key is absent)."""
        return _frozen_drop(self, key, False, False)

    keys = _keys
    values = _values
    items = _items

    def __reduce__(self):
        return (Map, (dict(self._iter_mode(2)),))


cdef class MapMutation(_Transient):
    """A map edited in place; finish() returns an immutable snapshot of it."""

    def __getitem__(self, key):
        return _item(self.root, key, self.loader)

    @cython.binding(False)     # a plain C method: the layers above call it on every read
    def get(self, key, default=None):
        v = _find(self.root, key, stable_hash_c(key), self.loader)
        return default if v is _MISSING else v

    def __setitem__(self, key, value):
        _transient_put(self, key, value)

    def set(self, key, value):
        _transient_put(self, key, value)

    def __delitem__(self, key):
        _transient_drop(self, key, stable_hash_c(key), True)

    def pop(self, key, default=_MISSING):
        """Remove key and return its value (default when absent; KeyError without one)."""
        cdef uint64_t h = stable_hash_c(key)
        v = _find(self.root, key, h, self.loader)
        if v is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        _transient_drop(self, key, h, True)
        return v

    def update(self, other=(), **kwargs):
        """Set every pair of a mapping or an iterable of pairs, then the keyword pairs."""
        _add_all(self, _pairs(other), True)
        _add_all(self, kwargs.items(), True)

    keys = _keys
    values = _values
    items = _items


class _KeysView(KeysView):
    __slots__ = ()

    def __iter__(self):
        return self._mapping._iter_mode(0)


class _ValuesView(ValuesView):
    __slots__ = ()

    def __iter__(self):
        return self._mapping._iter_mode(1)

    def __contains__(self, value):
        for v in self._mapping._iter_mode(1):
            if v is value or v == value:
                return True
        return False


class _ItemsView(ItemsView):
    __slots__ = ()

    def __iter__(self):
        return self._mapping._iter_mode(2)


cdef class HashSet(_Persistent):
    """An immutable hash set: updates return new sets sharing structure with the old one."""

    def __init__(self, iterable=None):
        _init_persistent(self, iterable, True)

    def add(self, key):
        """A set with key (this set itself when key is present)."""
        return _frozen_put(self, key, None, True)

    def discard(self, key):
        """A set without key (this set itself when key is absent)."""
        return _frozen_drop(self, key, False, True)

    def remove(self, key):
        """A set without key; KeyError when key is absent."""
        return _frozen_drop(self, key, True, True)

    def __reduce__(self):
        return (HashSet, (list(self),))


cdef class HashSetMutation(_Transient):
    """A set edited in place; finish() returns an immutable snapshot of it."""

    def add(self, key):
        _transient_put(self, key, None)

    def discard(self, key):
        _transient_drop(self, key, stable_hash_c(key), False)

    def remove(self, key):
        """Remove key; KeyError when it is absent."""
        _transient_drop(self, key, stable_hash_c(key), True)

    def update(self, iterable):
        """Add every element of iterable."""
        _add_all(self, iterable, False)


Mapping.register(Map)
MutableMapping.register(MapMutation)
Set.register(HashSet)
MutableSet.register(HashSetMutation)
