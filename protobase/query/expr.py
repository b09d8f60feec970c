"""F expressions and predicates: what a query asks, and the one comparison rule.

``F.price`` names a field path (``F.a.b``, ``F["a"]["b"]`` and ``F("a.b")`` are the same
path); comparing it builds a :class:`Term`; terms combine with ``&``, ``|`` and ``~``.
A predicate is a plain tree that anyone can evaluate against one value with
``pred.matches(value)``; the planner (planner.py) reads the same tree to use indexes.
Both must agree, so every comparison in the package goes through the functions here.

The comparison rule (DESIGN.md §6, docs/internals.md "Key rules")
-----------------------------------------------------------------
* A value that is a valid btree key (None, numbers, str, bytes, dates, UUID, Enum, and
  tuples/frozensets of those...) has a *type class*, ``btree.type_class``. Two such values
  are equal when their classes match and ``btree.compare`` says 0, and ordered by
  ``btree.compare`` when their classes match. So ``1 == 1.0 == True == Decimal(1)``, all
  NaNs are one value (placed after every other number), and values of different classes
  are unequal and unordered: ``<``, ``<=``, ``>``, ``>=`` are False, ``!=`` is True.
* Any other value (list, dict, set, complex, an object...) is *unorderable*: it equals
  only another unorderable value that ``==`` says is equal (an ``==`` that raises or does
  not give a plain truth value counts as unequal), and no ordering term matches it.
* A term on a missing field is False, whatever the operator; ``~p`` is the complement
  of ``p`` over the collection, so it matches rows where the field is missing.

Nothing here ever raises while matching: a mixed-type comparison is simply False. A
malformed query (an operand that is not a value, ``in_`` of a non-iterable, a range
operand that cannot be ordered...) raises :class:`~protobase.errors.QueryError` when the
term is built.
"""
import itertools
import types
from typing import Any, Iterable
from collections.abc import Mapping, MutableSequence, MutableSet

from .._core import load
from ..errors import QueryError

__all__ = ["F", "Field", "Predicate", "Term", "And", "Or", "Not", "All", "MISSING",
           "StoredCollection", "extract", "split_path", "key_class", "values_equal",
           "compare_ordered"]

_btree = load("btree")
_compare = _btree.compare
_type_class = _btree.type_class
# The base of every stored collection (pb.Dict, pb.List, pb.Set, pb.SortedDict): a value
# read back holds such a handle where a collection was stored inside it.
StoredCollection = load("handle").HandleCore


class _Missing:
    """The marker for "this path does not exist in the value" (distinct from None)."""

    __slots__ = ()

    def __repr__(self):
        return "MISSING"

    def __reduce__(self):
        return "MISSING"


MISSING = _Missing()

# Exact types whose class is known without asking the kernel (the common case).
_FAST_CLASS = {type(None): 0, bool: 1, int: 1, float: 1, str: 2, bytes: 3}
# Numbers Python itself compares exactly as btree.compare does (NaN aside).
_NATIVE_NUMBERS = frozenset((int, float, bool))


def _plain_number(value):
    # An int/float/bool other than NaN: Python's operators then agree with btree order.
    return type(value) in _NATIVE_NUMBERS and value == value


# Types whose values are never valid keys: answer without a failing kernel call.
_NEVER_KEY = (list, dict, set, bytearray, complex)


def key_class(value):
    """The btree type class of ``value``, or None when it is not a valid btree key."""
    c = _FAST_CLASS.get(type(value))
    if c is not None:
        return c
    if isinstance(value, _NEVER_KEY):
        return None
    if isinstance(value, (tuple, frozenset)):
        # The kernel may rank a tuple before looking inside it: check every element here.
        for item in value:
            if key_class(item) is None:
                return None
    try:
        return _type_class(value)
    except Exception:
        return None


def _loose_equal(a, b):
    # Unorderable values: Python's == with anything odd (raising, arrays) counting as unequal.
    try:
        result = a == b
        return result if type(result) is bool else False
    except Exception:
        return False


def values_equal(a, a_class, b, b_class):
    """Equality under the comparison rule; classes come from key_class()."""
    if a_class is None or b_class is None:
        return a_class is b_class and _loose_equal(a, b)
    return a_class == b_class and _compare(a, b) == 0


def compare_ordered(a, a_class, b, b_class):
    """-1/0/1 when a and b are ordered under the rule, else None (unordered)."""
    if a_class is None or a_class != b_class:
        return None
    return _compare(a, b)


def split_path(path):
    """``"a.b"`` -> ``("a", "b")``; a tuple of segments is taken as it is."""
    if isinstance(path, tuple):
        parts = path
    elif isinstance(path, str):
        parts = tuple(path.split("."))
    else:
        raise QueryError(f"a field path is a str such as 'a.b', not {type(path).__name__}")
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise QueryError(f"invalid field path {path!r}: segments must be non-empty strings")
    return parts


# Built-in values whose attributes are methods, never fields.
_NO_ATTRIBUTES = (str, bytes, bytearray, int, float, complex, bool, list, tuple, set,
                  frozenset, type(None))


def extract(value, parts):
    """The value at the path ``parts`` (a tuple from split_path) inside ``value``.

    Each segment is a key of a mapping (a dict is looked up by key only, so ``F.items``
    never finds the dict method) or an attribute of an object. Returns MISSING when a
    segment is absent or unreadable; never raises."""
    for part in parts:
        if isinstance(value, dict):
            value = value.get(part, MISSING)
        elif isinstance(value, _NO_ATTRIBUTES) or value is MISSING:
            return MISSING
        else:
            try:
                if isinstance(value, Mapping):
                    value = value.get(part, MISSING)
                else:
                    value = getattr(value, part, MISSING)
            except Exception:
                return MISSING
        if value is MISSING:
            return MISSING
    return value


# ----------------------------------------------------------------------------- predicates

# Compiled matcher factories by expression text (see Predicate._compiled); bounded, as
# a program that builds predicates of ever new shapes must not grow memory without end.
_FACTORIES = {}
_MAX_FACTORIES = 512


class Predicate:
    """A boolean condition on one value. Combine with ``&``, ``|``, ``~``."""

    __slots__ = ("_fn",)

    def matches(self, value: Any) -> bool:
        """Whether ``value`` (a whole entry) satisfies this predicate."""
        return self.matcher()(value)

    def matcher(self):
        """The function ``value -> bool`` that decides ``matches``, built once per predicate.

        The tree is compiled into one Python expression (the way ``namedtuple`` builds its
        class), so filtering a row costs one call instead of one per node: each term
        extracts its field once, takes an inline fast path when field and operand are
        both plain str or both plain numbers (where Python's operators agree with the
        rule), and otherwise calls the term's general test. Operands and paths are bound
        as names in the namespace, never pasted into the source text."""
        return self._compiled()[0]

    def row_filter(self):
        """A generator function ``rows -> rows`` keeping the ``(key, value)`` pairs whose
        value matches: the same compiled test inlined in the loop (no call per row)."""
        return self._compiled()[1]

    def _compiled(self):
        try:
            return self._fn
        except AttributeError:
            pass
        ns = {}
        expr = self._emit(ns, itertools.count())
        # The text depends only on the tree's shape (paths, operators, which fast path),
        # so queries that differ only in their operands share one compiled factory and
        # pay a call instead of an exec.
        factory = _FACTORIES.get(expr)
        if factory is None:
            code = (f"def factory(M, EX, NN, {', '.join(ns)}):\n"
                    f"    def match(value):\n"
                    f"        return {expr}\n"
                    f"    def keep(rows):\n"
                    f"        for row in rows:\n"
                    f"            value = row[1]\n"
                    f"            if {expr}:\n"
                    f"                yield row\n"
                    f"    return match, keep\n")
            scope = {}
            exec(code, scope)
            factory = scope["factory"]
            if len(_FACTORIES) >= _MAX_FACTORIES:
                _FACTORIES.clear()
            _FACTORIES[expr] = factory
        self._fn = factory(MISSING, extract, _NATIVE_NUMBERS, *ns.values())
        return self._fn

    def _emit(self, ns, counter):
        """Python source of an expression over ``value``; constants go into ``ns``."""
        raise NotImplementedError(type(self).__name__)

    def __and__(self, other: Any) -> "Predicate":
        return And((self, _as_predicate(other)))

    def __rand__(self, other: Any) -> "Predicate":
        return And((_as_predicate(other), self))

    def __or__(self, other: Any) -> "Predicate":
        return Or((self, _as_predicate(other)))

    def __ror__(self, other: Any) -> "Predicate":
        return Or((_as_predicate(other), self))

    def __invert__(self) -> "Predicate":
        return Not(self)

    def __bool__(self) -> bool:
        raise QueryError("a predicate has no truth value: combine predicates with &, | and ~, "
                         "not with `and`, `or`, `not` or chained comparisons")


def _as_predicate(obj):
    if isinstance(obj, Predicate):
        return obj
    if isinstance(obj, Field):
        raise QueryError(f"{obj!r} is a field, not a condition; did you mean {obj!r}.exists()?")
    raise QueryError(f"expected a predicate built from F, got {type(obj).__name__}")


class All(Predicate):
    """Matches every value (``where()`` with no arguments)."""

    __slots__ = ()

    def _emit(self, ns, counter):
        return "True"

    def __repr__(self):
        return "All()"

    def __eq__(self, other):
        return isinstance(other, All)

    def __hash__(self):
        return hash(All)


class And(Predicate):
    """All of ``children`` hold (nested Ands are flattened)."""

    __slots__ = ("children",)

    def __init__(self, children):
        flat = []
        for child in children:
            child = _as_predicate(child)
            if isinstance(child, And):
                flat.extend(child.children)
            elif not isinstance(child, All):
                flat.append(child)
        self.children = tuple(flat)

    def _emit(self, ns, counter):
        if not self.children:
            return "True"
        return "(" + " and ".join(child._emit(ns, counter) for child in self.children) + ")"

    def __repr__(self):
        return "(" + " & ".join(map(repr, self.children)) + ")" if self.children else "All()"

    @classmethod
    def _of_terms(cls, terms):
        """The And of a tuple of Terms (nothing to flatten or check)."""
        node = object.__new__(cls)
        node.children = terms
        return node


class Or(Predicate):
    """Any of ``children`` holds (nested Ors are flattened)."""

    __slots__ = ("children",)

    def __init__(self, children):
        flat = []
        for child in children:
            child = _as_predicate(child)
            flat.extend(child.children if isinstance(child, Or) else (child,))
        self.children = tuple(flat)

    def _emit(self, ns, counter):
        return "(" + " or ".join(child._emit(ns, counter) for child in self.children) + ")"

    def __repr__(self):
        return "(" + " | ".join(map(repr, self.children)) + ")"


class Not(Predicate):
    """The complement of ``child`` over the collection (matches where a field is missing)."""

    __slots__ = ("child",)

    def __init__(self, child):
        self.child = _as_predicate(child)

    def _emit(self, ns, counter):
        return f"(not {self.child._emit(ns, counter)})"

    def __repr__(self):
        inner = repr(self.child)
        return f"~{inner}" if inner.startswith("(") else f"~({inner})"


# Operators a Term may carry; RANGE_OPS are answered by an ordered walk of an index.
EQ, NE, LT, LE, GT, GE = "==", "!=", "<", "<=", ">", ">="
BETWEEN, IN, STARTSWITH, CONTAINS, EXISTS = "between", "in_", "startswith", "contains", "exists"
RANGE_OPS = frozenset((LT, LE, GT, GE, BETWEEN))

_NOT_VALUES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
               types.LambdaType, types.GeneratorType, types.CoroutineType, types.ModuleType,
               type)


def _check_operand(op, value):
    if isinstance(value, (Field, Predicate)):
        raise QueryError(f"F.x {op} F.y: comparing two fields is not supported; "
                         "compare a field with a value")
    if isinstance(value, _NOT_VALUES) or value is MISSING:
        raise QueryError(f"the operand of {op} must be a value, not {type(value).__name__}")
    return value


class Term(Predicate):
    """One condition on one field path: ``Term(("a", "b"), "<", 3)``.

    ``operand`` is the value (``between``: a ``(lo, hi)`` pair; ``in_``: a tuple) and the
    precomputed ``operand_class`` its key class (or a tuple of them)."""

    __slots__ = ("parts", "op", "operand", "operand_class", "_test")

    def __init__(self, parts, op, operand=None):
        self.parts = parts
        self.op = op
        if op in (EQ, NE):
            _check_operand(op, operand)
            cls = key_class(operand)
        elif op in (LT, LE, GT, GE):
            cls = self._orderable(op, operand)
        elif op == BETWEEN:
            lo, hi = operand
            cls = (self._orderable(op, lo), self._orderable(op, hi))
        elif op == IN:
            if isinstance(operand, (str, bytes, dict)) or isinstance(operand, _NOT_VALUES):
                raise QueryError(f"in_() takes a list, tuple or set of values, not "
                                 f"{type(operand).__name__}")
            try:
                operand = tuple(operand)
            except TypeError:
                raise QueryError(f"in_() takes an iterable of values, not "
                                 f"{type(operand).__name__}") from None
            for item in operand:
                _check_operand(op, item)
            cls = tuple(key_class(item) for item in operand)
        elif op == STARTSWITH:
            if type(operand) not in (str, bytes):
                raise QueryError(f"startswith() takes a str (or bytes) prefix, not "
                                 f"{type(operand).__name__}")
            cls = key_class(operand)
        elif op == CONTAINS:
            _check_operand(op, operand)
            cls = key_class(operand)
        elif op == EXISTS:
            cls = None
        else:
            raise QueryError(f"unknown query operator {op!r}")
        self.operand = operand
        self.operand_class = cls
        self._test = None  # the general test, built when the term is first compiled

    @classmethod
    def _simple(cls, parts, op, operand, operand_class):
        """A term whose operand is a plain None/bool/int/float/str/bytes (its class
        already known): nothing to validate, so ``F.x == v`` costs one allocation."""
        term = object.__new__(cls)
        term.parts = parts
        term.op = op
        term.operand = operand
        term.operand_class = operand_class
        term._test = None
        return term

    @staticmethod
    def _orderable(op, value):
        _check_operand(op, value)
        cls = key_class(value)
        if cls is None:
            raise QueryError(f"{op} needs an orderable operand (a number, str, bytes, date...), "
                             f"not {type(value).__name__}")
        return cls

    def general_test(self):
        """``present field value -> bool``: the term's meaning with no fast path (the
        compiled matchers inline faster equivalents of it for plain operands)."""
        test = self._test
        if test is None:
            test = self._test = self._compile()
        return test

    @property
    def path(self):
        parts = self.parts
        return parts[0] if len(parts) == 1 else ".".join(parts)

    def _compile(self):
        # The term's meaning on a present field value, with no fast paths (see _emit).
        op, v, vc = self.op, self.operand, self.operand_class
        if op == EQ:
            return lambda x: values_equal(x, key_class(x), v, vc)
        if op == NE:
            return lambda x: not values_equal(x, key_class(x), v, vc)
        if op in (LT, LE, GT, GE):
            want = {LT: (-1,), LE: (-1, 0), GT: (1,), GE: (0, 1)}[op]
            return lambda x: compare_ordered(x, key_class(x), v, vc) in want
        if op == BETWEEN:
            lo, hi = v
            lc, hc = vc

            def between(x):
                xc = key_class(x)
                if xc is None or xc != lc or xc != hc:
                    return False
                return _compare(x, lo) >= 0 and _compare(x, hi) <= 0
            return between
        if op == IN:
            pairs = tuple(zip(v, vc))

            def in_(x):
                xc = key_class(x)
                for item, ic in pairs:
                    if values_equal(x, xc, item, ic):
                        return True
                return False
            return in_
        if op == STARTSWITH:
            return lambda x: type(x) is type(v) and x.startswith(v)
        if op == CONTAINS:
            def contains(x):
                if not isinstance(x, (list, tuple, set, frozenset)) and not (
                        isinstance(x, StoredCollection)
                        and isinstance(x, (MutableSequence, MutableSet))):
                    return False
                for item in x:
                    if values_equal(item, key_class(item), v, vc):
                        return True
                return False
            return contains
        return lambda x: True  # EXISTS: reached only when the path is present

    def _emit(self, ns, counter):
        i = next(counter)
        x, test, v = f"x{i}", f"T{i}", f"V{i}"
        ns[test], ns[f"P{i}"], ns[v] = self.general_test(), self.parts, self.operand
        if len(self.parts) == 1:  # the common case: a top-level key of a dict entry
            ns[f"K{i}"] = self.parts[0]
            get = f"(value.get(K{i}, M) if type(value) is dict else EX(value, P{i}))"
        else:
            get = f"EX(value, P{i})"
        op, operand = self.op, self.operand
        body = f"{test}({x})"
        if op in (EQ, NE) and type(operand) is str:
            body = f"({x} {op} {v} if type({x}) is str else {body})"
        elif op in (EQ, NE) and _plain_number(operand):
            body = f"({x} {op} {v} if type({x}) in NN else {body})"
        elif op in (LT, LE, GT, GE) and _plain_number(operand):
            body = f"({x} {op} {v} if type({x}) in NN and {x} == {x} else {body})"
        elif op in (LT, LE, GT, GE) and type(operand) is str:
            body = f"({x} {op} {v} if type({x}) is str else {body})"
        elif op == BETWEEN and _plain_number(operand[0]) and _plain_number(operand[1]):
            ns[f"L{i}"], ns[f"H{i}"] = operand
            # A NaN field fails both bounds, as it sorts after every number.
            body = f"(L{i} <= {x} <= H{i} if type({x}) in NN else {body})"
        return f"(({x} := {get}) is not M and {body})"

    def __repr__(self):
        name = "F." + self.path
        if self.op == BETWEEN:
            return f"{name}.between({self.operand[0]!r}, {self.operand[1]!r})"
        if self.op == IN:
            return f"{name}.in_({list(self.operand)!r})"
        if self.op in (STARTSWITH, CONTAINS):
            return f"{name}.{self.op}({self.operand!r})"
        if self.op == EXISTS:
            return f"{name}.exists()"
        return f"{name} {self.op} {self.operand!r}"


_MAX_KIDS = 1024


class Field:
    """A field path under construction: ``F.a.b`` or ``F["a"]["b"]`` or ``F("a.b")``."""

    # The instance dict holds nothing but child fields: fields are immutable, so
    # ``F.price`` is made once, stored there, and found by plain attribute lookup
    # afterwards (no failed lookup, no __getattr__ call). Methods are never shadowed:
    # only names that found no attribute reach __getattr__.
    __slots__ = ("_parts", "__dict__")

    def __init__(self, parts=()):
        object.__setattr__(self, "_parts", parts)

    def __call__(self, path: str) -> "Field":
        return Field(self._parts + split_path(path))

    def __getattr__(self, name: str) -> "Field":
        if name.startswith("__"):
            raise AttributeError(name)
        kid = Field(self._parts + (name,))
        kids = object.__getattribute__(self, "__dict__")
        if len(kids) < _MAX_KIDS:
            kids[name] = kid
        return kid

    def __getitem__(self, name: str) -> "Field":
        return Field(self._parts + split_path(name))

    def __setattr__(self, name: str, value: Any) -> None:
        raise QueryError("F expressions are read-only; compare them (F.x == 1) to build a query")

    def _term(self, op, operand=None):
        if not self._parts:
            raise QueryError("F alone names no field: write F.name or F['name']")
        return Term(self._parts, op, operand)

    # Plain operands (the common case) skip validation: see Term._simple.
    def __eq__(self, other: object) -> "Predicate":  # type: ignore[override]
        c = _FAST_CLASS.get(type(other))
        if c is not None and self._parts:
            return Term._simple(self._parts, EQ, other, c)
        return self._term(EQ, other)

    def __ne__(self, other: object) -> "Predicate":  # type: ignore[override]
        c = _FAST_CLASS.get(type(other))
        if c is not None and self._parts:
            return Term._simple(self._parts, NE, other, c)
        return self._term(NE, other)

    def __lt__(self, other: Any) -> "Predicate":
        c = _FAST_CLASS.get(type(other))
        if c is not None and self._parts:
            return Term._simple(self._parts, LT, other, c)
        return self._term(LT, other)

    def __le__(self, other: Any) -> "Predicate":
        c = _FAST_CLASS.get(type(other))
        if c is not None and self._parts:
            return Term._simple(self._parts, LE, other, c)
        return self._term(LE, other)

    def __gt__(self, other: Any) -> "Predicate":
        c = _FAST_CLASS.get(type(other))
        if c is not None and self._parts:
            return Term._simple(self._parts, GT, other, c)
        return self._term(GT, other)

    def __ge__(self, other: Any) -> "Predicate":
        c = _FAST_CLASS.get(type(other))
        if c is not None and self._parts:
            return Term._simple(self._parts, GE, other, c)
        return self._term(GE, other)

    __hash__ = None  # type: ignore[assignment]   # == builds a query term

    def between(self, lo: Any, hi: Any) -> "Predicate":
        """``lo <= field <= hi`` (inclusive); empty when ``lo > hi`` or the classes differ."""
        return self._term(BETWEEN, (lo, hi))

    def in_(self, values: Iterable[Any]) -> "Predicate":
        """The field equals one of ``values`` (an iterable, taken once)."""
        return self._term(IN, values)

    def startswith(self, prefix: Any) -> "Predicate":
        """A str (or bytes) field starting with ``prefix``."""
        return self._term(STARTSWITH, prefix)

    def contains(self, item: Any) -> "Predicate":
        """A list, tuple, set or frozenset field, or a stored ``pb.List``/``pb.Set``,
        holding an element equal to ``item`` (a stored ``pb.Dict`` is not looked into)."""
        return self._term(CONTAINS, item)

    def exists(self) -> "Predicate":
        """The path is present (its value may be None)."""
        return self._term(EXISTS)

    def __bool__(self) -> bool:
        raise QueryError("a field has no truth value: compare it (F.x == 1) or use F.x.exists()")

    def __repr__(self):
        return "F." + ".".join(self._parts) if self._parts else "F"


F = Field()
