"""The persistent B+tree (protobase._core.btree), checked against dict + sorted() and bisect."""
import bisect
import datetime as dt
import enum
import math
import random
import uuid
from decimal import Decimal
from fractions import Fraction

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protobase._core import load
from protobase.errors import CorruptionError

btree = load("btree")
SortedMap = btree.SortedMap
compare = btree.compare
type_class = btree.type_class

WIDTH = 64   # the kernel's node width; sizes around it exercise splits and merges
SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=120,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# The reference order, written straight from docs/internals.md "Key rules"

class Color(enum.Enum):
    RED = 1
    BLUE = 2


class Size(enum.IntEnum):
    S = 1
    M = 2


def ref_key(x):
    """A plain Python sort key for the documented total order (equal keys <=> equal sort keys)."""
    if x is None:
        return (0,)
    if isinstance(x, enum.Enum):
        return (12, type(x).__qualname__, ref_key(x.value))
    if isinstance(x, (bool, int, float, Decimal, Fraction)):
        if isinstance(x, Decimal) and x.is_nan() or isinstance(x, float) and math.isnan(x):
            return (1, 1, 0, 0)
        if isinstance(x, (float, Decimal)) and math.isinf(x):
            return (1, 0, 1 if x > 0 else -1, 0)
        return (1, 0, 0, Fraction(x))
    if isinstance(x, str):
        return (2, x)
    if isinstance(x, bytes):
        return (3, x)
    if isinstance(x, dt.datetime):
        if x.utcoffset() is None:
            return (5, x)
        return (6, x - x.utcoffset())  # the UTC instant, made naive to sort with its peers
    if isinstance(x, dt.date):
        return (4, x)
    if isinstance(x, dt.time):
        return (7, x.utcoffset() is not None, x)
    if isinstance(x, dt.timedelta):
        return (8, x)
    if isinstance(x, uuid.UUID):
        return (9, x.int)
    if isinstance(x, tuple):
        return (10, tuple(ref_key(e) for e in x))
    if isinstance(x, frozenset):
        return (11, tuple(sorted(ref_key(e) for e in x)))
    raise TypeError(type(x).__name__)


def ident(k):
    """A key with its type, so the test notices which of equal keys (1, 1.0, True) was kept."""
    return (type(k).__name__, ref_key(k))


class RefMap:
    """dict + sorted() keyed by the reference order: the oracle for every test below."""

    def __init__(self):
        self.d = {}

    def set(self, k, v):
        rk = ref_key(k)
        old = self.d.get(rk)
        self.d[rk] = (old[0] if old else k, v)   # dict keeps the first of equal keys

    def delete(self, k):
        del self.d[ref_key(k)]

    def __contains__(self, k):
        return ref_key(k) in self.d

    def get(self, k, default=None):
        e = self.d.get(ref_key(k))
        return default if e is None else e[1]

    def sorted_items(self):
        return [self.d[rk] for rk in sorted(self.d)]

    def sorted_keys(self):
        return [k for k, _ in self.sorted_items()]


def same_items(m, ref):
    got = [(ident(k), v) for k, v in m.items()]
    want = [(ident(k), v) for k, v in ref.sorted_items()]
    assert got == want


small_ints = st.integers(-300, 300)
scalar_keys = st.one_of(
    st.none(), st.booleans(), small_ints,
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([2.0 ** 63, 2 ** 63, 2 ** 63 + 1, 2 ** 53 + 1, float(2 ** 53), 0.5, -0.0]),
    st.decimals(allow_nan=False, allow_infinity=True, places=2),
    st.sampled_from([Decimal("NaN"), Decimal(1), Fraction(1, 3), Fraction(7, 2)]),
    st.text(max_size=3), st.binary(max_size=3),
    st.dates(min_value=dt.date(2000, 1, 1), max_value=dt.date(2000, 1, 9)),
    st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2000, 1, 3)),
    st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2000, 1, 3),
                 timezones=st.sampled_from([dt.timezone.utc, dt.timezone(dt.timedelta(hours=2))])),
    st.times(), st.timedeltas(max_value=dt.timedelta(days=3), min_value=dt.timedelta(days=-3)),
    st.sampled_from([uuid.UUID(int=1), uuid.UUID(int=2 ** 100)]),
    st.sampled_from([Color.RED, Color.BLUE, Size.S, Size.M]),
)
mixed_keys = st.one_of(
    scalar_keys,
    st.tuples(small_ints, st.one_of(small_ints, st.text(max_size=2))),
    st.tuples(), st.tuples(st.none(), st.booleans(), st.floats()),
    st.frozensets(st.one_of(small_ints, st.text(max_size=1)), max_size=3),
)


# ---------------------------------------------------------------------------------------
# compare / type_class

def test_type_classes_follow_the_documented_ranks():
    cases = [(None, 0), (True, 1), (3, 1), (2.5, 1), (Decimal("1.5"), 1), (Fraction(1, 3), 1),
             ("a", 2), (b"a", 3), (dt.date(2020, 1, 1), 4), (dt.datetime(2020, 1, 1), 5),
             (dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), 6), (dt.time(1), 7),
             (dt.timedelta(1), 8), (uuid.UUID(int=5), 9), ((1,), 10), (frozenset([1]), 11),
             (Color.RED, 12), (Size.S, 12)]
    for value, rank in cases:
        assert type_class(value) == rank, value


def test_numbers_compare_exactly_and_across_types():
    assert compare(1, 1.0) == 0 and compare(1, True) == 0 and compare(Decimal(1), 1.0) == 0
    assert compare(Fraction(1, 2), 0.5) == 0
    assert compare(2 ** 63 + 1, 2.0 ** 63) == 1          # a float conversion would say 0
    assert compare(2 ** 53 + 1, float(2 ** 53)) == 1
    assert compare(10 ** 400, float("inf")) == -1
    assert compare(-(10 ** 400), float("-inf")) == 1
    assert compare(Fraction(1, 3), 0.3333333333333333) == 1
    assert compare(Decimal("0.1"), 0.1) == -1            # 0.1 as a float is 0.1000000000000000055...


def test_nan_sorts_after_every_number_and_equals_every_nan():
    nan = float("nan")
    assert compare(nan, float("nan")) == 0
    assert compare(nan, Decimal("NaN")) == 0
    assert compare(nan, float("inf")) == 1 and compare(10 ** 400, nan) == -1
    assert compare(nan, "") == -1                          # still a number: below str


def test_classes_order_before_values():
    chain = [None, -10 ** 30, 0, True, 2.5, float("inf"), float("nan"), "", "a", b"", b"z",
             dt.date(1, 1, 1), dt.datetime(1, 1, 1), dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc),
             dt.time(0), dt.time(0, tzinfo=dt.timezone.utc), dt.timedelta(-1),
             uuid.UUID(int=0), (), (None,), (1, "a"), (1, "b"), (2,), frozenset(),
             frozenset([1, 3]), frozenset([2]), Color.RED, Color.BLUE, Size.S]
    for i, a in enumerate(chain):
        for j, b in enumerate(chain):
            want = (i > j) - (i < j)
            assert compare(a, b) == want, (a, b)


def test_unsupported_keys_raise_type_error_naming_the_type():
    for bad, name in [([1], "list"), ({1: 2}, "dict"), ({1}, "set"), (object(), "object"),
                      (bytearray(b"x"), "bytearray"), ((1, [2]), "list"),
                      (frozenset([(1, object())]), "object"), ((Color.RED, 1j), "complex")]:
        with pytest.raises(TypeError, match=name):
            compare(1, bad)
        with pytest.raises(TypeError, match=name):
            compare(bad, None)
    with pytest.raises(TypeError, match="list"):
        SortedMap().set([1], 2)
    with pytest.raises(TypeError, match="list"):
        SortedMap({1: 2}).get((1, [2]))
    with pytest.raises(TypeError, match="dict"):
        type_class({})


@SETTINGS
@given(st.lists(mixed_keys, max_size=8))
def test_compare_agrees_with_the_reference_order(keys):
    for a in keys:
        for b in keys:
            ra, rb = ref_key(a), ref_key(b)
            assert compare(a, b) == (ra > rb) - (ra < rb), (a, b)


# ---------------------------------------------------------------------------------------
# Differential: SortedMap vs dict + sorted()

ops = st.lists(st.tuples(st.sampled_from(["set", "set", "del", "pop"]), mixed_keys,
                         st.integers(0, 9)), max_size=120)


@SETTINGS
@given(ops)
def test_mutation_matches_the_reference_on_mixed_keys(script):
    m = SortedMap().mutate()
    ref = RefMap()
    for op, k, v in script:
        if op == "set":
            m[k] = v
            ref.set(k, v)
        elif k in ref:
            if op == "del":
                del m[k]
            else:
                assert m.pop(k) == ref.get(k)
            ref.delete(k)
        else:
            with pytest.raises(KeyError):
                del m[k]
            assert m.pop(k, "absent") == "absent"
        assert len(m) == len(ref.d)
    m._check()
    same_items(m, ref)
    snap = m.finish()
    snap._check()
    same_items(snap, ref)
    for _, k, _ in script:
        assert (k in snap) == (k in ref)
        assert snap.get(k, "absent") == ref.get(k, "absent")


@SETTINGS
@given(st.lists(st.tuples(st.integers(-2000, 2000), st.integers()), max_size=600),
       st.lists(st.integers(-2000, 2000), max_size=300))
def test_persistent_set_and_delete_match_dict(pairs, deletions):
    m = SortedMap()
    ref = {}
    for k, v in pairs:
        m = m.set(k, v)
        ref[k] = v
    for k in deletions:
        if k in ref:
            m = m.delete(k)
            del ref[k]
        else:
            assert m.discard(k) is m
            with pytest.raises(KeyError):
                m.delete(k)
    m._check()
    assert list(m.items()) == sorted(ref.items())
    assert list(m.keys()) == sorted(ref)
    assert list(m.values()) == [ref[k] for k in sorted(ref)]
    assert list(reversed(m)) == sorted(ref, reverse=True)
    assert m == ref and m == SortedMap(ref)


def test_equal_numeric_keys_are_one_entry_keeping_the_first_key():
    m = SortedMap().mutate()
    m[1] = "int"
    m[1.0] = "float"
    m[True] = "bool"
    m[Decimal(1)] = "decimal"
    assert len(m) == 1
    assert m.peekitem(0) == (1, "decimal") and type(m.peekitem(0)[0]) is int
    m[float("nan")] = "a"
    m[Decimal("NaN")] = "b"
    assert len(m) == 2 and m[float("nan")] == "b" and m.max_key() != m.max_key()  # a NaN


# ---------------------------------------------------------------------------------------
# Ranges, rank and select

INCLUSIVE = [(True, True), (True, False), (False, True), (False, False)]


def ref_range(keys, lo, hi, inclusive, reverse):
    out = []
    for k in keys:
        if lo is not None and (compare(k, lo) < 0 or (not inclusive[0] and compare(k, lo) == 0)):
            continue
        if hi is not None and (compare(k, hi) > 0 or (not inclusive[1] and compare(k, hi) == 0)):
            continue
        out.append(k)
    return out[::-1] if reverse else out


@SETTINGS
@given(st.sets(st.integers(-500, 500), max_size=400),
       st.one_of(st.none(), st.integers(-520, 520)), st.one_of(st.none(), st.integers(-520, 520)))
def test_irange_matches_a_filtered_sorted_list_for_every_bound_kind(keys, lo, hi):
    m = SortedMap({k: -k for k in keys})
    ordered = sorted(keys)
    for inclusive in INCLUSIVE:
        for reverse in (False, True):
            want = ref_range(ordered, lo, hi, inclusive, reverse)
            assert list(m.irange(lo, hi, inclusive, reverse)) == want
            assert list(m.irange_items(lo, hi, inclusive, reverse)) == [(k, -k) for k in want]


@SETTINGS
@given(st.lists(mixed_keys, max_size=60), mixed_keys, mixed_keys)
def test_irange_on_mixed_keys_follows_the_key_order(keys, lo, hi):
    ref = RefMap()
    for k in keys:
        ref.set(k, None)
    m = SortedMap((k, None) for k in keys)
    ordered = ref.sorted_keys()
    for inclusive in INCLUSIVE:
        for reverse in (False, True):
            want = ref_range(ordered, lo, hi, inclusive, reverse)
            assert [ident(k) for k in m.irange(lo, hi, inclusive, reverse)] == [ident(k) for k in want]


@SETTINGS
@given(st.sets(st.integers(-3000, 3000), max_size=900), st.lists(st.integers(-3100, 3100), max_size=40))
def test_bisect_and_peekitem_match_bisect_and_list_indexing(keys, probes):
    m = SortedMap({k: str(k) for k in keys})
    ordered = sorted(keys)
    for p in probes:
        assert m.bisect_left(p) == bisect.bisect_left(ordered, p)
        assert m.bisect_right(p) == bisect.bisect_right(ordered, p)
        assert m.bisect_left(float(p) + 0.5) == bisect.bisect_left(ordered, p + 0.5)
    n = len(ordered)
    for i in list(range(-n, n))[:: max(1, n // 50)] + [0, n - 1, -1, -n]:
        if n:
            assert m.peekitem(i) == (ordered[i], str(ordered[i]))
    for bad in (n, -n - 1):
        with pytest.raises(IndexError):
            m.peekitem(bad)
    if n:
        assert m.min_key() == ordered[0] and m.max_key() == ordered[-1]
        assert m.peekitem() == (ordered[-1], str(ordered[-1]))
    else:
        with pytest.raises(ValueError):
            m.min_key()


@pytest.mark.parametrize("n", [0, 1, 2, WIDTH - 1, WIDTH, WIDTH + 1, 2 * WIDTH, WIDTH * WIDTH // 2,
                               WIDTH * WIDTH // 2 + 1, WIDTH * WIDTH + 7])
@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_sizes_around_node_widths_build_and_drain(n, order):
    keys = list(range(n))
    if order == "descending":
        keys.reverse()
    elif order == "shuffled":
        random.Random(n).shuffle(keys)
    m = SortedMap().mutate()
    for i, k in enumerate(keys):
        m[k] = k * 2
        if i % 97 == 0 or i == n - 1:
            m._check()
    assert len(m) == n and list(m) == list(range(n))
    assert [m.peekitem(i)[0] for i in range(0, n, 13)] == list(range(0, n, 13))
    snap = m.finish()
    drain = list(keys)
    random.Random(-n).shuffle(drain)
    for i, k in enumerate(drain):
        assert m.pop(k) == k * 2
        if i % 97 == 0 or i == n - 1:
            m._check()
    assert len(m) == 0 and list(m) == []
    snap._check()
    assert list(snap.items()) == [(k, k * 2) for k in range(n)]


# ---------------------------------------------------------------------------------------
# Owner tokens: old versions never change

def test_finish_returns_a_snapshot_later_edits_never_touch():
    m = SortedMap().mutate()
    for k in range(500):
        m[k] = k
    a = m.finish()
    for k in range(0, 500, 2):
        del m[k]
    m[1000] = "x"
    b = m.finish()
    m[1] = "changed"
    assert list(a.items()) == [(k, k) for k in range(500)]
    assert len(b) == 251 and b[1] == 1 and b[1000] == "x"
    a._check()
    b._check()
    m._check()


def test_iterating_a_mutation_while_editing_it_raises():
    m = SortedMap({k: k for k in range(300)}).mutate()
    it = iter(m)
    next(it)
    m[1000] = 1
    with pytest.raises(RuntimeError):
        next(it)


def test_replacing_values_while_iterating_a_mutation_is_allowed():
    m = SortedMap({k: k for k in range(300)}).mutate()
    snap = m.finish()
    for k in m:
        m[k] = -k
    assert list(m.items()) == [(k, -k) for k in range(300)]
    assert list(snap.items()) == [(k, k) for k in range(300)]
    m._check()


class VersionsMachine(RuleBasedStateMachine):
    """One mutation and every snapshot ever taken; no edit may change an old snapshot."""

    def __init__(self):
        super().__init__()
        self.m = SortedMap().mutate()
        self.ref = {}
        self.versions = [(SortedMap(), {})]

    @rule(k=st.integers(0, 400), v=st.integers())
    def set(self, k, v):
        self.m[k] = v
        self.ref[k] = v

    @rule(lo=st.integers(0, 400), n=st.integers(1, 150))
    def set_run(self, lo, n):
        for k in range(lo, lo + n):
            self.m[k] = -k
            self.ref[k] = -k

    @rule(k=st.integers(0, 400))
    def discard(self, k):
        self.m.discard(k)
        self.ref.pop(k, None)

    @rule(lo=st.integers(0, 400), n=st.integers(1, 150))
    def delete_run(self, lo, n):
        for k in range(lo, lo + n):
            self.m.discard(k)
            self.ref.pop(k, None)

    @rule()
    def finish(self):
        self.versions.append((self.m.finish(), dict(self.ref)))

    @precondition(lambda self: len(self.versions) > 1)
    @rule(i=st.integers(0, 50), k=st.integers(0, 400), v=st.integers())
    def persistent_edit_of_an_old_version(self, i, k, v):
        old, old_ref = self.versions[i % len(self.versions)]
        new_ref = dict(old_ref)
        if k in new_ref and v % 2:
            new = old.delete(k)
            del new_ref[k]
        else:
            new = old.set(k, v)
            new_ref[k] = v
        self.versions.append((new, new_ref))

    @invariant()
    def everything_checks(self):
        self.m._check()
        assert list(self.m.items()) == sorted(self.ref.items())
        for snap, snap_ref in self.versions:
            assert len(snap) == len(snap_ref)
            assert list(snap.items()) == sorted(snap_ref.items())


VersionsMachine.TestCase.settings = settings(derandomize=True, database=None, deadline=None, max_examples=40,
                                             stateful_step_count=30,
                                             suppress_health_check=[HealthCheck.too_slow])
TestVersionsMachine = VersionsMachine.TestCase


# ---------------------------------------------------------------------------------------
# Persistence and lazy loading

class ListIO:
    """An in-memory atom store: a pointer is an index into a list of bytes."""

    def __init__(self):
        self.atoms = []
        self.reads = 0
        self.writes = 0

    def write_atom(self, data):
        self.atoms.append(bytes(data))
        self.writes += 1
        return len(self.atoms) - 1

    def read_atom(self, ptr):
        self.reads += 1
        return self.atoms[ptr]

    def encode(self, obj):
        return msgpack.packb(obj, use_bin_type=True)

    def decode(self, data):
        return msgpack.unpackb(data, raw=False)


def header(io, ptr):
    return msgpack.unpackb(io.atoms[ptr])


@SETTINGS
@given(st.dictionaries(st.one_of(st.integers(-10 ** 6, 10 ** 6), st.text(max_size=4),
                                 st.binary(max_size=3), st.floats(allow_nan=False), st.booleans(),
                                 st.none()),
                       st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=300))
def test_persist_then_load_gives_the_same_map(d):
    m = SortedMap(d)
    io = ListIO()
    ptr = m._persist(io)
    loaded = SortedMap._load(ptr, io)
    assert len(loaded) == len(m)
    assert [(ident(k), v) for k, v in loaded.items()] == [(ident(k), v) for k, v in m.items()]
    loaded._check()
    for k, v in d.items():
        assert loaded[k] == m[k]


def test_point_get_reads_one_root_to_leaf_path_only():
    m = SortedMap({k: k for k in range(20000)})
    io = ListIO()
    ptr = m._persist(io)
    levels = header(io, ptr)[3] + 1
    assert levels >= 3                 # the test means something only on a multi-level tree
    io.reads = 0
    loaded = SortedMap._load(ptr, io)
    assert io.reads == 1               # the header only
    assert len(loaded) == 20000 and io.reads == 1
    io.reads = 0
    assert loaded[12345] == 12345
    assert io.reads == levels
    io.reads = 0
    assert loaded[12346] == 12346      # same leaf: everything already loaded
    assert io.reads == 0
    assert loaded.bisect_left(5000) == 5000 and loaded.peekitem(7000) == (7000, 7000)
    assert io.reads <= 2 * (levels - 1)
    io.reads = 0
    assert list(loaded.irange(100, 110)) == list(range(100, 111))
    assert io.reads <= levels


def test_a_second_persist_writes_only_new_nodes():
    m = SortedMap({k: k for k in range(5000)})
    io = ListIO()
    ptr = m._persist(io)
    levels = header(io, ptr)[3] + 1
    io.writes = 0
    assert header(io, m._persist(io)) == header(io, ptr)
    assert io.writes == 1                        # a new header, no node
    loaded = SortedMap._load(ptr, io)
    m2 = loaded.set(2500, "new")
    io.writes = 0
    ptr2 = m2._persist(io)
    assert io.writes == levels + 1               # the copied path, then the header
    again = SortedMap._load(ptr2, io)
    assert again[2500] == "new" and len(again) == 5000
    assert SortedMap._load(ptr, io)[2500] == 2500
    again._check()


def test_edits_of_a_loaded_map_persist_and_reload_like_the_reference():
    rng = random.Random(7)
    io = ListIO()
    ref = {}
    m = SortedMap()
    for rnd in range(6):
        mut = SortedMap._load(m._persist(io), io).mutate()
        for _ in range(700):
            k = rng.randrange(3000)
            if rng.random() < 0.55:
                mut[k] = rnd
                ref[k] = rnd
            elif k in ref:
                assert mut.pop(k) == ref.pop(k)
        mut._check()
        m = mut.finish()
    final = SortedMap._load(m._persist(io), io)
    final._check()
    assert list(final.items()) == sorted(ref.items())


def test_empty_map_round_trips():
    io = ListIO()
    loaded = SortedMap._load(SortedMap()._persist(io), io)
    assert len(loaded) == 0 and list(loaded) == [] and loaded.get(1) is None
    loaded._check()


def _leaf_and_inner_ptrs(io):
    leaves, inners = [], []
    for p, data in enumerate(io.atoms):
        obj = msgpack.unpackb(data)
        if obj[0] == 0:
            leaves.append(p)
        elif obj[0] == 1:
            inners.append(p)
    return leaves, inners


@pytest.mark.parametrize("damage", [
    lambda obj: b"\xc1garbage",                                  # not decodable
    lambda obj: msgpack.packb("a string"),                        # not a node
    lambda obj: msgpack.packb([7] + obj[1:]),                     # unknown kind
    lambda obj: msgpack.packb([0, obj[1][:-1], obj[2]]),          # keys / values differ
    lambda obj: msgpack.packb([0, obj[1][:-1], obj[2][:-1]]),     # count differs from parent
    lambda obj: msgpack.packb([0, obj[1][::-1], obj[2]]),         # keys out of order
    lambda obj: msgpack.packb([0, [[1]] + obj[1][1:], obj[2]]),   # a key of a bad type
    lambda obj: msgpack.packb([0, [k + 10 ** 6 for k in obj[1]], obj[2]]),  # outside separators
    lambda obj: msgpack.packb([1, 1, [], [0, 0], [1, 1]]),       # inner where a leaf belongs
])
def test_a_damaged_leaf_raises_corruption_error_with_its_offset(damage):
    io = ListIO()
    ptr = SortedMap({k: k for k in range(3000)})._persist(io)
    leaves, _ = _leaf_and_inner_ptrs(io)
    victim = leaves[len(leaves) // 2]
    io.atoms[victim] = damage(msgpack.unpackb(io.atoms[victim]))
    loaded = SortedMap._load(ptr, io)
    with pytest.raises(CorruptionError) as info:
        list(loaded.items())
    assert info.value.offset == victim


@pytest.mark.parametrize("damage", [
    lambda obj: msgpack.packb([1, obj[1] + 1] + obj[2:]),                       # wrong level
    lambda obj: msgpack.packb(obj[:4] + [[c + 1 for c in obj[4]]]),            # wrong counts
    lambda obj: msgpack.packb(obj[:3] + [[-5] + obj[3][1:]] + obj[4:]),       # bad pointer
    lambda obj: msgpack.packb([1, obj[1], obj[2][:-1]] + obj[3:]),             # separators short
])
def test_a_damaged_inner_node_raises_corruption_error_with_its_offset(damage):
    io = ListIO()
    ptr = SortedMap({k: k for k in range(20000)})._persist(io)
    _, inners = _leaf_and_inner_ptrs(io)
    victim = inners[0]                          # not the root: its parent checks its count
    assert victim != header(io, ptr)[2]
    io.atoms[victim] = damage(msgpack.unpackb(io.atoms[victim]))
    loaded = SortedMap._load(ptr, io)
    with pytest.raises(CorruptionError) as info:
        list(loaded)
    assert info.value.offset == victim


def test_a_damaged_header_raises_corruption_error():
    io = ListIO()
    ptr = SortedMap({1: 2})._persist(io)
    for bad in (b"\xc1", msgpack.packb([2, 1]), msgpack.packb([2, -1, 0, 0]),
                msgpack.packb([2, 0, 5, 0]), msgpack.packb([0, [], []])):
        io.atoms[ptr] = bad
        with pytest.raises(CorruptionError) as info:
            SortedMap._load(ptr, io)
        assert info.value.offset == ptr


# ---------------------------------------------------------------------------------------
# Large

@pytest.mark.slow
def test_one_million_entries():
    n = 1_000_000
    rng = random.Random(1)
    keys = list(range(0, 2 * n, 2))
    rng.shuffle(keys)
    m = SortedMap().mutate()
    for k in keys:
        m[k] = k
    snap = m.finish()
    assert len(snap) == n
    snap._check()
    for k in rng.sample(keys, 2000):
        assert snap[k] == k and (k + 1) not in snap
        assert snap.bisect_left(k) == k // 2 and snap.bisect_right(k + 1) == k // 2 + 1
    assert snap.peekitem(123456) == (246912, 246912)
    assert list(snap.irange(1000, 2000, (False, True), True)) == list(range(2000, 1000, -2))
    for k in keys[: n // 2]:
        del m[k]
    m._check()
    assert list(m) == sorted(keys[n // 2:])
    assert len(snap) == n and snap[keys[0]] == keys[0]


# ---- bulk builds from sorted keys --------------------------------------------------------

@SETTINGS
@given(st.dictionaries(st.one_of(st.integers(-10 ** 6, 10 ** 6), st.text(max_size=4),
                                 st.floats(allow_nan=False), st.none()),
                       st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=600),
       st.sampled_from([0, 1, 31, 32, 33, 47, 48, 49, 64, 65, 96, 97, 3072, 3073]))
def test_from_sorted_builds_the_map_that_inserts_build(d, extra):
    d = dict(d)
    d.update((10 ** 7 + i, i) for i in range(extra))     # sizes around node widths
    items = list(SortedMap(d).items())                 # in the tree's key order
    keys, vals = [k for k, _ in items], [v for _, v in items]
    built = SortedMap.from_sorted(keys, vals)
    built._check()
    assert len(built) == len(items)
    assert [(ident(k), v) for k, v in built.items()] == [(ident(k), v) for k, v in items]
    for k, v in items[::7]:
        assert built[k] == v
        assert built.bisect_left(k) == keys.index(k)
    # Later edits and persistence see an ordinary tree.
    m = built.mutate()
    for i in range(0, 200, 3):
        m[-10 ** 7 - i] = i
        if keys:
            m.pop(keys[i % len(keys)], None)
    m.finish()._check()
    built._check()                            # the snapshot never changes
    assert [(ident(k), v) for k, v in built.items()] == [(ident(k), v) for k, v in items]
    io = ListIO()
    loaded = SortedMap._load(built._persist(io), io)
    loaded._check()
    assert [(ident(k), v) for k, v in loaded.items()] == [(ident(k), v) for k, v in items]


def test_from_sorted_refuses_unsorted_duplicate_or_bad_keys():
    with pytest.raises(ValueError):
        SortedMap.from_sorted([1, 3, 2], "abc")
    with pytest.raises(ValueError):
        SortedMap.from_sorted([1, 1.0], "ab")          # one key under the total order
    with pytest.raises(ValueError):
        SortedMap.from_sorted([1, 2], "a")
    with pytest.raises(TypeError):
        SortedMap.from_sorted([1, [2]], "ab")
    assert len(SortedMap.from_sorted([], [])) == 0
    assert list(SortedMap.from_sorted([None, 0, "a"], [1, 2, 3]).items()) == \
        [(None, 1), (0, 2), ("a", 3)]
