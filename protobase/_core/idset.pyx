# cython: language_level=3
"""Persistent sets of int64 row ids, kept in Roaring-style containers.

Why this structure
------------------
Secondary indexes map a field value to the set of row ids holding it, and query plans
combine those sets with AND / OR / ANDNOT before touching any value. Row ids are handed
out in sequence, so the sets are clustered: long dense runs, with sparse tails. A sorted
array wastes nothing on sparse sets but makes AND of two dense sets a branchy merge; a flat
bitmap makes AND one word operation per 64 ids but is huge for sparse sets. Roaring
(Lemire et al.) splits the 63-bit id space by its high bits and chooses, per 65536-id
chunk, whichever of the two is smaller. That is what this module does.

Layout
------
An id ``v`` (``0 <= v < 2**63``) splits into ``key = v >> 16`` (at most 47 bits) and
``low = v & 0xFFFF``. All ids with one key live in one container::

    IdSet(count=65541)
      conts: Python list of _Cont, ascending key, none empty
        [0] key=0  array   card=3      arr   = [5, 9, 65535]        uint16, sorted
        [1] key=1  bitmap  card=65536  words = [~0, ~0, ..., ~0]    1024 x uint64
        [2] key=9  array   card=2      arr   = [0, 7]
                    |
                    +-> ids 9 * 65536 + 0 = 589824 and 589831

A container is a small C-allocated buffer owned by a ``_Cont`` object: ``arr`` (a sorted,
duplicate-free ``uint16`` array with ``card`` used and ``cap`` allocated slots) or
``words`` (1024 ``uint64``, bit ``low`` of word ``low >> 6``). The switch rule is strict,
so every set has exactly one representation: **card <= 4096 is an array, card > 4096 a
bitmap** (4096 uint16 = 8 KiB = the size of a bitmap). Any edit or operation that crosses
the line converts. Equality and serialization rely on this canonical form.

Invariants (``_check()`` asserts all of them)
---------------------------------------------
- container keys strictly ascending, each ``< 2**47``; no container is empty;
- array containers: ``1 <= card <= 4096``, entries strictly ascending, ``card <= cap``;
- bitmap containers: ``4096 < card <= 65536`` and ``card`` equals the popcount;
- ``IdSet.count`` is the sum of the cards, so ``len()`` is O(1).

Persistence (the common shape of docs/internals.md)
---------------------------------------------------
An ``IdSet`` never changes. ``s.add(i)`` copies the one container ``i`` falls in (at most
8 KiB) and the list of container pointers (one pointer per 65536-id chunk), and shares
every other container with ``s``. ``s.mutate()`` gives an ``IdSetMutation`` holding a
fresh owner token: a container is edited in place only if its ``owner`` is that token
(the mutation made it); any other container is copied once, then owned. ``finish()``
returns an ``IdSet`` over the current containers and gives the mutation a new token, so
later edits copy instead of touching the snapshot. Old versions therefore never change.

Set algebra
-----------
Two sets are combined by walking their key lists together. Keys on one side only are
shared (OR, XOR, ANDNOT) or skipped (AND; the AND walk gallops over the longer key list),
and a container that both sides share by identity is reused or dropped without looking
inside. Matching keys run a C kernel chosen by the pair of kinds, all ``nogil`` on raw
buffers, never creating Python objects per id:

    array  & array    merge, or galloping search when one is > 32x the other
    array  & bitmap   probe one bit per array entry
    bitmap & bitmap   1024 word ANDs with popcount
    OR / ANDNOT / XOR the same three shapes (merges; bit set/clear/flip; word ops)

The bitmap word loops are the hot spot of dense sets and are bound by popcount. Builds
use no -march flags, so the C block below compiles them three times (portable C, POPCNT,
AVX2 with a nibble-lookup popcount) via function target attributes, and the import picks
the best the CPU supports (``WORD_KERNELS`` names it).

Results are normalized to the switch rule (a bitmap AND of few bits becomes an array).
``intersection_count`` runs the counting twins of the AND kernels and allocates nothing.
``intersect_many`` intersects smallest first and stops at the first empty result;
``union_many`` groups all containers by key and ORs each group into one bitmap.

Bulk construction: ``IdSet.from_groups(lists)`` builds one set per list in a single C
loop (an index build makes one posting per distinct field value, most of them a single
id: one array container of one entry, no Python call per posting).

Containers, sets and their iterators are not tracked by Python's cyclic garbage
collector (``no_gc``): they reference only containers and plain ``object()`` owner
tokens, so they can never be part of a reference cycle, and a loaded index leaf holds
dozens of them; tracking them would only make every collection walk them.

Complexity (n ids, C containers, w = 1024 words): membership O(log C + log 4096);
``add``/``discard`` O(C) pointer copy + one container copy (<= 8 KiB); AND/OR of two
dense sets O(C * w) word operations; AND of m ids against a large set O(m) probes plus
O(log) galloping between keys; ``len`` O(1); iteration and ``to_numpy`` O(n).
The pointer-list copy in ``add`` is 8 bytes per 65536-id chunk: 128 bytes for a million
dense ids. Sets spread over very many chunks are better built with ``mutate()``.

Serialized layout (``to_bytes``; all integers little-endian)
------------------------------------------------------------
::

    offset  size  field
    0       4     magic  b"PBIS"
    4       1     version = 1
    5       3     reserved, must be 0
    8       8     count: total number of ids
    16      4     C: number of containers
    20      ...   C containers, each:
                    8  key   (< 2**47, strictly ascending)
                    4  card  (1 .. 65536)
                    card <= 4096: card x uint16 entries, strictly ascending
                    card >  4096: 1024 x uint64 bitmap words, popcount == card

``from_bytes`` checks every field (magic, version, reserved bytes, bounds before every
read, key order and range, entry order, popcounts, the total count, no trailing bytes)
and raises ``protobase.errors.DecodeError`` on the first violation. A forged container
count cannot cause a large allocation: it is checked against the bytes actually present
(each container needs at least 14) before anything is allocated.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItemWithError
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy, memmove

from protobase.errors import DecodeError

cdef extern from *:
    const char *PB_SOURCE_DIGEST
__source_digest__ = PB_SOURCE_DIGEST.decode("ascii")

__all__ = ["IdSet", "IdSetMutation", "MAX_ID"]

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline int pb_ctz64(uint64_t x) { return __builtin_ctzll(x); }
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define PB_LE16(x) __builtin_bswap16(x)
    #define PB_LE32(x) __builtin_bswap32(x)
    #define PB_LE64(x) __builtin_bswap64(x)
    #else
    #define PB_LE16(x) (x)
    #define PB_LE32(x) (x)
    #define PB_LE64(x) (x)
    #endif
    static inline uint16_t pb_get16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return PB_LE16(v); }
    static inline uint32_t pb_get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return PB_LE32(v); }
    static inline uint64_t pb_get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return PB_LE64(v); }
    static inline void pb_put16(unsigned char *p, uint16_t v) { v = PB_LE16(v); memcpy(p, &v, 2); }
    static inline void pb_put32(unsigned char *p, uint32_t v) { v = PB_LE32(v); memcpy(p, &v, 4); }
    static inline void pb_put64(unsigned char *p, uint64_t v) { v = PB_LE64(v); memcpy(p, &v, 8); }

    /* Word kernels over two 1024-word bitmaps. They dominate dense AND/OR, and their cost
       is the popcount. Without -march flags the compiler emits a slow bit-twiddling
       popcount, so on x86-64 two more copies are compiled with function target attributes
       (POPCNT; AVX2 with Mula's nibble-lookup popcount) and the best one the CPU supports
       is chosen once at import. op: 0 AND, 1 OR, 2 ANDNOT, 3 XOR; out == NULL counts
       without storing. */
    #define PB_WORDS 1024
    #define PB_WORD_LOOP(EXPR) \
        int32_t n = 0; int i; \
        if (out == NULL) { for (i = 0; i < PB_WORDS; i++) n += __builtin_popcountll(EXPR); return n; } \
        for (i = 0; i < PB_WORDS; i++) { uint64_t x = (EXPR); out[i] = x; n += __builtin_popcountll(x); } \
        return n;
    #define PB_DEFINE_WORD_KERNELS(SUFFIX, ATTR) \
        ATTR static int32_t pb_wand_##SUFFIX(const uint64_t *a, const uint64_t *b, uint64_t *out) { PB_WORD_LOOP(a[i] & b[i]) } \
        ATTR static int32_t pb_wor_##SUFFIX(const uint64_t *a, const uint64_t *b, uint64_t *out) { PB_WORD_LOOP(a[i] | b[i]) } \
        ATTR static int32_t pb_wandnot_##SUFFIX(const uint64_t *a, const uint64_t *b, uint64_t *out) { PB_WORD_LOOP(a[i] & ~b[i]) } \
        ATTR static int32_t pb_wxor_##SUFFIX(const uint64_t *a, const uint64_t *b, uint64_t *out) { PB_WORD_LOOP(a[i] ^ b[i]) } \
        ATTR static int32_t pb_wcount_##SUFFIX(const uint64_t *a) { int32_t n = 0; int i; for (i = 0; i < PB_WORDS; i++) n += __builtin_popcountll(a[i]); return n; }
    typedef int32_t (*pb_wop_fn)(const uint64_t *, const uint64_t *, uint64_t *);
    typedef int32_t (*pb_wcount_fn)(const uint64_t *);
    PB_DEFINE_WORD_KERNELS(generic, )
    static pb_wop_fn pb_wops[4] = {pb_wand_generic, pb_wor_generic, pb_wandnot_generic, pb_wxor_generic};
    static pb_wcount_fn pb_wcount = pb_wcount_generic;

    #if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    #include <immintrin.h>
    PB_DEFINE_WORD_KERNELS(popcnt, __attribute__((target("popcnt"))))

    /* Per-64-bit-lane popcount of a 256-bit vector: two 16-entry nibble lookups (pshufb)
       give per-byte counts, and a sum of absolute differences against zero adds the 8
       bytes of each lane. */
    __attribute__((target("avx2"))) static inline __m256i pb_popcount256(__m256i v) {
        const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                               0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
        const __m256i nibble = _mm256_set1_epi8(0x0f);
        __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, nibble));
        __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble));
        return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
    }
    __attribute__((target("avx2"))) static inline int32_t pb_sum256(__m256i acc) {
        uint64_t lanes[4];
        _mm256_storeu_si256((__m256i *)lanes, acc);
        return (int32_t)(lanes[0] + lanes[1] + lanes[2] + lanes[3]);
    }
    #define PB_AVX2_LOOP(EXPR) \
        __m256i acc = _mm256_setzero_si256(), va, vb, x; int i; \
        if (out == NULL) { \
            for (i = 0; i < PB_WORDS; i += 4) { \
                va = _mm256_loadu_si256((const __m256i *)(a + i)); vb = _mm256_loadu_si256((const __m256i *)(b + i)); \
                x = (EXPR); acc = _mm256_add_epi64(acc, pb_popcount256(x)); } \
            return pb_sum256(acc); } \
        for (i = 0; i < PB_WORDS; i += 4) { \
            va = _mm256_loadu_si256((const __m256i *)(a + i)); vb = _mm256_loadu_si256((const __m256i *)(b + i)); \
            x = (EXPR); _mm256_storeu_si256((__m256i *)(out + i), x); acc = _mm256_add_epi64(acc, pb_popcount256(x)); } \
        return pb_sum256(acc);
    __attribute__((target("avx2"))) static int32_t pb_wand_avx2(const uint64_t *a, const uint64_t *b, uint64_t *out) { PB_AVX2_LOOP(_mm256_and_si256(va, vb)) }
    __attribute__((target("avx2"))) static int32_t pb_wor_avx2(const uint64_t *a, const uint64_t *b, uint64_t *out) { PB_AVX2_LOOP(_mm256_or_si256(va, vb)) }
    __attribute__((target("avx2"))) static int32_t pb_wandnot_avx2(const uint64_t *a, const uint64_t *b, uint64_t *out) { PB_AVX2_LOOP(_mm256_andnot_si256(vb, va)) }
    __attribute__((target("avx2"))) static int32_t pb_wxor_avx2(const uint64_t *a, const uint64_t *b, uint64_t *out) { PB_AVX2_LOOP(_mm256_xor_si256(va, vb)) }
    __attribute__((target("avx2"))) static int32_t pb_wcount_avx2(const uint64_t *a) {
        __m256i acc = _mm256_setzero_si256(); int i;
        for (i = 0; i < PB_WORDS; i += 4)
            acc = _mm256_add_epi64(acc, pb_popcount256(_mm256_loadu_si256((const __m256i *)(a + i))));
        return pb_sum256(acc);
    }
    /* Installs the best kernels at or below `wanted` (2: AVX2, 1: POPCNT, 0: portable C)
       that this CPU supports, and returns the level installed. */
    static int pb_select_word_kernels(int wanted) {
        __builtin_cpu_init();
        if (wanted >= 2 && __builtin_cpu_supports("avx2")) {
            pb_wops[0] = pb_wand_avx2; pb_wops[1] = pb_wor_avx2;
            pb_wops[2] = pb_wandnot_avx2; pb_wops[3] = pb_wxor_avx2;
            pb_wcount = pb_wcount_avx2;
            return 2;
        }
        if (wanted >= 1 && __builtin_cpu_supports("popcnt")) {
            pb_wops[0] = pb_wand_popcnt; pb_wops[1] = pb_wor_popcnt;
            pb_wops[2] = pb_wandnot_popcnt; pb_wops[3] = pb_wxor_popcnt;
            pb_wcount = pb_wcount_popcnt;
            return 1;
        }
        pb_wops[0] = pb_wand_generic; pb_wops[1] = pb_wor_generic;
        pb_wops[2] = pb_wandnot_generic; pb_wops[3] = pb_wxor_generic;
        pb_wcount = pb_wcount_generic;
        return 0;
    }
    #else
    static int pb_select_word_kernels(int wanted) { (void)wanted; return 0; }
    #endif
    """
    int pb_ctz64(uint64_t x) noexcept nogil
    int __builtin_clzll(unsigned long long x) noexcept nogil
    uint16_t pb_get16(const unsigned char *p) noexcept nogil
    uint32_t pb_get32(const unsigned char *p) noexcept nogil
    uint64_t pb_get64(const unsigned char *p) noexcept nogil
    void pb_put16(unsigned char *p, uint16_t v) noexcept nogil
    void pb_put32(unsigned char *p, uint32_t v) noexcept nogil
    void pb_put64(unsigned char *p, uint64_t v) noexcept nogil
    ctypedef int32_t (*pb_wop_fn)(const uint64_t *, const uint64_t *, uint64_t *) noexcept nogil
    ctypedef int32_t (*pb_wcount_fn)(const uint64_t *) noexcept nogil
    pb_wop_fn pb_wops[4]
    pb_wcount_fn pb_wcount
    int pb_select_word_kernels(int wanted) noexcept nogil

_KERNEL_NAMES = ("portable", "popcnt", "avx2")


def _use_word_kernels(name):
    """Switches the bitmap word kernels to `name` or the best below it that this CPU
    supports, and returns the name installed. For tests, which must exercise every variant
    whatever machine they run on; not thread-safe."""
    global WORD_KERNELS
    WORD_KERNELS = _KERNEL_NAMES[pb_select_word_kernels(_KERNEL_NAMES.index(name))]
    return WORD_KERNELS


# Which bitmap word kernels this CPU runs (see the C block above); chosen at import.
WORD_KERNELS = _use_word_kernels("avx2")

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1
    object PyNumber_Index(object o)

MAX_ID = (1 << 63) - 1

cdef enum:
    WORDS = 1024            # uint64 words in a bitmap container
    ARRAY_MAX = 4096        # largest array container; above it, a bitmap
    GALLOP_RATIO = 32       # array & array switches from merge to galloping beyond this skew
    HEADER = 20             # serialized header bytes
    CONT_HEADER = 12        # serialized bytes before each container's payload

cdef enum:
    OP_AND = 0
    OP_OR = 1               # also "set" for bits_apply
    OP_ANDNOT = 2           # also "clear"
    OP_XOR = 3              # also "flip"

cdef int64_t MAX_KEY = (<int64_t>1) << 47      # keys of ids below 2**63

cdef bytes MAGIC = b"PBIS"
cdef int VERSION = 1

# ---------------------------------------------------------------------------------------
# C kernels on raw buffers: no Python objects, no GIL.
# ---------------------------------------------------------------------------------------

cdef inline bint bm_get(const uint64_t *w, uint32_t v) noexcept nogil:
    return (w[v >> 6] >> (v & 63)) & 1

cdef inline int32_t bm_popcount(const uint64_t *w) noexcept nogil:
    return pb_wcount(w)

cdef inline int32_t bm_to_arr(const uint64_t *w, uint16_t *out) noexcept nogil:
    cdef int32_t n = 0
    cdef int i
    cdef uint64_t x
    for i in range(WORDS):
        x = w[i]
        while x:
            out[n] = <uint16_t>((i << 6) + pb_ctz64(x))
            n += 1
            x &= x - 1
    return n

cdef inline void arr_to_bm(const uint16_t *a, int32_t n, uint64_t *w) noexcept nogil:
    cdef int32_t i
    for i in range(n):
        w[a[i] >> 6] |= (<uint64_t>1) << (a[i] & 63)

cdef inline int32_t arr_lower_bound(const uint16_t *a, int32_t lo, int32_t hi, uint16_t v) noexcept nogil:
    # First index in [lo, hi) with a[index] >= v.
    cdef int32_t mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo

cdef inline int32_t gallop(const uint16_t *a, int32_t lo, int32_t n, uint16_t v) noexcept nogil:
    # First index >= lo with a[index] >= v, searching exponentially from lo: cost is
    # logarithmic in the distance moved, which is what makes skewed intersections cheap.
    cdef int32_t step = 1, hi = lo
    if lo >= n or a[lo] >= v:
        return lo
    while hi < n and a[hi] < v:
        lo = hi + 1
        hi += step
        step <<= 1
    if hi > n:
        hi = n
    return arr_lower_bound(a, lo, hi, v)

cdef int32_t and_aa(const uint16_t *a, int32_t na, const uint16_t *b, int32_t nb,
                    uint16_t *out) noexcept nogil:
    # out may be NULL: count only.
    cdef int32_t i = 0, j = 0, n = 0
    cdef const uint16_t *t
    if na > nb:
        t = a; a = b; b = t
        i = na; na = nb; nb = i; i = 0
    if <int64_t>na * GALLOP_RATIO < nb:
        for i in range(na):
            j = gallop(b, j, nb, a[i])
            if j >= nb:
                break
            if b[j] == a[i]:
                if out != NULL:
                    out[n] = a[i]
                n += 1
        return n
    while i < na and j < nb:
        if a[i] < b[j]:
            i += 1
        elif a[i] > b[j]:
            j += 1
        else:
            if out != NULL:
                out[n] = a[i]
            n += 1
            i += 1
            j += 1
    return n

cdef int32_t and_ab(const uint16_t *a, int32_t na, const uint64_t *w, uint16_t *out) noexcept nogil:
    cdef int32_t i, n = 0
    for i in range(na):
        if bm_get(w, a[i]):
            if out != NULL:
                out[n] = a[i]
            n += 1
    return n

cdef inline int32_t and_bb(const uint64_t *a, const uint64_t *b, uint64_t *out) noexcept nogil:
    # out may be NULL: count only.
    return pb_wops[OP_AND](a, b, out)

cdef int32_t or_aa(const uint16_t *a, int32_t na, const uint16_t *b, int32_t nb,
                   uint16_t *out) noexcept nogil:
    cdef int32_t i = 0, j = 0, n = 0
    while i < na and j < nb:
        if a[i] < b[j]:
            out[n] = a[i]; i += 1
        elif a[i] > b[j]:
            out[n] = b[j]; j += 1
        else:
            out[n] = a[i]; i += 1; j += 1
        n += 1
    while i < na:
        out[n] = a[i]; i += 1; n += 1
    while j < nb:
        out[n] = b[j]; j += 1; n += 1
    return n

cdef int32_t xor_aa(const uint16_t *a, int32_t na, const uint16_t *b, int32_t nb,
                    uint16_t *out) noexcept nogil:
    cdef int32_t i = 0, j = 0, n = 0
    while i < na and j < nb:
        if a[i] < b[j]:
            out[n] = a[i]; i += 1; n += 1
        elif a[i] > b[j]:
            out[n] = b[j]; j += 1; n += 1
        else:
            i += 1; j += 1
    while i < na:
        out[n] = a[i]; i += 1; n += 1
    while j < nb:
        out[n] = b[j]; j += 1; n += 1
    return n

cdef int32_t andnot_aa(const uint16_t *a, int32_t na, const uint16_t *b, int32_t nb,
                       uint16_t *out) noexcept nogil:
    cdef int32_t i = 0, j = 0, n = 0
    while i < na:
        if nb > GALLOP_RATIO * na:
            j = gallop(b, j, nb, a[i])
        else:
            while j < nb and b[j] < a[i]:
                j += 1
        if j >= nb or b[j] != a[i]:
            out[n] = a[i]
            n += 1
        i += 1
    return n

cdef int32_t andnot_ab(const uint16_t *a, int32_t na, const uint64_t *w, uint16_t *out) noexcept nogil:
    cdef int32_t i, n = 0
    for i in range(na):
        if not bm_get(w, a[i]):
            out[n] = a[i]
            n += 1
    return n

cdef inline int32_t word_op(const uint64_t *a, const uint64_t *b, uint64_t *out, int op) noexcept nogil:
    return pb_wops[op](a, b, out)

cdef int32_t bits_apply(uint64_t *w, int32_t card, const uint16_t *a, int32_t na, int op) noexcept nogil:
    # Applies an array to a bitmap in place (op: 1 set, 2 clear, 3 flip) and returns the
    # new cardinality without a second popcount pass.
    cdef int32_t i
    cdef uint64_t bit
    cdef uint32_t k
    for i in range(na):
        k = a[i] >> 6
        bit = (<uint64_t>1) << (a[i] & 63)
        if op == 1:
            if not (w[k] & bit):
                card += 1
            w[k] |= bit
        elif op == 2:
            if w[k] & bit:
                card -= 1
            w[k] &= ~bit
        else:
            card += -1 if (w[k] & bit) else 1
            w[k] ^= bit
    return card

cdef void bm_fill_range(uint64_t *w, uint32_t lo, uint32_t hi) noexcept nogil:
    # Sets bits [lo, hi) (hi <= 65536).
    cdef uint32_t v = lo
    while v < hi and (v & 63):
        w[v >> 6] |= (<uint64_t>1) << (v & 63)
        v += 1
    while v + 64 <= hi:
        w[v >> 6] = ~(<uint64_t>0)
        v += 64
    while v < hi:
        w[v >> 6] |= (<uint64_t>1) << (v & 63)
        v += 1

cdef int _cmp_i64(const void *x, const void *y) noexcept nogil:
    cdef int64_t a = (<const int64_t *>x)[0], b = (<const int64_t *>y)[0]
    return (a > b) - (a < b)

# ---------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------

@cython.final
@cython.freelist(64)
@cython.no_gc
cdef class _Cont:
    def __dealloc__(self):
        free(self.arr)
        free(self.words)


cdef inline _Cont _new_array(int64_t key, int32_t cap):
    cdef _Cont c = _Cont.__new__(_Cont)
    c.key = key
    if cap < 1:
        cap = 1
    c.arr = <uint16_t *>malloc(<size_t>cap * sizeof(uint16_t))
    if c.arr == NULL:
        raise MemoryError()
    c.cap = cap
    return c


cdef inline _Cont _new_bitmap(int64_t key, bint zero):
    cdef _Cont c = _Cont.__new__(_Cont)
    c.key = key
    c.words = <uint64_t *>(calloc(WORDS, sizeof(uint64_t)) if zero else malloc(WORDS * sizeof(uint64_t)))
    if c.words == NULL:
        raise MemoryError()
    return c


cdef inline uint64_t *_alloc_words(bint zero) except NULL:
    cdef uint64_t *w = <uint64_t *>(calloc(WORDS, sizeof(uint64_t)) if zero else malloc(WORDS * sizeof(uint64_t)))
    if w == NULL:
        raise MemoryError()
    return w


cdef inline uint16_t *_alloc_arr(int32_t n) except NULL:
    cdef uint16_t *a = <uint16_t *>malloc(<size_t>(n if n > 0 else 1) * sizeof(uint16_t))
    if a == NULL:
        raise MemoryError()
    return a


cdef object _from_words(int64_t key, uint64_t *w, int32_t card):
    """Container from a bitmap buffer the caller hands over (freed or adopted here)."""
    cdef _Cont c
    if card == 0:
        free(w)
        return None
    if card > ARRAY_MAX:
        c = _Cont.__new__(_Cont)
        c.key = key
        c.words = w
        c.card = card
        return c
    try:
        c = _new_array(key, card)
    except MemoryError:
        free(w)
        raise
    with nogil:
        bm_to_arr(w, c.arr)
    free(w)
    c.card = card
    return c


cdef object _from_arr(int64_t key, uint16_t *a, int32_t n):
    """Container from a sorted array buffer the caller hands over (freed or adopted here)."""
    cdef _Cont c
    cdef uint16_t *shrunk
    if n == 0:
        free(a)
        return None
    if n > ARRAY_MAX:
        try:
            c = _new_bitmap(key, True)
        except MemoryError:
            free(a)
            raise
        arr_to_bm(a, n, c.words)
        free(a)
        c.card = n
        return c
    c = _Cont.__new__(_Cont)
    c.key = key
    shrunk = <uint16_t *>realloc(a, <size_t>n * sizeof(uint16_t))
    c.arr = shrunk if shrunk != NULL else a
    c.cap = n
    c.card = n
    return c


cdef _Cont _clone(_Cont c, object owner, int32_t slack):
    cdef _Cont r
    if c.words != NULL:
        r = _new_bitmap(c.key, False)
        memcpy(r.words, c.words, WORDS * sizeof(uint64_t))
    else:
        r = _new_array(c.key, min(c.card + slack, ARRAY_MAX))
        memcpy(r.arr, c.arr, <size_t>c.card * sizeof(uint16_t))
    r.card = c.card
    r.owner = owner
    return r


cdef inline bint _cont_has(_Cont c, uint16_t low) noexcept:
    cdef int32_t i
    if c.words != NULL:
        return bm_get(c.words, low)
    i = arr_lower_bound(c.arr, 0, c.card, low)
    return i < c.card and c.arr[i] == low


cdef bint _insert(_Cont c, uint16_t low) except -1:
    """Adds low to a container this caller owns; returns whether it was new."""
    cdef int32_t i, newcap
    cdef uint16_t *grown
    cdef uint64_t *w
    cdef uint64_t bit
    if c.words != NULL:
        bit = (<uint64_t>1) << (low & 63)
        if c.words[low >> 6] & bit:
            return False
        c.words[low >> 6] |= bit
        c.card += 1
        return True
    i = arr_lower_bound(c.arr, 0, c.card, low)
    if i < c.card and c.arr[i] == low:
        return False
    if c.card == ARRAY_MAX:
        w = _alloc_words(True)
        arr_to_bm(c.arr, c.card, w)
        w[low >> 6] |= (<uint64_t>1) << (low & 63)
        free(c.arr)
        c.arr = NULL
        c.cap = 0
        c.words = w
        c.card += 1
        return True
    if c.card == c.cap:
        newcap = min(c.cap + (c.cap >> 1) + 4, ARRAY_MAX)
        grown = <uint16_t *>realloc(c.arr, <size_t>newcap * sizeof(uint16_t))
        if grown == NULL:
            raise MemoryError()
        c.arr = grown
        c.cap = newcap
    memmove(c.arr + i + 1, c.arr + i, <size_t>(c.card - i) * sizeof(uint16_t))
    c.arr[i] = low
    c.card += 1
    return True


cdef bint _remove(_Cont c, uint16_t low) except -1:
    """Removes low from a container this caller owns; returns whether it was present."""
    cdef int32_t i
    cdef uint16_t *a
    cdef uint64_t bit
    if c.words != NULL:
        bit = (<uint64_t>1) << (low & 63)
        if not (c.words[low >> 6] & bit):
            return False
        if c.card == ARRAY_MAX + 1:
            a = _alloc_arr(ARRAY_MAX)
            c.words[low >> 6] &= ~bit
            bm_to_arr(c.words, a)
            free(c.words)
            c.words = NULL
            c.arr = a
            c.cap = ARRAY_MAX
        else:
            c.words[low >> 6] &= ~bit
        c.card -= 1
        return True
    i = arr_lower_bound(c.arr, 0, c.card, low)
    if i >= c.card or c.arr[i] != low:
        return False
    memmove(c.arr + i, c.arr + i + 1, <size_t>(c.card - i - 1) * sizeof(uint16_t))
    c.card -= 1
    return True


# Binary operations on two containers with equal keys. Each returns a new container or
# None when the result is empty; the inputs are never modified.
cdef object _cont_op(_Cont a, _Cont b, int op):
    cdef int64_t key = a.key
    cdef uint16_t *buf
    cdef uint64_t *w
    cdef int32_t n
    if a.arr != NULL and b.arr != NULL:
        if op == OP_AND:
            buf = _alloc_arr(min(a.card, b.card))
            with nogil:
                n = and_aa(a.arr, a.card, b.arr, b.card, buf)
        elif op == OP_ANDNOT:
            buf = _alloc_arr(a.card)
            with nogil:
                n = andnot_aa(a.arr, a.card, b.arr, b.card, buf)
        else:
            buf = _alloc_arr(a.card + b.card)
            with nogil:
                if op == OP_OR:
                    n = or_aa(a.arr, a.card, b.arr, b.card, buf)
                else:
                    n = xor_aa(a.arr, a.card, b.arr, b.card, buf)
        return _from_arr(key, buf, n)
    if a.words != NULL and b.words != NULL:
        w = _alloc_words(False)
        with nogil:
            if op == OP_AND:
                n = and_bb(a.words, b.words, w)
            else:
                n = word_op(a.words, b.words, w, op)
        return _from_words(key, w, n)
    if a.arr != NULL:           # a array, b bitmap
        if op == OP_AND or op == OP_ANDNOT:
            buf = _alloc_arr(a.card)
            with nogil:
                n = and_ab(a.arr, a.card, b.words, buf) if op == OP_AND else andnot_ab(a.arr, a.card, b.words, buf)
            return _from_arr(key, buf, n)
        w = _alloc_words(False)
        memcpy(w, b.words, WORDS * sizeof(uint64_t))
        with nogil:
            n = bits_apply(w, b.card, a.arr, a.card, op)
        return _from_words(key, w, n)
    # a bitmap, b array
    if op == OP_AND:
        buf = _alloc_arr(b.card)
        with nogil:
            n = and_ab(b.arr, b.card, a.words, buf)
        return _from_arr(key, buf, n)
    w = _alloc_words(False)
    memcpy(w, a.words, WORDS * sizeof(uint64_t))
    with nogil:
        n = bits_apply(w, a.card, b.arr, b.card, op)
    return _from_words(key, w, n)


cdef int32_t _cont_and_count(_Cont a, _Cont b) noexcept:
    if a is b:
        return a.card
    if a.arr != NULL and b.arr != NULL:
        return and_aa(a.arr, a.card, b.arr, b.card, NULL)
    if a.words != NULL and b.words != NULL:
        return and_bb(a.words, b.words, NULL)
    if a.arr != NULL:
        return and_ab(a.arr, a.card, b.words, NULL)
    return and_ab(b.arr, b.card, a.words, NULL)


# ---------------------------------------------------------------------------------------
# Container lists
# ---------------------------------------------------------------------------------------

cdef inline int64_t _key_at(list conts, Py_ssize_t i):
    return (<_Cont>conts[i]).key


cdef Py_ssize_t _find(list conts, int64_t key):
    """First index whose container key is >= key."""
    cdef Py_ssize_t lo = 0, hi = len(conts), mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if _key_at(conts, mid) < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef Py_ssize_t _seek(list conts, Py_ssize_t lo, int64_t key):
    """Like _find but galloping forward from lo: O(log distance)."""
    cdef Py_ssize_t n = len(conts), step = 1, hi = lo, mid
    while hi < n and _key_at(conts, hi) < key:
        lo = hi + 1
        hi += step
        step <<= 1
    if hi > n:
        hi = n
    while lo < hi:
        mid = (lo + hi) >> 1
        if _key_at(conts, mid) < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef int64_t _as_id(object i) except -1:
    cdef int overflow = 0
    cdef long long v
    if not isinstance(i, int):
        try:
            i = PyNumber_Index(i)
        except TypeError:
            raise TypeError(f"row ids are ints, not {type(i).__name__}") from None
    v = PyLong_AsLongLongAndOverflow(i, &overflow)
    if overflow or v < 0:
        raise ValueError(f"row id {i!r} is outside [0, 2**63)")
    return v


cdef int64_t _probe_id(object i):
    """The id for a membership test, or -1 when i can never be a member."""
    cdef int overflow = 0
    cdef long long v
    if not isinstance(i, int):
        try:
            i = PyNumber_Index(i)
        except TypeError:
            return -1
    v = PyLong_AsLongLongAndOverflow(i, &overflow)
    if overflow or v < 0:
        return -1
    return v


cdef bint _conts_has(list conts, int64_t v):
    cdef int64_t key = v >> 16
    cdef Py_ssize_t i = _find(conts, key)
    if i < len(conts):
        c = <_Cont>conts[i]
        if c.key == key:
            return _cont_has(c, <uint16_t>(v & 0xFFFF))
    return False


cdef list _build_sorted(const int64_t *ids, Py_ssize_t n):
    """Containers for ids sorted ascending (duplicates allowed), all in [0, 2**63)."""
    cdef list out = []
    cdef Py_ssize_t s = 0, e, k
    cdef int64_t key
    cdef int32_t m
    cdef uint16_t *buf
    cdef uint64_t *w
    cdef uint16_t low
    while s < n:
        key = ids[s] >> 16
        e = s + 1
        while e < n and (ids[e] >> 16) == key:
            e += 1
        if e - s > ARRAY_MAX:
            w = _alloc_words(True)
            with nogil:
                for k in range(s, e):
                    low = <uint16_t>(ids[k] & 0xFFFF)
                    w[low >> 6] |= (<uint64_t>1) << (low & 63)
                m = bm_popcount(w)
            c = _from_words(key, w, m)
        else:
            buf = _alloc_arr(<int32_t>(e - s))
            m = 0
            with nogil:
                for k in range(s, e):
                    low = <uint16_t>(ids[k] & 0xFFFF)
                    if m == 0 or buf[m - 1] != low:
                        buf[m] = low
                        m += 1
            c = _from_arr(key, buf, m)
        out.append(c)
        s = e
    return out


cdef int64_t _total(list conts):
    cdef int64_t t = 0
    for c in conts:
        t += (<_Cont>c).card
    return t


# Passed by _make to skip the empty container list __cinit__ would build and drop.
cdef object _FILLED_BY_MAKE = object()


cdef IdSet _make(list conts, int64_t count):
    cdef IdSet s = IdSet.__new__(IdSet, _FILLED_BY_MAKE)
    s.conts = conts
    s.count = count
    return s


cdef IdSet _from_id_buffer(int64_t *ids, Py_ssize_t n):
    """IdSet from a caller-owned buffer of validated ids in any order (may be sorted here)."""
    cdef Py_ssize_t i
    cdef bint ordered = True
    with nogil:
        for i in range(1, n):
            if ids[i] < ids[i - 1]:
                ordered = False
                break
        if not ordered:
            qsort(ids, n, sizeof(int64_t), _cmp_i64)
    conts = _build_sorted(ids, n)
    return _make(conts, _total(conts))


cdef IdSet _binop(IdSet x, IdSet y, int op):
    cdef list xa = x.conts, ya = y.conts, out = []
    cdef Py_ssize_t i = 0, j = 0, nx = len(xa), ny = len(ya)
    cdef int64_t total = 0
    cdef _Cont a, b
    while i < nx and j < ny:
        a = <_Cont>xa[i]
        b = <_Cont>ya[j]
        if a.key < b.key:
            if op == OP_AND:
                i = _seek(xa, i + 1, b.key)
                continue
            out.append(a)
            total += a.card
            i += 1
        elif a.key > b.key:
            if op == OP_AND:
                j = _seek(ya, j + 1, a.key)
                continue
            if op != OP_ANDNOT:
                out.append(b)
                total += b.card
            j += 1
        else:
            if a is b:          # shared by two versions: no need to look inside
                if op == OP_AND or op == OP_OR:
                    out.append(a)
                    total += a.card
            else:
                r = _cont_op(a, b, op)
                if r is not None:
                    out.append(r)
                    total += (<_Cont>r).card
            i += 1
            j += 1
    if op != OP_AND:
        while i < nx:
            a = <_Cont>xa[i]
            out.append(a)
            total += a.card
            i += 1
        if op != OP_ANDNOT:
            while j < ny:
                b = <_Cont>ya[j]
                out.append(b)
                total += b.card
                j += 1
    return _make(out, total)


cdef IdSet _coerce(object other):
    if isinstance(other, IdSet):
        return <IdSet>other
    return None


cdef int _check_conts(list conts, int64_t count) except -1:
    # Explicit raises, not `assert`: release builds compile assertions out.
    cdef int64_t prev = -1, total = 0
    cdef int32_t k
    cdef _Cont c
    for obj in conts:
        if type(obj) is not _Cont:
            raise AssertionError("container list holds a non-container")
        c = <_Cont>obj
        if not (0 <= c.key < MAX_KEY):
            raise AssertionError(f"container key {c.key} out of range")
        if c.key <= prev:
            raise AssertionError(f"container keys not strictly ascending at {c.key}")
        prev = c.key
        if (c.arr == NULL) == (c.words == NULL):
            raise AssertionError(f"container {c.key} must be exactly one kind")
        if c.card <= 0:
            raise AssertionError(f"empty container {c.key}")
        if c.arr != NULL:
            if c.card > ARRAY_MAX:
                raise AssertionError(f"array container {c.key} holds {c.card} > {ARRAY_MAX}")
            if c.card > c.cap:
                raise AssertionError(f"array container {c.key} overflows its buffer")
            for k in range(1, c.card):
                if c.arr[k - 1] >= c.arr[k]:
                    raise AssertionError(f"array container {c.key} not strictly ascending at {k}")
        else:
            if c.card <= ARRAY_MAX:
                raise AssertionError(f"bitmap container {c.key} holds only {c.card}")
            if bm_popcount(c.words) != c.card:
                raise AssertionError(f"bitmap container {c.key} count is stale")
        total += c.card
    if total != count:
        raise AssertionError(f"cached count {count} != {total}")
    return 0


# ---------------------------------------------------------------------------------------
# Iteration
# ---------------------------------------------------------------------------------------

@cython.final
@cython.freelist(8)
@cython.no_gc
cdef class _IdIter:
    cdef list conts
    cdef Py_ssize_t ci
    cdef int32_t pos          # array: next index; bitmap: word index
    cdef uint64_t bits        # bitmap: bits of the current word not yet yielded
    cdef int64_t base

    def __iter__(self):
        return self

    def __next__(self):
        cdef _Cont c
        cdef int t
        while self.ci < len(self.conts):
            c = <_Cont>self.conts[self.ci]
            if c.arr != NULL:
                if self.pos < c.card:
                    self.pos += 1
                    return self.base | c.arr[self.pos - 1]
            else:
                while True:
                    if self.bits:
                        t = pb_ctz64(self.bits)
                        self.bits &= self.bits - 1
                        return self.base | (((self.pos - 1) << 6) + t)
                    if self.pos >= WORDS:
                        break
                    self.bits = c.words[self.pos]
                    self.pos += 1
            self.ci += 1
            self.pos = 0
            self.bits = 0
            if self.ci < len(self.conts):
                self.base = (<_Cont>self.conts[self.ci]).key << 16
        raise StopIteration


cdef _IdIter _iter(list conts):
    cdef _IdIter it = _IdIter.__new__(_IdIter)
    it.conts = conts
    if conts:
        it.base = (<_Cont>conts[0]).key << 16
    return it


# ---------------------------------------------------------------------------------------
# IdSet
# ---------------------------------------------------------------------------------------

@cython.final
@cython.no_gc
cdef class IdSet:
    """An immutable set of row ids (ints in [0, 2**63)). Updates return new sets that
    share every untouched container with the old one."""

    def __cinit__(self, iterable=None):
        # Built in __cinit__, not __init__, so that calling __init__ again on an existing
        # set cannot change it.
        cdef IdSet built
        self.hash_cache = -1
        if iterable is _FILLED_BY_MAKE:
            return
        if iterable is None:
            self.conts = []
            return
        if isinstance(iterable, IdSet):
            built = <IdSet>iterable
        elif hasattr(iterable, "__array_interface__") or hasattr(iterable, "dtype"):
            built = IdSet.from_numpy(iterable)
        else:
            built = _from_iterable(iterable)
        self.conts = built.conts
        self.count = built.count

    # -- construction -------------------------------------------------------------------

    @staticmethod
    def from_numpy(arr):
        """An IdSet of the ids in an integer array, in any order, duplicates allowed."""
        import numpy as np
        a = np.asarray(arr)
        if a.ndim != 1:
            raise ValueError(f"from_numpy expects a 1-D array, got {a.ndim} dimensions")
        if a.dtype.kind not in "iu":
            raise TypeError(f"row ids are integers, not {a.dtype}")
        if a.size == 0:
            return IdSet()
        if a.dtype.kind == "u" and a.dtype.itemsize == 8 and a.max() > MAX_ID:
            raise ValueError(f"row id {int(a.max())} is outside [0, 2**63)")
        cdef const int64_t[::1] view = np.ascontiguousarray(a, dtype=np.int64)
        cdef Py_ssize_t n = view.shape[0], i
        cdef int64_t *ids = <int64_t *>malloc(<size_t>n * sizeof(int64_t))
        cdef bint negative = False
        if ids == NULL:
            raise MemoryError()
        try:
            with nogil:
                for i in range(n):
                    ids[i] = view[i]
                    if view[i] < 0:
                        negative = True
            if negative:
                raise ValueError(f"row id {int(a.min())} is outside [0, 2**63)")
            return _from_id_buffer(ids, n)
        finally:
            free(ids)

    @staticmethod
    def from_range(lo, hi):
        """The ids lo, lo+1, ..., hi-1 (empty when hi <= lo); 0 <= lo and hi <= 2**63."""
        cdef int64_t start = _as_id(lo)
        hi = PyNumber_Index(hi)
        if hi > MAX_ID + 1:
            raise ValueError(f"from_range end {hi!r} is beyond 2**63")
        if hi <= start:
            return IdSet()
        cdef int64_t last = hi - 1
        cdef list out = []
        cdef int64_t key, base, a, b
        cdef int32_t k
        cdef _Cont c
        for key in range(start >> 16, (last >> 16) + 1):
            base = key << 16
            a = max(start, base) - base
            b = min(last, base | 0xFFFF) - base + 1
            if b - a > ARRAY_MAX:
                c = _new_bitmap(key, True)
                bm_fill_range(c.words, <uint32_t>a, <uint32_t>b)
            else:
                c = _new_array(key, <int32_t>(b - a))
                for k in range(<int32_t>(b - a)):
                    c.arr[k] = <uint16_t>(a + k)
            c.card = <int32_t>(b - a)
            out.append(c)
        return _make(out, last - start + 1)

    @staticmethod
    def group_values(rowids, values, missing):
        """An index build's grouping pass in one C loop over two lists of equal length:
        ``(groups, absent, odd)``. ``groups`` maps each value that is None, a bool, an
        int, a non-NaN float, a str or bytes (the keys whose dict equality is the index
        tree's) to the list of its row ids in input order; ``absent`` lists the row ids
        whose value is ``missing``; ``odd`` holds ``(rowid, value)`` for every other
        value, which the caller files by the general rule."""
        cdef list ids = <list?>rowids, vals = <list?>values
        cdef Py_ssize_t i, n = len(ids)
        cdef dict groups = {}
        cdef list absent = [], odd = []
        cdef PyObject *found
        cdef type t
        if len(vals) != n:
            raise ValueError(f"{n} row ids but {len(vals)} values")
        for i in range(n):
            fv = vals[i]
            t = type(fv)
            if t is str or t is int or t is bool or t is bytes or fv is None or \
                    (t is float and PyFloat_AS_DOUBLE(fv) == PyFloat_AS_DOUBLE(fv)):
                found = PyDict_GetItemWithError(groups, fv)
                if found == NULL:
                    groups[fv] = [ids[i]]
                else:
                    (<list>found).append(ids[i])
            elif fv is missing:
                absent.append(ids[i])
            else:
                odd.append((ids[i], fv))
        return groups, absent, odd

    @staticmethod
    def from_groups(groups):
        """``[IdSet(g) for g in groups]`` for a sequence of lists of ids (any order,
        duplicates allowed), built in one C loop: an index build makes one posting per
        distinct field value, most of them a single id."""
        cdef list out = []
        cdef list g
        cdef Py_ssize_t n, i, cap = 0
        cdef int64_t *ids = NULL
        cdef int64_t *grown
        cdef int64_t v
        cdef _Cont c
        try:
            for obj in groups:
                g = <list?>obj
                n = len(g)
                if n == 0:
                    out.append(_make([], 0))
                    continue
                if n == 1:          # one id: one array container of one entry
                    v = _as_id(g[0])
                    c = _new_array(v >> 16, 1)
                    c.arr[0] = <uint16_t>(v & 0xFFFF)
                    c.card = 1
                    out.append(_make([c], 1))
                    continue
                if n > cap:
                    cap = n if n > 64 else 64
                    grown = <int64_t *>realloc(ids, <size_t>cap * sizeof(int64_t))
                    if grown == NULL:
                        raise MemoryError()
                    ids = grown
                for i in range(n):
                    ids[i] = _as_id(g[i])
                out.append(_from_id_buffer(ids, n))
        finally:
            free(ids)
        return out

    @staticmethod
    def from_bytes(b):
        """Decodes to_bytes() output, validating everything; damage raises DecodeError."""
        return _decode(b)

    @staticmethod
    def intersect_many(sets):
        """Intersection of one or more IdSets, smallest first, stopping once empty."""
        cdef list ss = list(sets)
        if not ss:
            raise ValueError("intersect_many needs at least one IdSet")
        for s in ss:
            if not isinstance(s, IdSet):
                raise TypeError(f"intersect_many takes IdSets, not {type(s).__name__}")
        ss.sort(key=len)
        cdef IdSet acc = <IdSet>ss[0]
        for s in ss[1:]:
            if acc.count == 0:
                break
            acc = _binop(acc, <IdSet>s, OP_AND)
        return acc

    @staticmethod
    def union_many(sets):
        """Union of any number of IdSets: each key's containers are ORed in one bitmap."""
        cdef list ss = list(sets), allc = [], out = []
        cdef Py_ssize_t i, j, n, k
        cdef int m
        cdef int64_t key, total = 0
        cdef uint64_t *w
        cdef _Cont c, first
        cdef bint same
        for s in ss:
            if not isinstance(s, IdSet):
                raise TypeError(f"union_many takes IdSets, not {type(s).__name__}")
        if not ss:
            return IdSet()
        if len(ss) == 1:
            return ss[0]
        for s in ss:
            allc.extend((<IdSet>s).conts)
        allc.sort(key=_cont_key)
        n = len(allc)
        i = 0
        while i < n:
            first = <_Cont>allc[i]
            key = first.key
            j = i + 1
            same = True
            while j < n and (<_Cont>allc[j]).key == key:
                same = same and allc[j] is first
                j += 1
            if same:
                out.append(first)
                total += first.card
            else:
                w = _alloc_words(True)
                for k in range(i, j):
                    c = <_Cont>allc[k]
                    if c.words != NULL:
                        for m in range(WORDS):
                            w[m] |= c.words[m]
                    else:
                        arr_to_bm(c.arr, c.card, w)
                r = _from_words(key, w, bm_popcount(w))
                out.append(r)
                total += (<_Cont>r).card
            i = j
        return _make(out, total)

    # -- persistent updates ---------------------------------------------------------------

    def add(self, i):
        """A new IdSet with i added (self when i is already present)."""
        cdef int64_t v = _as_id(i)
        cdef int64_t key = v >> 16
        cdef uint16_t low = <uint16_t>(v & 0xFFFF)
        cdef Py_ssize_t idx = _find(self.conts, key)
        cdef list conts
        cdef _Cont c
        if idx < len(self.conts) and _key_at(self.conts, idx) == key:
            c = <_Cont>self.conts[idx]
            if _cont_has(c, low):
                return self
            c = _clone(c, None, 1)
            _insert(c, low)
            conts = list(self.conts)
            conts[idx] = c
        else:
            c = _new_array(key, 1)
            c.arr[0] = low
            c.card = 1
            conts = list(self.conts)
            conts.insert(idx, c)
        return _make(conts, self.count + 1)

    def discard(self, i):
        """A new IdSet without i (self when i is absent)."""
        cdef int64_t v = _probe_id(i)
        cdef Py_ssize_t idx
        cdef list conts
        cdef _Cont c
        if v < 0 or not _conts_has(self.conts, v):
            return self
        idx = _find(self.conts, v >> 16)
        conts = list(self.conts)
        c = <_Cont>conts[idx]
        if c.card == 1:
            del conts[idx]
        else:
            c = _clone(c, None, 0)
            _remove(c, <uint16_t>(v & 0xFFFF))
            conts[idx] = c
        return _make(conts, self.count - 1)

    def mutate(self):
        """An IdSetMutation starting from this set; finish() returns the result."""
        cdef IdSetMutation m = IdSetMutation.__new__(IdSetMutation)
        m.conts = list(self.conts)
        m.count = self.count
        m.token = object()
        return m

    # -- queries --------------------------------------------------------------------------

    def __len__(self):
        return self.count

    def __bool__(self):
        return self.count != 0

    def __contains__(self, i):
        cdef int64_t v = _probe_id(i)
        return v >= 0 and _conts_has(self.conts, v)

    def __iter__(self):
        return _iter(self.conts)

    def min(self):
        """The smallest id; ValueError when empty."""
        if self.count == 0:
            raise ValueError("min() of an empty IdSet")
        cdef _Cont c = <_Cont>self.conts[0]
        cdef int k
        if c.arr != NULL:
            return (c.key << 16) | c.arr[0]
        for k in range(WORDS):
            if c.words[k]:
                return (c.key << 16) | ((k << 6) + pb_ctz64(c.words[k]))

    def max(self):
        """The largest id; ValueError when empty."""
        if self.count == 0:
            raise ValueError("max() of an empty IdSet")
        cdef _Cont c = <_Cont>self.conts[len(self.conts) - 1]
        cdef int k
        if c.arr != NULL:
            return (c.key << 16) | c.arr[c.card - 1]
        for k in range(WORDS - 1, -1, -1):
            if c.words[k]:
                return (c.key << 16) | ((k << 6) + 63 - __builtin_clzll(c.words[k]))

    def to_numpy(self):
        """The ids as an ascending int64 numpy array."""
        import numpy as np
        out = np.empty(self.count, dtype=np.int64)
        cdef int64_t[::1] view = out
        cdef Py_ssize_t n = 0
        cdef int32_t k, i
        cdef int64_t base
        cdef uint64_t x
        cdef _Cont c
        for obj in self.conts:
            c = <_Cont>obj
            base = c.key << 16
            with nogil:
                if c.arr != NULL:
                    for k in range(c.card):
                        view[n + k] = base | c.arr[k]
                    n += c.card
                else:
                    for i in range(WORDS):
                        x = c.words[i]
                        while x:
                            view[n] = base | ((i << 6) + pb_ctz64(x))
                            n += 1
                            x &= x - 1
        return out

    def intersection_count(self, other):
        """len(self & other) without building the intersection."""
        cdef IdSet y = _coerce(other)
        if y is None:
            raise TypeError(f"intersection_count takes an IdSet, not {type(other).__name__}")
        cdef list xa = self.conts, ya = y.conts
        cdef Py_ssize_t i = 0, j = 0, nx = len(xa), ny = len(ya)
        cdef int64_t total = 0, ka, kb
        while i < nx and j < ny:
            ka = _key_at(xa, i)
            kb = _key_at(ya, j)
            if ka < kb:
                i = _seek(xa, i + 1, kb)
            elif ka > kb:
                j = _seek(ya, j + 1, ka)
            else:
                total += _cont_and_count(<_Cont>xa[i], <_Cont>ya[j])
                i += 1
                j += 1
        return total

    # -- algebra --------------------------------------------------------------------------

    def __and__(self, other):
        y = _coerce(other)
        return NotImplemented if y is None else _binop(self, y, OP_AND)

    def __or__(self, other):
        y = _coerce(other)
        return NotImplemented if y is None else _binop(self, y, OP_OR)

    def __sub__(self, other):
        y = _coerce(other)
        return NotImplemented if y is None else _binop(self, y, OP_ANDNOT)

    def __xor__(self, other):
        y = _coerce(other)
        return NotImplemented if y is None else _binop(self, y, OP_XOR)

    def __eq__(self, other):
        y = _coerce(other)
        if y is None:
            return NotImplemented
        return _conts_equal(self.conts, y.conts)

    def __ne__(self, other):
        y = _coerce(other)
        if y is None:
            return NotImplemented
        return not _conts_equal(self.conts, y.conts)

    def __hash__(self):
        if self.hash_cache == -1:
            self.hash_cache = hash(self.to_bytes())
        return self.hash_cache

    # -- serialization --------------------------------------------------------------------

    def to_bytes(self):
        """The layout described in this module's docstring."""
        return _encode(self.conts, self.count)

    def __reduce__(self):
        return (IdSet.from_bytes, (self.to_bytes(),))

    def __repr__(self):
        cdef list head = []
        for v in _iter(self.conts):
            if len(head) == 10:
                break
            head.append(repr(v))
        more = ", ..." if self.count > 10 else ""
        return f"IdSet([{', '.join(head)}{more}], len={self.count})"

    def _check(self):
        """Walks every container and asserts the invariants in the module docstring."""
        _check_conts(self.conts, self.count)


def _cont_key(c):
    return (<_Cont>c).key


cdef bint _conts_equal(list xa, list ya):
    cdef Py_ssize_t i
    cdef _Cont a, b
    if len(xa) != len(ya):
        return False
    for i in range(len(xa)):
        a = <_Cont>xa[i]
        b = <_Cont>ya[i]
        if a is b:
            continue
        if a.key != b.key or a.card != b.card or (a.arr == NULL) != (b.arr == NULL):
            return False
        if a.arr != NULL:
            if memcmp(a.arr, b.arr, <size_t>a.card * sizeof(uint16_t)) != 0:
                return False
        elif memcmp(a.words, b.words, WORDS * sizeof(uint64_t)) != 0:
            return False
    return True


cdef IdSet _from_iterable(object iterable):
    cdef Py_ssize_t n = 0, cap = 64
    cdef int64_t *ids = <int64_t *>malloc(<size_t>cap * sizeof(int64_t))
    cdef int64_t *grown
    if ids == NULL:
        raise MemoryError()
    try:
        for x in iterable:
            if n == cap:
                cap *= 2
                grown = <int64_t *>realloc(ids, <size_t>cap * sizeof(int64_t))
                if grown == NULL:
                    raise MemoryError()
                ids = grown
            ids[n] = _as_id(x)
            n += 1
        return _from_id_buffer(ids, n)
    finally:
        free(ids)


# ---------------------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------------------

cdef bytes _encode(list conts, int64_t count):
    cdef Py_ssize_t size = HEADER, pos
    cdef _Cont c
    cdef int32_t k
    cdef unsigned char *p
    for obj in conts:
        c = <_Cont>obj
        size += CONT_HEADER + (c.card * 2 if c.arr != NULL else WORDS * 8)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    p = <unsigned char *>PyBytes_AS_STRING(out)
    memcpy(p, <const char *>MAGIC, 4)
    p[4] = <unsigned char>VERSION
    p[5] = p[6] = p[7] = 0
    pb_put64(p + 8, <uint64_t>count)
    pb_put32(p + 16, <uint32_t>len(conts))
    pos = HEADER
    for obj in conts:
        c = <_Cont>obj
        pb_put64(p + pos, <uint64_t>c.key)
        pb_put32(p + pos + 8, <uint32_t>c.card)
        pos += CONT_HEADER
        if c.arr != NULL:
            for k in range(c.card):
                pb_put16(p + pos + 2 * k, c.arr[k])
            pos += 2 * c.card
        else:
            for k in range(WORDS):
                pb_put64(p + pos + 8 * k, c.words[k])
            pos += 8 * WORDS
    return out


cdef IdSet _decode(object data):
    cdef const unsigned char[::1] view
    cdef Py_ssize_t n, pos, ncont, i
    cdef const unsigned char *p = NULL
    if type(data) is bytes:      # the common case (a loaded node), without a memoryview
        n = PyBytes_GET_SIZE(data)
        p = <const unsigned char *>PyBytes_AS_STRING(data)
    else:
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise TypeError(f"IdSet.from_bytes takes bytes, not {type(data).__name__}") from None
        n = view.shape[0]
    cdef uint64_t count, key, total = 0
    cdef int64_t prev = -1
    cdef uint32_t card
    cdef int32_t k, pc
    cdef uint16_t prev_low
    cdef _Cont c
    cdef list out = []
    if n < HEADER:
        raise DecodeError(f"IdSet blob is {n} bytes, shorter than its {HEADER}-byte header", offset=0)
    if p == NULL:
        p = &view[0]
    if memcmp(p, <const char *>MAGIC, 4) != 0:
        raise DecodeError("not an IdSet blob (bad magic)", offset=0)
    if p[4] != VERSION:
        raise DecodeError(f"unsupported IdSet format version {p[4]}", offset=4)
    if p[5] or p[6] or p[7]:
        raise DecodeError("IdSet header reserved bytes are not zero", offset=5)
    count = pb_get64(p + 8)
    ncont = pb_get32(p + 16)
    if ncont > (n - HEADER) // (CONT_HEADER + 2):
        raise DecodeError(f"IdSet claims {ncont} containers but holds only {n} bytes", offset=16)
    pos = HEADER
    for i in range(ncont):
        if n - pos < CONT_HEADER:
            raise DecodeError("IdSet blob truncated in a container header", offset=pos)
        key = pb_get64(p + pos)
        card = pb_get32(p + pos + 8)
        if key >= <uint64_t>MAX_KEY:
            raise DecodeError(f"IdSet container key {key} is out of range", offset=pos)
        if <int64_t>key <= prev:
            raise DecodeError("IdSet container keys are not strictly ascending", offset=pos)
        if card == 0 or card > 65536:
            raise DecodeError(f"IdSet container cardinality {card} is out of range", offset=pos + 8)
        prev = <int64_t>key
        pos += CONT_HEADER
        if card <= ARRAY_MAX:
            if n - pos < 2 * <Py_ssize_t>card:
                raise DecodeError("IdSet blob truncated in an array container", offset=pos)
            c = _new_array(<int64_t>key, <int32_t>card)
            for k in range(<int32_t>card):
                c.arr[k] = pb_get16(p + pos + 2 * k)
                if k and c.arr[k] <= c.arr[k - 1]:
                    raise DecodeError("IdSet array container entries are not strictly ascending",
                                      offset=pos + 2 * k)
            c.card = <int32_t>card
            pos += 2 * card
        else:
            if n - pos < 8 * WORDS:
                raise DecodeError("IdSet blob truncated in a bitmap container", offset=pos)
            c = _new_bitmap(<int64_t>key, False)
            for k in range(WORDS):
                c.words[k] = pb_get64(p + pos + 8 * k)
            pc = bm_popcount(c.words)
            if pc != <int32_t>card:
                raise DecodeError(f"IdSet bitmap container holds {pc} ids, header says {card}",
                                  offset=pos - 4)
            c.card = pc
            pos += 8 * WORDS
        total += card
        out.append(c)
    if pos != n:
        raise DecodeError(f"IdSet blob has {n - pos} trailing bytes", offset=pos)
    if total != count:
        raise DecodeError(f"IdSet header count {count} does not match its containers ({total})", offset=8)
    return _make(out, <int64_t>total)


# ---------------------------------------------------------------------------------------
# IdSetMutation
# ---------------------------------------------------------------------------------------

@cython.final
cdef class IdSetMutation:
    """A transient IdSet: edits containers it owns in place, copies shared ones once."""

    def __init__(self, *args, **kwargs):
        raise TypeError("create an IdSetMutation with IdSet.mutate()")

    cdef _Cont _own(self, Py_ssize_t idx):
        cdef _Cont c = <_Cont>self.conts[idx]
        if c.owner is not self.token:
            c = _clone(c, self.token, 8)
            self.conts[idx] = c
        return c

    def add(self, i):
        """Adds i in place."""
        cdef int64_t v = _as_id(i)
        cdef int64_t key = v >> 16
        cdef uint16_t low = <uint16_t>(v & 0xFFFF)
        cdef Py_ssize_t idx = _find(self.conts, key)
        cdef _Cont c
        if idx < len(self.conts) and _key_at(self.conts, idx) == key:
            c = <_Cont>self.conts[idx]
            if _cont_has(c, low):
                return
            c = self._own(idx)
            _insert(c, low)
        else:
            c = _new_array(key, 8)
            c.arr[0] = low
            c.card = 1
            c.owner = self.token
            self.conts.insert(idx, c)
        self.count += 1

    def discard(self, i):
        """Removes i in place if present."""
        cdef int64_t v = _probe_id(i)
        cdef Py_ssize_t idx
        cdef _Cont c
        if v < 0 or not _conts_has(self.conts, v):
            return
        idx = _find(self.conts, v >> 16)
        c = <_Cont>self.conts[idx]
        if c.card == 1:
            del self.conts[idx]
        else:
            c = self._own(idx)
            _remove(c, <uint16_t>(v & 0xFFFF))
        self.count -= 1

    def update(self, iterable):
        """Adds every id of an IdSet, an integer array or any iterable of ints."""
        cdef IdSet other
        if isinstance(iterable, IdSet):
            other = <IdSet>iterable
        elif hasattr(iterable, "__array_interface__") or hasattr(iterable, "dtype"):
            other = IdSet.from_numpy(iterable)
        else:
            other = _from_iterable(iterable)
        # A union shares or builds containers; none of those are owned by this token, so
        # later edits copy them first and `other` is never modified.
        merged = _binop(_make(self.conts, self.count), other, OP_OR)
        self.conts = merged.conts
        self.count = merged.count

    def finish(self):
        """A persistent IdSet of the current contents; later edits never touch it."""
        self.token = object()
        return _make(list(self.conts), self.count)

    def __len__(self):
        return self.count

    def __contains__(self, i):
        cdef int64_t v = _probe_id(i)
        return v >= 0 and _conts_has(self.conts, v)

    def __iter__(self):
        return _iter(list(self.conts))

    def _check(self):
        """Asserts the same invariants as IdSet._check()."""
        _check_conts(self.conts, self.count)
