"""Tests of the persistent hash trie (protobase._core.hamt), differential against dict/set."""
import datetime as dt
import enum
import gc
import json
import os
import subprocess
import sys
import uuid
import weakref
from decimal import Decimal
from fractions import Fraction

import msgpack
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protobase._core import hamt
from protobase.errors import CorruptionError

Map, MapMutation, HashSet, HashSetMutation = hamt.Map, hamt.MapMutation, hamt.HashSet, hamt.HashSetMutation

MERSENNE = 2 ** 61 - 1   # Python's numeric hash modulus: k and k + MERSENNE share a hash


# ----------------------------------------------------------------------------------------
# Key strategies: edge-biased (small ints, numeric aliases, full-hash collisions, shared
# hash prefixes, str/bytes/tuples).

colliding_ints = st.builds(lambda base, j: base + j * MERSENNE, st.integers(0, 3), st.integers(0, 3))
prefix_sharing_ints = st.builds(lambda lo, hi: lo + (hi << 35), st.integers(0, 3), st.integers(0, 7))
keys = st.one_of(
    st.integers(-5, 70),
    colliding_ints,
    prefix_sharing_ints,
    st.sampled_from([1.0, True, False, 0.5, -1, -2, Decimal(3), Fraction(1, 2), None]),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.tuples(st.integers(0, 3), st.text(max_size=1)),
)
values = st.integers(0, 5)


class AtomIO:
    """A test storage: atoms in a Python list, msgpack as the codec; counts reads and writes."""

    def __init__(self):
        self.atoms = []
        self.reads = []
        self.writes = 0

    def write_atom(self, data):
        self.atoms.append(bytes(data))
        self.writes += 1
        return len(self.atoms) - 1

    def read_atom(self, ptr):
        self.reads.append(ptr)
        return self.atoms[ptr]

    def encode(self, obj):
        return msgpack.packb(obj)

    def decode(self, data):
        return msgpack.unpackb(data, strict_map_key=False, use_list=True)


def _reference_after(d, key, value):
    """dict semantics of m.set(key, value): an existing equal key keeps its original object."""
    out = dict(d)
    out[key] = value
    return out


# ----------------------------------------------------------------------------------------
# Stateful machines: every step compared with dict/set, _check() after every step, and every
# older version kept and re-verified so that no later edit ever leaks into it.

class MapMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.m = Map()
        self.d = {}
        self.mut = None
        self.mut_d = None
        self.old = []          # (persistent version, dict snapshot)

    def _keep(self):
        self.old.append((self.m, dict(self.d)))
        if len(self.old) > 12:
            self.old.pop(0)

    @rule(k=keys, v=values)
    def set(self, k, v):
        self._keep()
        self.m = self.m.set(k, v)
        self.d = _reference_after(self.d, k, v)

    @rule(k=keys)
    def delete(self, k):
        self._keep()
        if k in self.d:
            self.m = self.m.delete(k)
            del self.d[k]
        else:
            with pytest.raises(KeyError):
                self.m.delete(k)

    @rule(k=keys)
    def discard(self, k):
        self._keep()
        before = self.m
        self.m = self.m.discard(k)
        if k not in self.d:
            assert self.m is before
        self.d.pop(k, None)

    @rule()
    def start_mutation(self):
        self.mut = self.m.mutate()
        self.mut_d = dict(self.d)

    @precondition(lambda self: self.mut is not None)
    @rule(k=keys, v=values)
    def mut_set(self, k, v):
        self.mut[k] = v
        self.mut_d[k] = v

    @precondition(lambda self: self.mut is not None)
    @rule(k=keys)
    def mut_del(self, k):
        if k in self.mut_d:
            del self.mut[k]
            del self.mut_d[k]
        else:
            with pytest.raises(KeyError):
                del self.mut[k]

    @precondition(lambda self: self.mut is not None)
    @rule(k=keys)
    def mut_pop(self, k):
        assert self.mut.pop(k, "absent") == self.mut_d.pop(k, "absent")

    @precondition(lambda self: self.mut is not None)
    @rule()
    def finish(self):
        self._keep()
        self.m = self.mut.finish()
        self.d = dict(self.mut_d)

    @invariant()
    def agrees_with_dict(self):
        self.m._check()
        assert len(self.m) == len(self.d)
        assert self.m == self.d
        assert sorted(map(repr, self.m.items())) == sorted(map(repr, self.d.items()))
        for k, v in self.d.items():
            assert self.m[k] == v and k in self.m
        if self.mut is not None:
            self.mut._check()
            assert len(self.mut) == len(self.mut_d)
            assert dict(self.mut.items()) == self.mut_d

    @invariant()
    def old_versions_never_change(self):
        for version, snapshot in self.old:
            assert len(version) == len(snapshot)
            assert version == snapshot


MapMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, derandomize=True,
                                        deadline=None)
test_map_machine = MapMachine.TestCase


class SetMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.s = HashSet()
        self.ref = set()
        self.mut = HashSet().mutate()
        self.mut_ref = set()
        self.old = []

    @rule(k=keys)
    def add(self, k):
        self.old.append((self.s, set(self.ref)))
        self.s = self.s.add(k)
        self.ref.add(k)

    @rule(k=keys)
    def discard(self, k):
        self.old.append((self.s, set(self.ref)))
        self.s = self.s.discard(k)
        self.ref.discard(k)

    @rule(k=keys)
    def mut_add(self, k):
        self.mut.add(k)
        self.mut_ref.add(k)

    @rule(k=keys)
    def mut_remove(self, k):
        if k in self.mut_ref:
            self.mut.remove(k)
            self.mut_ref.remove(k)
        else:
            with pytest.raises(KeyError):
                self.mut.remove(k)

    @rule()
    def mut_finish(self):
        self.old.append((self.mut.finish(), set(self.mut_ref)))

    @invariant()
    def agrees_with_set(self):
        self.s._check()
        self.mut._check()
        assert self.s == self.ref and len(self.s) == len(self.ref)
        assert self.mut == self.mut_ref
        for version, snapshot in self.old[-15:]:
            assert version == snapshot


SetMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, derandomize=True,
                                        deadline=None)
test_set_machine = SetMachine.TestCase


# ----------------------------------------------------------------------------------------
# Sizes around node widths, bulk builds, canonical shape

@pytest.mark.parametrize("n", [0, 1, 2, 31, 32, 33, 1023, 1024, 1025, 5000])
def test_build_and_delete_all_match_dict_at_node_width_sizes(n):
    d = {i * 37 - 100: str(i) for i in range(n)}
    d.update({f"s{i}": i for i in range(n)})
    m = Map(d)
    m._check()
    assert m == d and len(m) == len(d)
    mm = m.mutate()
    for i, k in enumerate(list(d)):
        del mm[k]
        if i % 97 == 0:
            mm._check()
    mm._check()
    assert len(mm) == 0 and mm.finish() == {}
    assert m == d   # the source never changed


class ReprIO(AtomIO):
    """Encodes nodes with repr(): a structural fingerprint for any key type."""

    def encode(self, obj):
        return repr(obj).encode()


def _persisted_atoms(m):
    io = ReprIO()
    m._persist(io)
    return io.atoms


@settings(derandomize=True, max_examples=40, deadline=None)
@given(st.lists(keys, unique_by=lambda k: (type(k) is str, type(k) is bytes, type(k) is tuple, k),
                max_size=60), st.randoms(use_true_random=False))
def test_shape_depends_only_on_the_keys_not_on_the_edit_history(ks, rnd):
    ks = list({k: None for k in ks})      # one representative per dict key, first wins
    forward = Map((k, 0) for k in ks)
    shuffled = ks[:]
    rnd.shuffle(shuffled)
    extra = [10 ** 6 + i for i in range(40)]
    churned = Map((k, 0) for k in extra + shuffled)
    mm = churned.mutate()
    for k in extra:
        del mm[k]
    churned = mm.finish()
    churned._check()
    assert churned == forward
    # Collision nodes keep insertion order, so compare the shapes only when none exists.
    if len({hamt.stable_hash(k) for k in ks}) == len(ks):
        assert list(forward) == list(churned)
        assert _persisted_atoms(forward) == _persisted_atoms(churned)


@pytest.mark.slow
def test_large_random_edit_sequence_matches_dict():
    import random
    rnd = random.Random(7)
    m, d = Map(), {}
    mm = m.mutate()
    for step in range(200_000):
        k = rnd.randrange(60_000) if step % 3 else f"k{rnd.randrange(60_000)}"
        if rnd.random() < 0.7:
            mm[k] = step
            d[k] = step
        else:
            assert mm.pop(k, None) == d.pop(k, None)
    mm._check()
    assert mm.finish() == d


# ----------------------------------------------------------------------------------------
# Keys: numeric aliases, NaN, allowed types, TypeError for anything else

def test_numeric_aliases_are_one_key_and_keep_the_first_key_object():
    m = Map().set(1, "int")
    last = "int"
    for alias in (1.0, True, Decimal(1), Fraction(1)):
        assert m[alias] == last
        last = type(alias).__name__
        m = m.set(alias, last)
        assert len(m) == 1
    assert type(next(iter(m))) is int and m[1] == "Fraction"
    assert Map({0: "a"})[False] == "a" and Map({0: "a"}).get(0.0) == "a"
    assert hamt.stable_hash(1) == hamt.stable_hash(1.0) == hamt.stable_hash(True) \
        == hamt.stable_hash(Decimal(1)) == hamt.stable_hash(Fraction(1))
    assert hamt.stable_hash(2 ** 80) == hash(2 ** 80)
    assert hamt.stable_hash(-1) == -2


def test_all_nans_are_one_key_even_inside_tuples():
    nan1, nan2 = float("nan"), float("nan")
    m = Map().set(nan1, 1).set(nan2, 2).set(Decimal("NaN"), 3)
    assert len(m) == 1 and m[float("nan")] == 3
    t = Map().set((1, nan1), "a").set((1, nan2), "b")
    assert len(t) == 1 and t[(1, float("nan"))] == "b"
    assert hamt.stable_hash(nan1) == hamt.stable_hash(nan2) == hamt.stable_hash(Decimal("NaN"))


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Level(enum.IntEnum):
    LOW = 1


def test_every_allowed_key_type_round_trips_and_equal_keys_coincide():
    tz = dt.timezone(dt.timedelta(hours=2))
    ks = [None, False, 7, 2.5, "é✓", b"\x00b", (1, ("x", b"y")), frozenset({1, "a"}),
          dt.date(2024, 1, 2), dt.datetime(2024, 1, 2, 3, 4, 5), dt.datetime(2024, 1, 2, 3, tzinfo=tz),
          dt.time(1, 2, 3), dt.time(1, 2, tzinfo=tz), dt.timedelta(days=3), Decimal("2.25"),
          Fraction(7, 3), uuid.UUID(int=12345), Color.RED, "\ud800"]
    m = Map((k, i) for i, k in enumerate(ks))
    m._check()
    assert len(m) == len(ks)
    for i, k in enumerate(ks):
        assert m[k] == i
    # Values equal under == are the same key, as in dict.
    assert m[dt.datetime(2024, 1, 2, 1, tzinfo=dt.timezone.utc)] == ks.index(dt.datetime(2024, 1, 2, 3, tzinfo=tz))
    assert m[frozenset({"a", 1.0})] == 7 and m[(1.0, ("x", b"y"))] == 6
    assert m[Decimal("2.5")] == 3 and m[Fraction(5, 2)] == 3
    assert Map({1: "x"})[Level.LOW] == "x"
    assert hamt.stable_hash(Level.LOW) == hamt.stable_hash(1)


@pytest.mark.parametrize("bad", [[1], {"a": 1}, {1}, object(), bytearray(b"x"), (1, [2]),
                                 frozenset({(1, object())}), type("S", (str,), {})("x")])
def test_keys_outside_the_allowed_types_raise_typeerror_naming_the_type(bad):
    inner = bad
    while isinstance(inner, (tuple, frozenset)):
        inner = next(iter(inner))[-1] if isinstance(inner, frozenset) else inner[-1]
    with pytest.raises(TypeError, match=type(inner).__name__):
        hamt.stable_hash(bad)
    m = Map({1: 1})
    for op in (lambda: m.set(bad, 1), lambda: m[bad], lambda: bad in m, lambda: m.delete(bad)):
        with pytest.raises(TypeError):
            op()
    with pytest.raises(TypeError):
        HashSet().add(bad)


def test_a_failed_insert_leaves_the_mutation_intact():
    d = {i: i for i in range(500)}
    mm = Map(d).mutate()
    for bad in [(1, 2, [3]), frozenset({1, object()}), [1], (1, (2, {}))]:
        with pytest.raises(TypeError):
            mm[bad] = 1
        with pytest.raises(TypeError):
            mm.update([(1000, 1), (bad, 2)])
        d[1000] = 1                        # update() applied the pairs before the bad one
        mm._check()
        assert mm == d and len(mm) == len(d)
    s = HashSet(range(100)).mutate()
    with pytest.raises(TypeError):
        s.update([500, (1, object()), 501])
    s._check()
    assert s == set(range(100)) | {500}


def _hostile_enum(name):
    class Hostile(enum.Enum):
        A = 1

        def __eq__(self, other):
            raise RuntimeError("hostile __eq__")

        __hash__ = enum.Enum.__hash__

    Hostile.__qualname__ = name
    return Hostile


def test_hostile_eq_raising_on_a_full_hash_collision_leaves_the_structure_intact():
    first, second = _hostile_enum("Twin"), _hostile_enum("Twin")
    assert hamt.stable_hash(first.A) == hamt.stable_hash(second.A)   # forced collision
    d = {i: i for i in range(100)}
    mm = Map(d).mutate()
    mm[first.A] = "first"
    for op in (lambda: mm.__setitem__(second.A, "second"), lambda: mm[second.A],
               lambda: mm.__delitem__(second.A), lambda: mm.pop(second.A, None)):
        with pytest.raises(RuntimeError, match="hostile"):
            op()
        mm._check()
        assert len(mm) == 101 and mm[first.A] == "first"
    snap = mm.finish()
    with pytest.raises(RuntimeError):
        snap.set(second.A, 1)
    assert snap[first.A] == "first" and len(snap) == 101


# ----------------------------------------------------------------------------------------
# Collisions

def test_full_hash_collisions_live_in_collision_nodes_and_split_cleanly():
    base = [5 + j * MERSENNE for j in range(6)]
    assert len({hamt.stable_hash(k) for k in base}) == 1
    near = [5 + (1 << 40), 5 + (2 << 40), 5 + 32]     # share low chunks with the colliders
    m = Map()
    ref = {}
    for k in base + near:
        m = m.set(k, k)
        ref[k] = k
        m._check()
        assert m == ref
    for k in base[:-1] + near:                           # down to one key: pulled back up
        m = m.delete(k)
        del ref[k]
        m._check()
        assert m == ref
    assert list(m) == [base[-1]]
    # -1 and -2 share Python's numeric hash too.
    assert Map({-1: "a", -2: "b"}) == {-1: "a", -2: "b"}


def test_colliding_strings_found_by_hash_truncation_share_deep_prefixes():
    # Strings whose hashes agree in their low 15 bits: three trie levels of shared path.
    seen = {}
    pairs = []
    i = 0
    while len(pairs) < 20:
        s = f"w{i}"
        low = hamt.stable_hash(s) & 0x7FFF
        if low in seen:
            pairs.append((seen[low], s))
        seen[low] = s
        i += 1
    d = {k: n for n, pair in enumerate(pairs) for k in pair}
    m = Map(d)
    m._check()
    assert m == d
    for a, b in pairs:
        m = m.delete(a)
        m._check()
        assert b in m and a not in m


# ----------------------------------------------------------------------------------------
# Stable across processes

_SCRIPT = r"""
import json
from protobase._core import hamt
keys = ["alpha", "beta", "gamma", "é", b"raw", ("t", 1, b"x"), frozenset({"a", "b"}), 3.5, None]
keys += [f"k{i}" for i in range(300)]
m = hamt.Map((k, i) for i, k in enumerate(keys))
print(json.dumps([keys.index(k) for k in m]))
print([hamt.stable_hash(k) for k in keys])
"""


def test_str_hashes_are_pinned_whatever_path_computes_them():
    # Stored tries place keys by these values: ASCII text (hashed in place) and other text
    # (hashed through its UTF-8 form) must keep exactly the hashes files were written with.
    pinned = {"": -5890263577396988150, "a": -1476900590169645665, "alpha": -7082420522846313458,
              "k123": -6361892206284631929, "x" * 100: 674078459411377171,
              "é": -1293788672449387162, "日本": 7384999738381256128,
              "a\ud800": -8256810753141583704, b"alpha": 8458955882304889945}
    for key, h in pinned.items():
        assert hamt.stable_hash(key) == h, key
    for text in ("alpha", "é", "x" * 100):   # a str built another way hashes the same
        assert hamt.stable_hash(text) == hamt.stable_hash("".join(list(text)))


def test_hashes_and_trie_order_are_identical_under_any_pythonhashseed(child_cwd):
    import protobase
    root = os.path.dirname(os.path.abspath(list(protobase.__path__)[0]))   # the package's parent
    outputs = set()
    for seed in ("0", "1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                             check=True, cwd=child_cwd).stdout
        outputs.add(out)
    assert len(outputs) == 1
    order = json.loads(outputs.pop().splitlines()[0])
    assert sorted(order) == list(range(309))


# ----------------------------------------------------------------------------------------
# Transients and persistent updates

def test_mutation_edits_never_reach_the_source_or_an_earlier_snapshot():
    base = Map({i: i for i in range(2000)})
    mm = base.mutate()
    for i in range(0, 2000, 3):
        mm[i] = -i
    snap1 = mm.finish()
    for i in range(0, 2000, 2):
        mm[i] = "x"
    del mm[1]
    snap2 = mm.finish()
    mm[1] = "back"
    assert base == {i: i for i in range(2000)}
    assert snap1 == {i: (-i if i % 3 == 0 else i) for i in range(2000)}
    assert len(snap2) == 1999 and 1 not in snap2 and snap2[4] == "x"
    assert mm[1] == "back"
    for x in (base, snap1, snap2, mm):
        x._check()


def test_a_mutation_copies_a_shared_path_once_then_edits_it_in_place():
    import tracemalloc
    keys = [f"k{i}" for i in range(20_000)]
    base = Map((k, 0) for k in keys)
    touched = keys[::50]
    first, second = [object() for _ in touched], [object() for _ in touched]
    mm = base.mutate()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for i in range(len(touched)):
            mm[touched[i]] = first[i]
        copied = tracemalloc.get_traced_memory()[0] - start      # the new, owned paths
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        for i in range(len(touched)):
            mm[touched[i]] = second[i]
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert copied > 100 * len(touched)          # each first edit copied nodes
    assert peak - start < 1024                  # the second round allocated nothing
    assert all(base[k] == 0 for k in touched)
    assert all(mm[touched[i]] is second[i] for i in range(len(touched)))
    mm._check()


def test_updates_that_change_nothing_return_the_same_object():
    v = object()
    m = Map({"a": v})
    assert m.set("a", v) is m and m.discard("zz") is m
    s = HashSet([1, 2])
    assert s.add(1) is s and s.discard(9) is s


def test_iterating_a_mutation_sees_a_snapshot_even_while_editing():
    mm = Map({i: i for i in range(300)}).mutate()
    seen = []
    for k in mm:
        seen.append(k)
        mm[k + 1000] = 0
        if k % 2:
            del mm[k]
    assert sorted(seen) == list(range(300))
    mm._check()
    assert len(mm) == 150 + 300


def test_map_api_views_repr_and_equality():
    d = {i: str(i) for i in range(30)}
    m = Map(d)
    assert set(m.keys()) == set(d) and sorted(m.values()) == sorted(d.values())
    assert set(m.items()) == set(d.items()) and len(m.items()) == 30
    assert (3, "3") in m.items() and "3" in m.values() and 3 in m.keys()
    assert m.get(99) is None and m.get(99, "dflt") == "dflt"
    with pytest.raises(KeyError):
        m[99]
    assert m == Map(d) and m != Map({**d, 0: "other"}) and m != {**d, 99: "x"}
    assert m != {object(): 1, **{i: str(i) for i in range(29)}}
    assert not (m == [1, 2])
    assert repr(m).startswith("Map({") and repr(m).endswith("...})")
    mm = m.mutate()
    mm.update({100: "a"}, extra="b")
    mm.update([(101, "c")])
    assert mm.pop(100) == "a" and mm.pop(100, None) is None
    with pytest.raises(KeyError):
        mm.pop(100)
    assert mm["extra"] == "b" and 101 in mm and mm.get(101) == "c"
    mm.set(102, "d")
    assert mm.finish() == {**d, "extra": "b", 101: "c", 102: "d"}
    import collections.abc as abc
    assert isinstance(m, abc.Mapping) and isinstance(mm, abc.MutableMapping)
    assert Map(m) == d and Map(m.items()) == d


def test_hashset_api_and_equality_with_set_and_frozenset():
    s = HashSet(range(40))
    assert s == set(range(40)) and s == frozenset(range(40)) and s != set(range(41))
    assert 5 in s and 5.0 in s and 40 not in s
    with pytest.raises(KeyError):
        s.remove(40)
    assert s.remove(3) == set(range(40)) - {3} and s == set(range(40))
    m = s.mutate()
    m.update(["a", "b"])
    m.discard("a")
    m.add(2.0)
    assert m.finish() == set(range(40)) | {"b"}
    assert s != {object()} | set(range(39))
    assert repr(HashSet([1])) == "HashSet({1})"


def test_every_operation_returns_its_own_kind_and_a_map_never_equals_a_set():
    # The four classes share two bases and one set of helpers: each result must still be
    # of the caller's kind, and kind-dependent behaviour must not cross over.
    io = AtomIO()
    m, s = Map({1: "a", 2: "b"}), HashSet([1, 2])
    assert [type(x) for x in (m.set(3, "c"), m.delete(1), m.discard(1), m.discard(9))] == [Map] * 4
    assert [type(x) for x in (s.add(3), s.remove(1), s.discard(1), s.add(1))] == [HashSet] * 4
    mm, sm = m.mutate(), s.mutate()
    assert type(mm) is MapMutation and type(sm) is HashSetMutation
    assert type(mm.finish()) is Map and type(sm.finish()) is HashSet
    assert type(Map(m)) is Map and type(HashSet(s)) is HashSet
    lm, ls = Map._load(m._persist(io), io), HashSet._load(s._persist(io), io)
    assert type(lm) is Map and type(ls) is HashSet and lm == m and ls == s
    assert type(lm.set(3, "c")) is Map and type(ls.add(3)) is HashSet
    assert io.decode(io.atoms[m._persist(io)])[0] == 16 and io.decode(io.atoms[s._persist(io)])[0] == 17
    assert m != s and s != m and mm != sm and sm != mm and m != {1, 2} and s != {1: "a", 2: "b"}
    assert m == {1: "a", 2: "b"} and mm == m and s == {1, 2} and sm == s
    assert repr(mm) == "MapMutation({1: 'a', 2: 'b'})" and repr(sm) == "HashSetMutation({1, 2})"
    assert [len(x) for x in (m, s, mm, sm)] == [2, 2, 2, 2]
    for x in (m, s, mm, sm):
        with pytest.raises(TypeError):
            hash(x)
    assert not hasattr(s, "get") and not hasattr(sm, "keys") and not hasattr(mm, "_persist")
    assert list(m.keys()) == [1, 2] and list(mm.values()) == ["a", "b"]


def test_a_value_cycle_through_the_map_is_collected():
    class Box:
        pass

    box = Box()
    box.m = Map({i: box for i in range(100)})
    ref = weakref.ref(box)
    del box
    gc.collect()
    assert ref() is None


# ----------------------------------------------------------------------------------------
# Persistence and lazy loading

def test_persist_and_load_round_trip_equals_the_dict():
    d = {i: f"v{i}" for i in range(3000)}
    d.update({f"s{i}": i for i in range(300)})
    d.update({5 + j * MERSENNE: j for j in range(4)})      # a collision node on disk
    io = AtomIO()
    ptr = Map(d)._persist(io)
    loaded = Map._load(ptr, io)
    assert len(io.reads) == 1 and len(loaded) == len(d)    # only the header so far
    assert loaded == d
    loaded._check()
    s = HashSet(d)
    sptr = s._persist(io)
    assert HashSet._load(sptr, io) == set(d)


def test_a_mutation_of_a_loaded_map_copies_frozen_nodes_and_matches_the_dict():
    # Loaded nodes are frozen (owner None): the mutation's in-place walk must leave them to the
    # copying path, and the hashes recomputed on load must place later edits correctly.
    d = {i: i for i in range(5000)}
    d.update({5 + j * MERSENNE: -j for j in range(3)})     # a collision node on disk
    io = AtomIO()
    loaded = Map._load(Map(d)._persist(io), io)
    mm = loaded.mutate()
    expect = dict(d)
    edits = list(range(0, 6000, 7)) + [5 + 3 * MERSENNE, 5 + MERSENNE, 5, 5 + 2 * MERSENNE]
    for step, k in enumerate(edits):
        if step % 3 == 2 and k in expect:
            del mm[k]
            del expect[k]
        else:
            mm[k] = step
            expect[k] = step
        if step % 97 == 0:
            mm._check()
    mm._check()
    assert mm == expect
    snapshot = mm.finish()
    snapshot._check()
    assert snapshot == expect
    assert loaded == d
    loaded._check()


def test_a_get_on_a_loaded_map_reads_only_one_path():
    d = {i: i for i in range(40_000)}
    io = AtomIO()
    ptr = Map(d)._persist(io)
    loaded = Map._load(ptr, io)
    io.reads.clear()
    assert loaded[12345] == 12345
    assert 2 <= len(io.reads) <= 5                        # root ... leaf, nothing else
    before = len(io.reads)
    assert loaded[12345] == 12345 and len(io.reads) == before   # resolved slots are kept
    assert loaded.get(-7) is None


def test_a_second_commit_writes_only_the_new_nodes():
    io = AtomIO()
    m = Map({i: i for i in range(40_000)})
    ptr = m._persist(io)
    assert m._persist(io) == ptr and io.writes == len(io.atoms)     # nothing new: no writes
    first = io.writes
    loaded = Map._load(ptr, io)
    m2 = loaded.set(777, "changed").set(40_001, "new")
    ptr2 = m2._persist(io)
    written = io.writes - first
    assert 2 <= written <= 10                          # two short paths plus one header
    again = Map._load(ptr2, io)
    assert again[777] == "changed" and again[40_001] == "new" and len(again) == 40_001
    assert Map._load(ptr, io)[777] == 777              # the first commit is untouched
    mm = again.mutate()                                # persisted nodes are copied, not edited
    mm[1] = "m"
    assert Map._load(ptr2, io)[1] == 1 and again[1] == 1
    again._check()


def _damage(io, ptr, rec):
    io.atoms[ptr] = msgpack.packb(rec)


@pytest.mark.parametrize("where, damage", [
    ("root", lambda rec: b"\xc1garbage"),
    ("root", lambda rec: [99] + rec[1:]),
    ("root", lambda rec: rec[:-1]),
    ("root", lambda rec: [rec[0], rec[1] | rec[2], rec[2]] + rec[3:]),
    ("root", lambda rec: rec[:5] + [[-1 for _ in rec[5]]]),
    ("root", lambda rec: rec[:5] + [[str(p) for p in rec[5]]]),
    ("root", lambda rec: "not a node"),
    ("leaf", lambda rec: rec[:3] + [rec[3][1:]] + rec[4:]),
    ("leaf", lambda rec: rec[:3] + [[k + 1 for k in rec[3]]] + rec[4:]),
    ("leaf", lambda rec: rec[:3] + [[[1, 2] for _ in rec[3]]] + rec[4:]),
    ("leaf", lambda rec: [rec[0], rec[1], rec[1] ^ 0xFFFFFFFF, rec[3], rec[4], []]),
    ("leaf", lambda rec: [rec[0], 1 << 40] + rec[2:]),
])
def test_damaged_node_data_raises_corruption_error_with_the_offset(where, damage):
    io = AtomIO()
    m = Map({i: i for i in range(2000)})
    ptr = m._persist(io)
    target = msgpack.unpackb(io.atoms[ptr])[2] if where == "root" else 0   # atom 0: a leaf
    rec = msgpack.unpackb(io.atoms[target], use_list=True, strict_map_key=False)
    assert where == "root" or (rec[3] and not rec[5])
    new = damage(rec)
    if isinstance(new, bytes):
        io.atoms[target] = new
    else:
        _damage(io, target, new)
    loaded = Map._load(ptr, io)
    with pytest.raises(CorruptionError) as info:
        loaded._check()
    assert info.value.offset == target
    with pytest.raises(CorruptionError):                  # lookups see it too, never a wrong answer
        for i in range(2000):
            assert loaded[i] == i


def test_damaged_header_and_deep_nodes_raise_corruption_error():
    io = AtomIO()
    ptr = Map({i: i for i in range(5000)})._persist(io)
    _damage(io, ptr, [16, -1, 0])
    with pytest.raises(CorruptionError) as info:
        Map._load(ptr, io)
    assert info.value.offset == ptr
    with pytest.raises(CorruptionError):
        HashSet._load(Map({1: 1})._persist(io), io)          # a map header is not a set
    io = AtomIO()
    ptr = Map({i: i for i in range(5000)})._persist(io)
    leaf = 0                                                  # the first atom written: a leaf
    rec = msgpack.unpackb(io.atoms[leaf], use_list=True, strict_map_key=False)
    rec[3] = [k ^ 1 for k in rec[3]]                          # keys moved to wrong slots
    _damage(io, leaf, rec)
    loaded = Map._load(ptr, io)
    with pytest.raises(CorruptionError) as info:
        list(loaded.items())
    assert info.value.offset == leaf


def test_keys_and_values_are_released_exactly_once():
    keys = [f"key-{i}" * 3 for i in range(3000)] + [5 + j * MERSENNE for j in range(1, 5)]
    vals = [object() for _ in keys]
    before = [sys.getrefcount(k) for k in keys] + [sys.getrefcount(v) for v in vals]
    m = Map(zip(keys, vals))
    versions = [m.set(k, vals[0]).delete(keys[-1]) for k in keys[:50]]
    mm = m.mutate()
    for i in range(0, len(keys), 2):
        del mm[keys[i]]
    mm.update(zip(keys[::3], vals[::3]))
    s = HashSet(keys).mutate()
    s.update(keys[::5])
    io = AtomIO()
    Map._load(Map(zip(keys[:100], range(100)))._persist(io), io)._check()
    assert len(mm.finish()) == len(set(keys[1::2]) | set(keys[::3]))
    del m, versions, mm, s, io
    gc.collect()
    after = [sys.getrefcount(k) for k in keys] + [sys.getrefcount(v) for v in vals]
    assert after == before


# -- garbage collection: atomic tries leave their nodes untracked ------------------------

def _tracked_nodes():
    import gc
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "Node" and type(o).__module__.endswith("hamt"))


class _Box:
    """A GC-tracked value that can point back at the structure holding it."""


def test_atomic_tries_leave_their_nodes_untracked_until_a_tracked_value_arrives():
    import gc
    gc.collect()
    before = _tracked_nodes()
    m = hamt.MapMutation()
    for i in range(5000):
        m[f"k{i}"] = b"v%d" % i
    m._check()
    assert _tracked_nodes() - before <= 2      # the empty roots made before the first insert
    snap = m.finish()
    p = snap.set("x", b"y")
    p._check()
    assert _tracked_nodes() - before <= 2
    m["box"] = _Box()                          # the mutation stops being atomic: all tracked
    m._check()
    assert _tracked_nodes() - before > 100
    q = snap.set("box", _Box())               # a persistent set tracks just its new path
    q._check()


@pytest.mark.parametrize("how", ["mutation", "persistent", "constructor"])
def test_a_cycle_through_a_value_is_collected(how):
    import gc
    import weakref
    box = _Box()
    ref = weakref.ref(box)
    if how == "mutation":
        m = hamt.MapMutation()
        for i in range(3000):                  # owned untracked nodes edited in place next
            m[i] = str(i)
        m[1500] = box
        box.back = m
    elif how == "persistent":
        base = hamt.Map({i: str(i) for i in range(3000)})
        m = base.set(1500, box)
        box.back = m
    else:
        m = hamt.Map({**{i: str(i) for i in range(3000)}, 1500: box})
        box.back = m
    m._check()
    del m, box
    if how == "persistent":
        del base
    gc.collect()
    assert ref() is None


def test_a_tracked_key_makes_a_set_mutation_track_its_nodes():
    m = hamt.HashSetMutation()
    for i in range(3000):
        m.add(i)
    m.add(tuple([1, "a"]))                    # a fresh tuple is tracked until a collection
    m._check()                                # nothing tracked below an untracked node
    assert tuple([1, "a"]) in m and len(m) == 3001


def test_loaded_leaves_holding_nothing_tracked_stay_untracked_and_the_rest_is_tracked():
    import gc
    io = AtomIO()
    src = {f"k{i}": b"v" for i in range(4000)}
    src.update({f"t{i}": [i, i] for i in range(50)})     # decoded lists are tracked values
    ptr = Map(src)._persist(io)
    gc.collect()
    before = _tracked_nodes()
    loaded = Map._load(ptr, io)
    loaded._check()                                          # loads every node, checks GC rule
    assert dict(loaded.items()) == src
    tracked = _tracked_nodes() - before
    # the internal nodes and the leaves holding a list are tracked, the other leaves not
    assert 50 <= tracked < 400
    m = loaded.mutate()
    m["box"] = _Box()
    m["k1"] = b"changed"
    m._check()
    assert m["k1"] == b"changed" and len(m) == len(src) + 1
