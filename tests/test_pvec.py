"""protobase._core.pvec: the persistent vector, tested against Python's own list.

Every operation is run on a Vector / VectorMutation and on a list side by side; the two must
agree, `_check()` must pass after every step, and every older version kept along the way
must still hold exactly what it held when it was made.
"""
import random

import msgpack
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protobase._core import load
from protobase.errors import CorruptionError

pvec = load("pvec")
Vector, VectorMutation = pvec.Vector, pvec.VectorMutation

W = 64  # node width (LEAF_MAX == BRANCH_MAX)
# Sizes around the node widths: one leaf, one full tail, a tree of leaves, a root split.
EDGE_SIZES = [0, 1, 2, W // 2 - 1, W // 2, W - 1, W, W + 1, 2 * W - 1, 2 * W, 2 * W + 1,
              3 * W + 5, W * W // 2, W * W - 1, W * W, W * W + 1, W * W + W + 1, 2 * W * W + 3]
sizes = st.one_of(st.sampled_from(EDGE_SIZES), st.integers(0, 3 * W))
indexes = st.integers(-3 * W * W, 3 * W * W)
maybe_index = st.one_of(st.none(), indexes, st.integers(-2 * W - 2, 2 * W + 2))

SETTINGS = settings(derandomize=True, max_examples=120, deadline=None)


def vec(n, start=0):
    return Vector(range(start, start + n)), list(range(start, start + n))


# -- reading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", EDGE_SIZES)
def test_reads_agree_with_list_at_every_edge_size(n):
    v, ref = vec(n)
    v._check()
    assert len(v) == n and bool(v) == bool(ref)
    assert v == ref and ref == v and not (v != ref)
    assert list(v) == ref
    assert list(reversed(v)) == ref[::-1]
    for i in {0, n // 2, n - 1, -1, -n} if n else ():
        assert v[i] == ref[i]
    for i in (n, -n - 1, n + 7):
        with pytest.raises(IndexError):
            v[i]
    assert v == Vector(ref) and v != Vector(ref + [0])


@SETTINGS
@given(n=sizes, a=maybe_index, b=maybe_index, step=st.sampled_from([None, 1, 2, 3, -1, -2, 7]))
def test_slice_matches_list_for_every_index_combination(n, a, b, step):
    v, ref = vec(n)
    s = v[a:b:step]
    assert isinstance(s, Vector)
    s._check()
    assert s == ref[a:b:step]
    assert list(reversed(s)) == ref[a:b:step][::-1]
    assert v == ref  # slicing never changes the source


@SETTINGS
@given(n=sizes, data=st.data())
def test_index_count_and_contains_match_list(n, data):
    v, ref = vec(n)
    ref = [x % 7 for x in ref]
    v = Vector(ref)
    x = data.draw(st.integers(-1, 8))
    start = data.draw(st.one_of(st.none(), indexes, st.integers(-2 * W - 2, 2 * W + 2)))
    stop = data.draw(st.one_of(st.none(), indexes, st.integers(-2 * W - 2, 2 * W + 2)))
    assert v.count(x) == ref.count(x)
    assert (x in v) == (x in ref)
    if start is None:
        args = ()
    elif stop is None:
        args = (start,)
    else:
        args = (start, stop)
    try:
        expected = ref.index(x, *args)
    except ValueError:
        with pytest.raises(ValueError):
            v.index(x, *args)
    else:
        assert v.index(x, *args) == expected


def test_a_raising_eq_propagates_from_index_count_and_leaves_the_vector_intact():
    class Boom:
        def __eq__(self, other):
            raise RuntimeError("boom")

    v, ref = vec(500)
    for op in (lambda: v.index(Boom()), lambda: v.count(Boom()), lambda: Boom() in v):
        with pytest.raises(RuntimeError, match="boom"):
            op()
    assert v == ref
    v._check()


def test_equality_is_by_contents_and_type_like_list():
    v, ref = vec(200)
    assert v == ref and v == v.mutate() and v.mutate() == ref
    assert v != tuple(ref) and v != ref[:-1] and v != ref + [1]
    changed = list(ref)
    changed[130] = -1
    assert v != changed and v != Vector(changed)


def test_repr_is_truncated():
    assert repr(Vector([1, 2])) == "Vector([1, 2])"
    r = repr(Vector(range(1000)))
    assert r.startswith("Vector([0, 1, 2") and "1000 items" in r and len(r) < 100


def test_non_integer_index_is_a_type_error():
    v, _ = vec(10)
    with pytest.raises(TypeError):
        v[1.0]
    with pytest.raises(TypeError):
        v["a"]


# -- functional updates on Vector ------------------------------------------------------------

@SETTINGS
@given(n=sizes, i=indexes, x=st.integers())
def test_functional_updates_match_list_and_never_change_the_original(n, i, x):
    v, ref = vec(n)
    results = []
    if n:
        j = i % n - (n if i < 0 else 0)  # a valid index of either sign
        r = list(ref); r[j] = x
        results.append((v.set(j, x), r))
        r = list(ref); del r[j]
        results.append((v.delete(j), r))
        r = list(ref); item = r.pop(j)
        w, got = v.pop(j)
        assert got == item
        results.append((w, r))
        w, got = v.pop()
        assert got == ref[-1]
        results.append((w, ref[:-1]))
    else:
        with pytest.raises(IndexError):
            v.pop()
        with pytest.raises(IndexError):
            v.set(0, x)
        with pytest.raises(IndexError):
            v.delete(0)
    r = list(ref); r.insert(i, x)
    results.append((v.insert(i, x), r))
    results.append((v.append(x), ref + [x]))
    results.append((v.extend(range(x % 300)), ref + list(range(x % 300))))
    for w, expected in results:
        w._check()
        assert w == expected
    assert v == list(range(n))
    v._check()


@pytest.mark.parametrize("n", EDGE_SIZES)
def test_insert_at_start_end_and_middle(n):
    v, ref = vec(n)
    for i in (0, n, n // 2, -1, -n - 5, n + 5):
        w = v.insert(i, "x")
        r = list(ref); r.insert(i, "x")
        w._check()
        assert w == r
    assert v == ref


@SETTINGS
@given(n=sizes, m=sizes, a=maybe_index, b=maybe_index)
def test_concatenation_of_any_two_vectors_and_of_slices(n, m, a, b):
    v, ref = vec(n)
    w, wref = vec(m, start=10 ** 6)
    for left, lref in ((v, ref), (v[a:b], ref[a:b])):
        for right, rref in ((w, wref), (w[b:a], wref[b:a])):
            c = left + right
            c._check()
            assert c == lref + rref
            assert left.extend(right) == lref + rref
    assert v + wref == ref + wref and wref + v == wref + ref
    assert isinstance(wref + v, Vector)
    assert v == ref and w == wref


def test_adding_a_non_sequence_is_a_type_error():
    with pytest.raises(TypeError):
        Vector([1]) + 1
    with pytest.raises(TypeError):
        Vector([1]) + (1, 2)


# -- VectorMutation --------------------------------------------------------------------------

def test_append_in_a_mutation_then_finish_and_continue():
    m = Vector().mutate()
    ref = []
    snaps = []
    for i in range(5 * W * W + 17):
        m.append(i)
        ref.append(i)
        if i % 997 == 0:
            snaps.append((m.finish(), list(ref)))
    m._check()
    assert m == ref
    for s, r in snaps:
        s._check()
        assert s == r
    while ref:  # pop everything from the end: the tail keeps being refilled from the tree
        assert m.pop() == ref.pop()
    m._check()
    assert len(m) == 0 and m == []
    with pytest.raises(IndexError):
        m.pop()
    for s, r in snaps:
        assert s == r


def test_mutation_behaves_like_a_list_for_slice_assignment_and_deletion():
    rnd = random.Random(7)
    for n in (0, 5, W, W + 1, 3 * W, W * W + 3):
        m = Vector(range(n)).mutate()
        ref = list(range(n))
        for _ in range(40):
            a, b = rnd.randint(-n - 5, n + 5), rnd.randint(-n - 5, n + 5)
            step = rnd.choice([None, 1, 2, -1, -3])
            if rnd.random() < 0.5:
                del m[a:b:step]
                del ref[a:b:step]
            else:
                k = len(range(*slice(a, b, step).indices(len(ref))))
                new = list(range(-1, -1 - (k if step not in (None, 1) else rnd.randint(0, 2 * W)), -1))
                m[a:b:step] = new
                ref[a:b:step] = new
            m._check()
            assert m == ref
            assert m[a:b:step] == ref[a:b:step]


def test_extended_slice_assignment_of_the_wrong_size_is_a_value_error():
    m = Vector(range(10)).mutate()
    with pytest.raises(ValueError):
        m[::2] = [1, 2]
    assert m == list(range(10))


def test_extending_a_mutation_with_itself_and_with_vectors():
    m = Vector(range(W + 3)).mutate()
    ref = list(range(W + 3))
    for _ in range(6):
        m.extend(m)
        ref.extend(ref)
        m._check()
        assert m == ref
    other = Vector(range(5000))
    m += other
    ref += list(range(5000))
    m += [1, 2]
    ref += [1, 2]
    m.extend(iter(range(300)))
    ref.extend(range(300))
    m._check()
    assert m == ref and other == list(range(5000))


def test_list_helpers_on_a_mutation():
    m = VectorMutation(range(300))
    ref = list(range(300))
    m.remove(150)
    ref.remove(150)
    with pytest.raises(ValueError):
        m.remove(150)
    m.insert(-1, "a")
    ref.insert(-1, "a")
    assert m.pop(0) == ref.pop(0) and m.pop(-2) == ref.pop(-2)
    m[-1] = "z"
    ref[-1] = "z"
    del m[-3]
    del ref[-3]
    m._check()
    assert m == ref
    m.clear()
    m._check()
    assert m == [] and len(m) == 0


def test_slices_read_from_a_mutation_do_not_see_later_edits():
    m = Vector(range(1000)).mutate()
    s = m[100:900]
    m[500] = "changed"
    del m[200:300]
    m.append("x")
    assert s == list(range(100, 900))
    s._check()


class MutationMachine(RuleBasedStateMachine):
    """A VectorMutation against a list; every finish() snapshot must stay as it was."""

    @initialize(n=sizes)
    def start(self, n):
        self.m = Vector(range(n)).mutate()
        self.ref = list(range(n))
        self.snaps = []
        self.counter = 10 ** 6

    def _val(self):
        self.counter += 1
        return self.counter

    @rule(k=st.integers(1, 3 * W))
    def append_many(self, k):
        for _ in range(k):
            x = self._val()
            self.m.append(x)
            self.ref.append(x)

    @rule(k=st.integers(0, 4 * W), as_vector=st.booleans())
    def extend(self, k, as_vector):
        items = [self._val() for _ in range(k)]
        self.m.extend(Vector(items) if as_vector else items)
        self.ref.extend(items)

    @precondition(lambda self: len(self.ref) < 20000)
    @rule()
    def extend_with_itself(self):
        self.m.extend(self.m)
        self.ref.extend(self.ref)

    @rule(i=indexes)
    def insert(self, i):
        x = self._val()
        self.m.insert(i, x)
        self.ref.insert(i, x)

    @precondition(lambda self: self.ref)
    @rule(i=indexes)
    def setitem(self, i):
        i %= len(self.ref)
        x = self._val()
        self.m[i] = x
        self.ref[i] = x

    @precondition(lambda self: self.ref)
    @rule(i=indexes, last=st.booleans())
    def pop(self, i, last):
        if last:
            assert self.m.pop() == self.ref.pop()
        else:
            i %= len(self.ref)
            assert self.m.pop(-i - 1) == self.ref.pop(-i - 1)

    @precondition(lambda self: self.ref)
    @rule(i=indexes)
    def delitem(self, i):
        i %= len(self.ref)
        del self.m[i]
        del self.ref[i]

    @rule(a=maybe_index, b=maybe_index)
    def delslice(self, a, b):
        del self.m[a:b]
        del self.ref[a:b]

    @rule(a=maybe_index, b=maybe_index, k=st.integers(0, 2 * W))
    def setslice(self, a, b, k):
        items = [self._val() for _ in range(k)]
        self.m[a:b] = items
        self.ref[a:b] = items

    @rule(a=maybe_index, b=maybe_index)
    def read_slice(self, a, b):
        s = self.m[a:b]
        s._check()
        assert s == self.ref[a:b]
        self.snaps.append((s, self.ref[a:b]))

    @rule()
    def finish(self):
        self.snaps.append((self.m.finish(), list(self.ref)))
        self.snaps = self.snaps[-6:]

    @invariant()
    def agrees_with_list(self):
        self.m._check()
        assert len(self.m) == len(self.ref)
        assert self.m == self.ref
        for s, r in self.snaps:
            assert s == r


TestMutationMachine = MutationMachine.TestCase
TestMutationMachine.settings = settings(derandomize=True, max_examples=60, stateful_step_count=30,
                                        deadline=None)


class VersionsMachine(RuleBasedStateMachine):
    """Functional updates on Vector: each result is a new version, and no version ever changes."""

    @initialize(n=sizes)
    def start(self, n):
        v, ref = vec(n)
        self.versions = [(v, ref)]

    def _pick(self, k):
        return self.versions[k % len(self.versions)]

    def _keep(self, v, ref):
        v._check()
        assert v == ref
        self.versions.append((v, ref))
        self.versions = self.versions[-8:]

    @rule(k=st.integers(0, 7), i=indexes, x=st.integers())
    def insert(self, k, i, x):
        v, ref = self._pick(k)
        r = list(ref); r.insert(i, x)
        self._keep(v.insert(i, x), r)

    @rule(k=st.integers(0, 7), x=st.integers())
    def append(self, k, x):
        v, ref = self._pick(k)
        self._keep(v.append(x), ref + [x])

    @rule(k=st.integers(0, 7), i=indexes, x=st.integers())
    def set_or_delete(self, k, i, x):
        v, ref = self._pick(k)
        if ref:
            i %= len(ref)
            r = list(ref); r[i] = x
            self._keep(v.set(i, x), r)
            r = list(ref); del r[i]
            self._keep(v.delete(i), r)

    @rule(k=st.integers(0, 7))
    def pop(self, k):
        v, ref = self._pick(k)
        if ref:
            w, item = v.pop()
            assert item == ref[-1]
            self._keep(w, ref[:-1])

    @rule(k=st.integers(0, 7), j=st.integers(0, 7), a=maybe_index, b=maybe_index)
    def slice_and_concat(self, k, j, a, b):
        v, ref = self._pick(k)
        w, wref = self._pick(j)
        if len(ref) + len(wref) < 30000:
            self._keep(v[a:b] + w, ref[a:b] + wref)

    @invariant()
    def no_version_ever_changes(self):
        for v, ref in self.versions:
            assert len(v) == len(ref)
            assert v == ref


TestVersionsMachine = VersionsMachine.TestCase
TestVersionsMachine.settings = settings(derandomize=True, max_examples=50, stateful_step_count=25,
                                        deadline=None)


# -- persistence -----------------------------------------------------------------------------

class ListIO:
    """An AtomIO kept in a Python list: a pointer is the atom's position. Counts reads."""

    def __init__(self):
        self.atoms = []
        self.reads = 0

    def write_atom(self, data):
        self.atoms.append(bytes(data))
        return len(self.atoms) - 1

    def read_atom(self, ptr):
        self.reads += 1
        return self.atoms[ptr]

    def encode(self, obj):
        return msgpack.packb(obj)

    def decode(self, data):
        return msgpack.unpackb(data)


@pytest.mark.parametrize("n", EDGE_SIZES)
def test_persist_and_load_round_trip(n):
    io = ListIO()
    v = Vector([f"s{i}" for i in range(n)])
    ptr = v._persist(io)
    io.reads = 0
    w = Vector._load(ptr, io)
    assert io.reads == 1  # the header only
    assert len(w) == n and io.reads == 1
    assert w == [f"s{i}" for i in range(n)]
    assert list(reversed(w)) == [f"s{i}" for i in range(n)][::-1]
    w._check()


def test_an_index_read_loads_one_path_only():
    io = ListIO()
    n = 100_000  # 1562 full leaves -> 25 branches -> a root: height 2
    ptr = Vector(range(n))._persist(io)
    w = Vector._load(ptr, io)
    io.reads = 0
    assert w[54_321] == 54_321
    assert io.reads == 3  # root, one branch, one leaf
    assert w[54_322] == 54_322 and io.reads == 3  # same leaf: nothing new to read
    assert w[-1] == n - 1 and io.reads == 4  # the tail
    assert w[0] == 0 and io.reads == 6  # another branch and leaf under the loaded root


def test_a_second_persist_writes_only_new_nodes():
    io = ListIO()
    v = Vector(range(100_000))
    p1 = v._persist(io)
    first = len(io.atoms)
    assert v._persist(io) != p1 and len(io.atoms) == first + 1  # nothing new but a header

    loaded = Vector._load(p1, io)
    m = loaded.mutate()
    for i in range(100):
        m.append(-i)
    m[10] = "ten"
    v2 = m.finish()
    before = len(io.atoms)
    p2 = v2._persist(io)
    written = len(io.atoms) - before
    # path to leaf 10 (root, branch, leaf), the pushed full tail (a leaf, its branch), the
    # new tail, the header: far fewer than the ~1600 atoms of the whole vector
    assert written <= 8
    expected = list(range(100_000)) + [-i for i in range(100)]
    expected[10] = "ten"
    assert Vector._load(p2, io) == expected
    assert Vector._load(p1, io) == list(range(100_000))  # the old version is intact
    Vector._load(p2, io)._check()


def test_edits_and_joins_on_a_loaded_vector():
    io = ListIO()
    ptr = Vector(range(20_000))._persist(io)
    w = Vector._load(ptr, io)
    ref = list(range(20_000))
    w2 = w.insert(777, "a").delete(15_000)[100:19_000] + w
    ref2 = list(ref)
    ref2.insert(777, "a")
    del ref2[15_000]
    ref2 = ref2[100:19_000] + ref
    w2._check()
    assert w2 == ref2
    other_io = ListIO()
    z = Vector._load(Vector(range(5000))._persist(other_io), other_io)
    joined = w + z  # two different atom I/Os: the right side is loaded in full first
    joined._check()
    assert joined == ref + list(range(5000))
    again = Vector._load(joined._persist(io), io)
    assert again == ref + list(range(5000))


@pytest.mark.parametrize("seed", range(4))
def test_rounds_of_edits_on_loaded_vectors_never_touch_persisted_nodes(seed):
    rnd = random.Random(seed)
    io = ListIO()
    ref = list(range(rnd.choice([0, 50, 3000, 9000])))
    header = Vector(ref)._persist(io)
    history = []  # (header pointer, loaded vector, its contents)
    for _ in range(12):
        v = Vector._load(header, io)
        history.append((header, v, list(ref)))
        m = v.mutate()
        for _ in range(25):
            op = rnd.random()
            n = len(ref)
            if op < 0.2:
                k = rnd.randint(0, 150)
                m.extend(range(k))
                ref.extend(range(k))
            elif op < 0.35 and n:
                i = rnd.randrange(n)
                assert m.pop(i) == ref.pop(i)
            elif op < 0.45 and n:
                assert m.pop() == ref.pop()
            elif op < 0.6:
                i = rnd.randint(-n - 2, n + 2)
                m.insert(i, "i")
                ref.insert(i, "i")
            elif op < 0.7 and n:
                i = rnd.randrange(n)
                m[i] = "s"
                ref[i] = "s"
            elif op < 0.8:
                a, b = rnd.randint(-n, n), rnd.randint(-n, n)
                del m[a:b]
                del ref[a:b]
            elif op < 0.9:
                a, b = rnd.randint(-n, n), rnd.randint(-n, n)
                assert m[a:b] == ref[a:b]
                new = ["r"] * rnd.randint(0, 100)
                m[a:b] = new
                ref[a:b] = new
            elif n < 20_000:
                m.extend(v)  # the loaded version itself: its nodes are shared, never edited
                ref.extend(history[-1][2])
            m._check()
            assert m == ref
        header = m.finish()._persist(io)
    for ptr, loaded, contents in history:
        assert loaded == contents  # no edit reached a persisted node
        again = Vector._load(ptr, io)
        again._check()
        assert again == contents


def _atoms_of_kind(io, kind):
    return [p for p, raw in enumerate(io.atoms) if msgpack.unpackb(raw)[0] == kind]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_kind", "wrong_count",
                                    "bad_pointer", "not_a_list"])
def test_damaged_nodes_raise_corruption_error_naming_the_offset(damage):
    io = ListIO()
    header = Vector(range(10_000))._persist(io)
    leaf = _atoms_of_kind(io, 1)[3]  # the fourth leaf: items 192..255
    branch = _atoms_of_kind(io, 2)[0]
    target = leaf
    if damage == "garbage":
        io.atoms[leaf] = b"\xc1\xc1\xc1"
    elif damage == "truncated":
        io.atoms[leaf] = io.atoms[leaf][:-3]
    elif damage == "wrong_kind":
        io.atoms[leaf] = io.atoms[branch]
    elif damage == "wrong_count":
        io.atoms[leaf] = msgpack.packb([1, list(range(192, 255))])
    elif damage == "bad_pointer":
        kind, counts, ptrs = msgpack.unpackb(io.atoms[branch])
        ptrs[3] = -5
        io.atoms[branch] = msgpack.packb([kind, counts, ptrs])
        target = branch
    else:
        io.atoms[leaf] = msgpack.packb("hello")
    w = Vector._load(header, io)
    if target == leaf:
        assert w[0] == 0 and w[-1] == 9999  # paths that avoid the damage still read
    with pytest.raises(CorruptionError) as exc:
        w[200]
    assert exc.value.offset == target
    with pytest.raises(CorruptionError):
        list(w)


def test_a_damaged_header_raises_corruption_error():
    io = ListIO()
    header = Vector(range(300))._persist(io)
    good = io.atoms[header]
    for bad in (b"\xc1", msgpack.packb(["pvec", 1, 2]), msgpack.packb(["nope", 1, 0, 0, 0, 0]),
                msgpack.packb(["pvec", -1, 0, 0, 0, 0]), msgpack.packb(["pvec", 0, 3, 0, 0, 0])):
        io.atoms[header] = bad
        with pytest.raises(CorruptionError) as exc:
            Vector._load(header, io)
        assert exc.value.offset == header
    io.atoms[header] = good
    assert Vector._load(header, io) == list(range(300))


def test_a_root_whose_count_disagrees_with_the_header_is_corruption():
    io = ListIO()
    header = Vector(range(1000))._persist(io)
    tag, tcount, height, root, tlen, tail = msgpack.unpackb(io.atoms[header])
    io.atoms[header] = msgpack.packb([tag, tcount + 1, height, root, tlen, tail])
    w = Vector._load(header, io)
    with pytest.raises(CorruptionError) as exc:
        w[0]
    assert exc.value.offset == root


# -- large sizes -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_million_items():
    rnd = random.Random(1)
    n = 1_000_000
    m = Vector().mutate()
    for i in range(n):
        m.append(i)
    v = m.finish()
    ref = list(range(n))
    for _ in range(20_000):
        i = rnd.randrange(-n, n)
        assert v[i] == ref[i]
    for _ in range(10):
        a, b = rnd.randrange(-n, n), rnd.randrange(-n, n)
        s = v[a:b]
        s._check()
        assert s == ref[a:b]
    m = v.mutate()
    for _ in range(50):
        i = rnd.randrange(len(ref))
        if rnd.random() < 0.5:
            m.insert(i, -i)
            ref.insert(i, -i)
        else:
            assert m.pop(i) == ref.pop(i)
    del m[300_000:700_000]
    del ref[300_000:700_000]
    m[10:10] = range(5000)
    ref[10:10] = range(5000)
    m._check()
    assert m == ref
    assert v == list(range(n))  # the snapshot taken before the edits
    v._check()
