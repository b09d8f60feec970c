"""IdSet (protobase/_core/idset.pyx) checked against Python's own set of ints.

Every operation runs differentially against `set`, with hypothesis strategies biased to
the edges of the structure: empty sets, single ids, ids near 2**63 - 1, ids around the
container boundary 65535/65536, and dense runs that push a container across the 4096-entry
array/bitmap switch in both directions. A stateful machine keeps every version it made
and asserts after each step that none of them changed and all pass _check().
"""
import pickle
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protobase._core import load
from protobase.errors import DecodeError

idset = load("idset")
IdSet = idset.IdSet

TOP = 2**63 - 1
BOUNDARY = [0, 1, 2, 63, 64, 4095, 4096, 4097, 65534, 65535, 65536, 65537, 131071, 131072,
            TOP, TOP - 1, TOP - 65535, TOP - 65536, 2**62, 2**47, 2**47 - 1]
SETTINGS = settings(derandomize=True, max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

points = st.one_of(st.sampled_from(BOUNDARY), st.integers(0, 300_000), st.integers(0, TOP))
# Runs start just below a container boundary and hold up to 9000 ids at stride 1..3, so a
# container can land on either side of the 4096 switch, or exactly on it.
runs = st.builds(
    lambda start, n, step: set(range(start, min(start + n * step, TOP + 1), step)),
    st.sampled_from([0, 65536 - 2000, 3 * 65536, TOP - 9000, TOP - 70_000]),
    st.sampled_from([0, 1, 4095, 4096, 4097]) | st.integers(0, 9000),
    st.integers(1, 3),
)
id_sets = st.builds(lambda ps, rs: set(ps).union(*rs),
                    st.lists(points, max_size=40), st.lists(runs, max_size=2))
builders = st.sampled_from(["init", "numpy", "mutate", "add", "bytes"])


def build(ids, how):
    """An IdSet holding `ids`, made through one of the construction paths."""
    if how == "init":
        s = IdSet(ids)
    elif how == "numpy":
        arr = np.array(list(ids) + list(ids)[:5], dtype=np.int64)
        np.random.default_rng(len(ids)).shuffle(arr)
        s = IdSet.from_numpy(arr)
    elif how == "mutate":
        m = IdSet().mutate()
        for i in ids:
            m.add(i)
        s = m.finish()
    elif how == "add":
        s = IdSet()
        for i in sorted(ids, reverse=True)[:300]:
            s = s.add(i)
        s = s | IdSet(ids)
    else:
        s = IdSet.from_bytes(IdSet(ids).to_bytes())
    s._check()
    return s


def assert_same(s, expected):
    s._check()
    assert len(s) == len(expected)
    assert list(s) == sorted(expected)
    assert bool(s) == bool(expected)


# ---------------------------------------------------------------------------------------
# Differential properties
# ---------------------------------------------------------------------------------------

@SETTINGS
@given(id_sets, id_sets, builders, builders)
def test_binary_operations_match_python_sets(a, b, how_a, how_b):
    x, y = build(a, how_a), build(b, how_b)
    assert_same(x & y, a & b)
    assert_same(x | y, a | b)
    assert_same(x - y, a - b)
    assert_same(x ^ y, a ^ b)
    assert x.intersection_count(y) == len(a & b)
    assert (x == y) == (a == b)
    assert (x != y) == (a != b)
    assert_same(x, a)       # operands untouched
    assert_same(y, b)


@SETTINGS
@given(id_sets, builders, st.lists(points, max_size=10))
def test_queries_match_python_sets(a, how, probes):
    x = build(a, how)
    assert_same(x, a)
    for p in probes + list(a)[:20]:
        assert (p in x) == (p in a)
    assert (-1 not in x) and (2**63 not in x) and ("3" not in x) and (None not in x)
    arr = x.to_numpy()
    assert arr.dtype == np.int64
    assert arr.tolist() == sorted(a)
    if a:
        assert x.min() == min(a) and x.max() == max(a)
    else:
        with pytest.raises(ValueError):
            x.min()
        with pytest.raises(ValueError):
            x.max()
    assert IdSet.from_bytes(x.to_bytes()) == x
    assert pickle.loads(pickle.dumps(x)) == x
    assert hash(x) == hash(IdSet(a))


@SETTINGS
@given(st.lists(id_sets, min_size=1, max_size=5), builders)
def test_many_way_operations_match_folds_over_python_sets(sets, how):
    xs = [build(s, how) for s in sets]
    assert_same(IdSet.union_many(xs), set().union(*sets))
    assert_same(IdSet.intersect_many(xs), set.intersection(*sets))
    # the same set several times: shared containers are reused, not recomputed
    assert_same(IdSet.union_many([xs[0], xs[0]]), sets[0])
    assert_same(IdSet.intersect_many([xs[0], xs[0].add(5)]), sets[0])


@SETTINGS
@given(id_sets, st.lists(st.tuples(st.booleans(), points | st.sampled_from(BOUNDARY)), max_size=40))
def test_persistent_add_and_discard_never_change_older_versions(a, edits):
    versions = [(IdSet(a), set(a))]
    for is_add, i in edits:
        s, expected = versions[-1]
        if is_add:
            versions.append((s.add(i), expected | {i}))
        else:
            versions.append((s.discard(i), expected - {i}))
    for s, expected in versions:
        assert_same(s, expected)


@SETTINGS
@given(st.integers(0, 2**63), st.integers(0, 2**63), st.sampled_from([0, 1, 4096, 4097, 65536, 70_000]))
def test_from_range_matches_range(lo, hi, width):
    lo = min(lo, TOP)
    if width and lo + width <= 2**63:
        hi = lo + width
    s = IdSet.from_range(lo, hi)
    s._check()
    assert len(s) == max(0, hi - lo)
    if hi - lo <= 200_000:
        assert list(s) == list(range(lo, hi))
    if hi > lo:
        assert s.min() == lo and s.max() == hi - 1


@pytest.mark.parametrize("kernels", ["portable", "popcnt", "avx2"])
def test_every_word_kernel_variant_gives_the_same_answers(kernels):
    rng = np.random.default_rng(9)
    a_arr = rng.integers(0, 6 * 65536, 120_000)
    b_arr = np.concatenate([rng.integers(0, 6 * 65536, 120_000), np.arange(65536, 65536 + 9000)])
    a, b = set(a_arr.tolist()), set(b_arr.tolist())
    installed = idset._use_word_kernels(kernels)
    try:
        assert installed in ("portable", "popcnt", "avx2")
        x, y = IdSet.from_numpy(a_arr), IdSet.from_numpy(b_arr)
        for got, want in ((x & y, a & b), (x | y, a | b), (x - y, a - b), (x ^ y, a ^ b)):
            assert_same(got, want)
        assert x.intersection_count(y) == len(a & b)
        assert IdSet.union_many([x, y, IdSet(range(100))]) == IdSet(a | b | set(range(100)))
    finally:
        idset._use_word_kernels("avx2")


# ---------------------------------------------------------------------------------------
# Container switch, boundaries, skew
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", [0, 65536 * 5, TOP - 65535])
def test_a_container_switches_to_bitmap_and_back_at_4096(base):
    ids = set(range(base, base + 2 * 4096, 2))           # exactly 4096 ids: an array
    s = IdSet(ids)
    assert_same(s, ids)
    grown = s.add(base + 1)                               # 4097: a bitmap
    assert_same(grown, ids | {base + 1})
    shrunk = grown.discard(base)                          # back to 4096: an array
    assert_same(shrunk, (ids | {base + 1}) - {base})
    assert_same(s, ids)
    m = s.mutate()
    m.add(base + 3)
    m._check()
    m.discard(base + 3)
    m.discard(base + 2)
    m._check()
    assert_same(m.finish(), ids - {base + 2})


def test_bitmap_results_that_shrink_become_arrays_and_arrays_that_grow_become_bitmaps():
    even = set(range(0, 20_000, 2))
    odd = set(range(1, 20_000, 2))
    dense = set(range(0, 20_000))
    x, y, d = IdSet(even), IdSet(odd), IdSet(dense)
    assert_same(d & x, even)
    assert_same(d - x, odd)
    assert_same(d ^ x, odd)
    assert_same(x | y, dense)
    assert_same(x ^ y, dense)
    small = IdSet(range(0, 3000))
    other = IdSet(range(3000, 6000))
    assert_same(small | other, set(range(6000)))        # two arrays whose union is a bitmap
    assert_same(small ^ other, set(range(6000)))


def test_skewed_intersections_gallop_to_the_right_answer():
    rng = random.Random(7)
    big = set(rng.sample(range(65536), 4000))             # one array container
    small = set(rng.sample(range(65536), 20)) | {min(big), max(big)}
    assert_same(IdSet(small) & IdSet(big), small & big)
    assert_same(IdSet(big) & IdSet(small), small & big)
    assert_same(IdSet(small) - IdSet(big), small - big)
    assert IdSet(small).intersection_count(IdSet(big)) == len(small & big)
    many_keys = set(range(0, 65536 * 3000, 65536))       # 3000 one-id containers
    few = {65536 * 2999, 65536 * 17, 5}
    assert_same(IdSet(many_keys) & IdSet(few), many_keys & few)
    assert IdSet(few).intersection_count(IdSet(many_keys)) == 2


def test_ids_at_the_top_of_the_range_and_out_of_range_are_handled():
    s = IdSet([TOP, 0])
    assert list(s) == [0, TOP] and s.max() == TOP
    assert s.to_numpy().tolist() == [0, TOP]
    for bad in (-1, 2**63, 2**70):
        with pytest.raises(ValueError):
            IdSet([bad])
        with pytest.raises(ValueError):
            s.add(bad)
        with pytest.raises(ValueError):
            s.mutate().add(bad)
        assert s.discard(bad) is s
    for bad in ("1", 1.0, None):
        with pytest.raises(TypeError):
            IdSet([bad])
    assert s.add(np.int64(7)) == IdSet([0, 7, TOP])
    with pytest.raises(ValueError):
        IdSet.from_range(0, 2**63 + 1)
    with pytest.raises(ValueError):
        IdSet.from_range(-1, 5)
    assert len(IdSet.from_range(TOP - 10, 2**63)) == 11
    assert len(IdSet.from_range(10, 3)) == 0


def test_from_numpy_accepts_any_order_and_duplicates_and_rejects_bad_arrays():
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 500_000, 50_000)
    s = IdSet.from_numpy(arr)
    assert_same(s, set(arr.tolist()))
    assert_same(IdSet.from_numpy(arr.astype(np.uint32)), set(arr.tolist()))
    assert_same(IdSet.from_numpy(np.array([], dtype=np.int64)), set())
    assert_same(IdSet(np.array([3, 1, 3])), {1, 3})
    with pytest.raises(ValueError):
        IdSet.from_numpy(np.array([5, -1, 7]))
    with pytest.raises(ValueError):
        IdSet.from_numpy(np.array([2**63], dtype=np.uint64))
    with pytest.raises(TypeError):
        IdSet.from_numpy(np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        IdSet.from_numpy(np.zeros((2, 2), dtype=np.int64))


def test_many_way_operations_validate_their_arguments():
    with pytest.raises(ValueError):
        IdSet.intersect_many([])
    assert IdSet.union_many([]) == IdSet()
    with pytest.raises(TypeError):
        IdSet.union_many([IdSet(), {1}])
    with pytest.raises(TypeError):
        IdSet.intersect_many([IdSet(), {1}])
    with pytest.raises(TypeError):
        IdSet([1]).intersection_count({1})
    with pytest.raises(TypeError):
        IdSet([1]) & {1}
    empty_first = IdSet.intersect_many([IdSet(), IdSet(range(100)), IdSet([5])])
    assert_same(empty_first, set())


def test_repr_is_truncated_and_mutation_cannot_be_built_directly():
    r = repr(IdSet(range(100)))
    assert r.startswith("IdSet([0, 1, 2") and "..." in r and "len=100" in r
    assert repr(IdSet()) == "IdSet([], len=0)"
    with pytest.raises(TypeError):
        idset.IdSetMutation()


def test_an_idset_is_immutable_hashable_and_equal_only_to_idsets():
    s = IdSet([1, 2, 3])
    s.__init__([7, 8])
    assert list(s) == [1, 2, 3]
    assert s.add(2) is s and s.discard(99) is s
    assert {s: "x"}[IdSet([3, 2, 1])] == "x"
    assert hash(s) == hash(IdSet([1, 2, 3])) and hash(s) == hash(s)
    assert s != {1, 2, 3} and s != [1, 2, 3]
    assert IdSet(s) == s and IdSet(iter([3, 1, 2, 1])) == s


def test_mutation_edits_in_place_until_finish_and_never_touches_snapshots():
    base = IdSet(range(0, 10_000, 3))
    m = base.mutate()
    m.update(range(1, 100))
    m.update(IdSet([70_000, 5]))
    m.update(np.array([80_000, 80_001]))
    first = m.finish()
    m.add(90_000)
    m.discard(1)
    m.discard(3)
    second = m.finish()
    m.add(91_000)
    assert_same(base, set(range(0, 10_000, 3)))
    expected_first = set(range(0, 10_000, 3)) | set(range(1, 100)) | {70_000, 80_000, 80_001}
    assert_same(first, expected_first)
    assert_same(second, expected_first - {1, 3} | {90_000})
    assert 91_000 in m and 91_000 not in second and len(m) == len(second) + 1
    assert list(m) == sorted(expected_first - {1, 3} | {90_000, 91_000})


# ---------------------------------------------------------------------------------------
# Stateful: versions never change
# ---------------------------------------------------------------------------------------

class IdSetVersions(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.current = IdSet()
        self.expected = set()
        self.mutation = None
        self.m_expected = None
        self.versions = [(self.current, set())]

    ids = points | st.sampled_from(BOUNDARY) | st.integers(65536 - 20, 65536 + 20)

    def _keep(self, s, expected):
        self.versions.append((s, set(expected)))
        if len(self.versions) > 12:
            del self.versions[1]

    @rule(i=ids)
    def add(self, i):
        self.current = self.current.add(i)
        self.expected.add(i)
        self._keep(self.current, self.expected)

    @rule(i=ids)
    def discard(self, i):
        self.current = self.current.discard(i)
        self.expected.discard(i)
        self._keep(self.current, self.expected)

    @rule(data=runs)
    def or_a_run(self, data):
        self.current = self.current | IdSet(data)
        self.expected |= data
        self._keep(self.current, self.expected)

    @rule(data=runs)
    def subtract_a_run(self, data):
        self.current = self.current - IdSet(data)
        self.expected -= data
        self._keep(self.current, self.expected)

    @rule()
    def start_mutation(self):
        self.mutation = self.current.mutate()
        self.m_expected = set(self.expected)

    @precondition(lambda self: self.mutation is not None)
    @rule(i=ids, n=st.integers(1, 5000), step=st.integers(1, 3))
    def mutation_adds_a_run(self, i, n, step):
        for v in range(i, min(i + n * step, TOP + 1), step):
            self.mutation.add(v)
            self.m_expected.add(v)

    @precondition(lambda self: self.mutation is not None)
    @rule(i=ids, n=st.integers(1, 5000))
    def mutation_discards_a_run(self, i, n):
        for v in range(i, min(i + n, TOP + 1)):
            self.mutation.discard(v)
            self.m_expected.discard(v)

    @precondition(lambda self: self.mutation is not None)
    @rule(data=runs)
    def mutation_update(self, data):
        self.mutation.update(data)
        self.m_expected |= data

    @precondition(lambda self: self.mutation is not None)
    @rule()
    def finish(self):
        self.current = self.mutation.finish()
        self.expected = set(self.m_expected)
        self._keep(self.current, self.expected)

    @invariant()
    def every_version_is_intact(self):
        for s, expected in self.versions:
            assert_same(s, expected)
        if self.mutation is not None:
            self.mutation._check()
            assert len(self.mutation) == len(self.m_expected)


IdSetVersions.TestCase.settings = settings(derandomize=True, max_examples=40, stateful_step_count=30,
                                           deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
test_idset_versions_state_machine = IdSetVersions.TestCase


# ---------------------------------------------------------------------------------------
# Serialization: documented layout, full validation, fuzzing
# ---------------------------------------------------------------------------------------

def blob(header_count, containers, *, magic=b"PBIS", version=1, reserved=b"\0\0\0", ncont=None):
    """A blob in the documented layout; containers are (key, card, payload bytes)."""
    out = magic + bytes([version]) + reserved
    out += struct.pack("<QI", header_count, len(containers) if ncont is None else ncont)
    for key, card, payload in containers:
        out += struct.pack("<QI", key, card) + payload
    return out


def arr(*lows):
    return struct.pack(f"<{len(lows)}H", *lows)


def test_to_bytes_follows_the_documented_layout():
    s = IdSet([5, 9, 65536 + 3] + list(range(2 * 65536, 2 * 65536 + 5000)))
    words = [0] * 1024
    for low in range(5000):
        words[low >> 6] |= 1 << (low & 63)
    expected = blob(5003, [(0, 2, arr(5, 9)), (1, 1, arr(3)),
                           (2, 5000, struct.pack("<1024Q", *words))])
    assert s.to_bytes() == expected
    assert IdSet.from_bytes(expected) == s
    assert IdSet().to_bytes() == blob(0, [])
    assert IdSet.from_bytes(bytearray(expected)) == s
    assert IdSet.from_bytes(memoryview(expected)) == s


FULL = [0xFFFFFFFFFFFFFFFF] * 1024
BAD_BLOBS = {
    "empty": b"",
    "short header": b"PBIS\x01\0\0\0",
    "wrong magic": blob(1, [(0, 1, arr(1))], magic=b"PBIX"),
    "wrong version": blob(1, [(0, 1, arr(1))], version=2),
    "reserved bytes set": blob(1, [(0, 1, arr(1))], reserved=b"\0\1\0"),
    "count too high": blob(2, [(0, 1, arr(1))]),
    "count too low": blob(0, [(0, 1, arr(1))]),
    "keys out of order": blob(2, [(5, 1, arr(1)), (4, 1, arr(1))]),
    "duplicate keys": blob(2, [(5, 1, arr(1)), (5, 1, arr(2))]),
    "key beyond 2**63": blob(1, [(2**47, 1, arr(1))]),
    "empty container": blob(0, [(0, 0, b"")]),
    "card above 65536": blob(65537, [(0, 65537, struct.pack("<1024Q", *FULL))]),
    "array unsorted": blob(3, [(0, 3, arr(1, 3, 2))]),
    "array duplicated": blob(3, [(0, 3, arr(1, 2, 2))]),
    "bitmap popcount mismatch": blob(5000, [(0, 5000, struct.pack("<1024Q", *FULL))]),
    "bitmap holding few ids": blob(64, [(0, 64, struct.pack("<1024Q", 2**64 - 1, *[0] * 1023))]),
    "truncated array": blob(3, [(0, 3, arr(1, 2))]),
    "truncated bitmap": blob(65536, [(0, 65536, struct.pack("<1000Q", *FULL[:1000]))]),
    "forged huge container count": blob(1, [(0, 1, arr(1))], ncont=2**32 - 1),
    "forged huge cardinality": blob(2**64 - 1, [(0, 2**32 - 1, arr(1))]),
    "trailing bytes": blob(1, [(0, 1, arr(1))]) + b"\0",
}


@pytest.mark.parametrize("name", sorted(BAD_BLOBS))
def test_damaged_blobs_raise_decode_error(name):
    with pytest.raises(DecodeError):
        IdSet.from_bytes(BAD_BLOBS[name])


def test_every_truncation_of_a_valid_blob_raises_decode_error():
    good = IdSet([1, 2, 70_000, TOP] + list(range(200_000, 206_000))).to_bytes()
    for n in range(len(good)):
        with pytest.raises(DecodeError):
            IdSet.from_bytes(good[:n])
    assert IdSet.from_bytes(good).to_bytes() == good
    with pytest.raises(TypeError):
        IdSet.from_bytes("PBIS")


def _mutate_blob(rng, good):
    b = bytearray(good)
    kind = rng.randrange(6)
    if kind == 0:                               # flip a few bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:                             # overwrite a byte, biased to the headers
        i = rng.randrange(min(len(b), 48)) if rng.random() < 0.6 else rng.randrange(len(b))
        b[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif kind == 2:                             # truncate
        del b[rng.randrange(len(b)):]
    elif kind == 3:                             # insert or delete a run of bytes
        i = rng.randrange(len(b))
        if rng.random() < 0.5:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            del b[i:i + rng.randint(1, 16)]
    elif kind == 4:                             # forge a 32-bit length field
        i = rng.choice([16, 28, rng.randrange(max(1, len(b) - 4))])
        b[i:i + 4] = struct.pack("<I", rng.choice([0, 1, 4096, 4097, 65536, 65537, 2**31, 2**32 - 1]))
    else:                                       # swap two 8-byte blocks
        i, j = rng.randrange(len(b)), rng.randrange(len(b))
        b[i:i + 8], b[j:j + 8] = b[j:j + 8], b[i:i + 8]
    return bytes(b)


def _fuzz(n_inputs, seed):
    rng = random.Random(seed)
    sources = [
        IdSet([0]), IdSet([TOP]), IdSet([1, 2, 3, 65535, 65536]),
        IdSet(range(10)) | IdSet([2**40, 2**47 * 65536 - 1]),
        IdSet(range(0, 9000, 2)), IdSet(range(65536 - 100, 65536 + 5000)),
    ]
    goods = [s.to_bytes() for s in sources]
    decoded = 0
    for _ in range(n_inputs):
        data = _mutate_blob(rng, rng.choice(goods))
        try:
            s = IdSet.from_bytes(data)
        except DecodeError:
            continue
        s._check()
        assert s.to_bytes() == data            # the layout is canonical: nothing slipped by
        decoded += 1
    return decoded


def test_fuzzed_blobs_only_raise_decode_error_or_decode_to_valid_sets():
    decoded = _fuzz(50_000, seed=2026)
    assert 0 < decoded < 50_000                # both outcomes were exercised


@pytest.mark.slow
def test_fuzzed_blobs_long_run():
    _fuzz(300_000, seed=11)


# ---------------------------------------------------------------------------------------
# Large sizes
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_one_million_ids_against_python_sets():
    rng = np.random.default_rng(5)
    a_arr = rng.integers(0, 4_000_000, 1_000_000)
    b_arr = np.concatenate([rng.integers(0, 4_000_000, 900_000), np.arange(2**40, 2**40 + 100_000)])
    a, b = set(a_arr.tolist()), set(b_arr.tolist())
    x, y = IdSet.from_numpy(a_arr), IdSet.from_numpy(b_arr)
    x._check()
    y._check()
    assert x.to_numpy().tolist() == sorted(a)
    for got, want in ((x & y, a & b), (x | y, a | b), (x - y, a - b), (x ^ y, a ^ b)):
        got._check()
        assert len(got) == len(want)
        assert got.to_numpy().tolist() == sorted(want)
    assert x.intersection_count(y) == len(a & b)
    assert IdSet.from_bytes(x.to_bytes()) == x
    m = x.mutate()
    for i in range(0, 200_000):
        m.discard(i)
    after = m.finish()
    after._check()
    assert len(after) == len({i for i in a if i >= 200_000})
    assert x.to_numpy().tolist() == sorted(a)


# ---- bulk construction and garbage-collector tracking ----------------------------------

@SETTINGS
@given(st.lists(st.lists(points, max_size=40), max_size=30))
def test_from_groups_builds_what_one_idset_per_group_builds(groups):
    built = IdSet.from_groups(groups)
    assert len(built) == len(groups)
    for got, ids in zip(built, groups):
        got._check()
        assert got == IdSet(ids) and sorted(got) == sorted(set(ids))
        assert got.to_bytes() == IdSet(ids).to_bytes()   # one canonical form


def test_from_groups_checks_every_id_and_its_argument():
    with pytest.raises(ValueError):
        IdSet.from_groups([[1, 2], [-1]])
    with pytest.raises(ValueError):
        IdSet.from_groups([[2**63]])
    with pytest.raises(TypeError):
        IdSet.from_groups([["7"]])
    with pytest.raises(TypeError):
        IdSet.from_groups([(1, 2)])                       # lists only
    assert IdSet.from_groups([]) == []
    assert IdSet.from_groups([[], [5, 5, 5]]) == [IdSet(), IdSet([5])]


def test_sets_and_iterators_stay_out_of_the_cyclic_collector():
    # They can hold no reference cycle, so tracking them would only slow every collection.
    import gc
    s = IdSet(range(0, 200_000, 3))
    assert not gc.is_tracked(s)
    assert not gc.is_tracked(iter(s))
    assert not gc.is_tracked(IdSet.from_bytes(s.to_bytes()))
    assert list(IdSet.from_bytes(s.to_bytes())) == list(range(0, 200_000, 3))


def test_from_bytes_takes_any_buffer_and_checks_it_the_same_way():
    s = IdSet([1, 5, 70_000, 2**40])
    b = s.to_bytes()
    for buf in (b, bytearray(b), memoryview(b)):
        assert IdSet.from_bytes(buf) == s
    for buf in (b[:-1], bytearray(b[:-1]), memoryview(b)[:-1]):
        with pytest.raises(DecodeError):
            IdSet.from_bytes(buf)
    with pytest.raises(DecodeError):
        IdSet.from_bytes(b"")



# ---------------------------------------------------------------------------------------
# group_values: an index build's grouping pass, against the same grouping in Python

_FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, width=16),
    st.sampled_from(["a", "b", ""]), st.sampled_from([b"a", b"b"]),
    st.tuples(st.integers(0, 2)), st.lists(st.integers(0, 2), max_size=2),
    st.just("MISSING"))


def _group_in_python(rowids, values, missing):
    plain = (type(None), bool, int, float, str, bytes)
    groups, absent, odd = {}, [], []
    for rowid, value in zip(rowids, values):
        if type(value) in plain and value == value:
            groups.setdefault(value, []).append(rowid)
        elif value is missing:
            absent.append(rowid)
        else:
            odd.append((rowid, value))
    return groups, absent, odd


@SETTINGS
@given(st.lists(_FIELD_VALUES, max_size=40))
def test_group_values_matches_a_python_grouping(drawn):
    missing = object()
    values = [missing if v == "MISSING" else v for v in drawn]
    rowids = list(range(7, 7 + len(values)))
    got = IdSet.group_values(rowids, values, missing)
    want = _group_in_python(rowids, values, missing)
    # Same keys by dict equality (1 == 1.0 == True share a group), same ids in order.
    assert list(got[0].items()) == list(want[0].items())
    assert [type(k) for k in got[0]] == [type(k) for k in want[0]]
    assert got[1:] == want[1:]   # a NaN is the same object on both sides


def test_group_values_refuses_lists_of_different_lengths_and_non_lists():
    with pytest.raises(ValueError):
        IdSet.group_values([1, 2], [None], object())
    with pytest.raises(TypeError):
        IdSet.group_values((1,), [None], object())
