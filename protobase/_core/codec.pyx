"""The value codec: Python values <-> MessagePack bytes with extension types.

Why MessagePack
---------------
Every value a user stores is snapshotted into bytes at write time (DESIGN.md §4), so the
encoder sits on the hot path of every write and the decoder on every cold read. MessagePack
is compact, self-delimiting, needs no schema, and is readable by outside tools: the
`msgpack` package decodes our bytes for the plain types (None, bool, 64-bit ints, float,
str, bytes, list, dict), and we emit exactly the bytes `msgpack.packb` emits for them. What
MessagePack lacks (tuples, sets, big ints, dates, decimals, classes...) travels as an
*extension* ``(code, payload)``; codes 0..63 are ours (table in docs/format.md), 64..127
belong to the layers above through ``default``/``ext_hook``.

Layout of one encoded value
---------------------------
::

    plain:      [type byte | length/short value] [payload]           (MessagePack)
    extension:  [d4..d8 | c7..c9 + len] [code] [payload .......]
                                               |
                    structured codes: payload = array header + N nested values
                    raw codes:        payload = bytes (uuid, complex, decimal text...)

    e.g. (1, "a")  ->  d6 01 | 92 01 a1 61
                       fixext4, code 1 (tuple), array of 2: 1, "a"

A structured extension's payload length is unknown until its contents are written, so the
encoder reserves the largest header (6 bytes), writes the payload, then writes the smallest
header that fits and slides the payload left over the unused bytes. Output is therefore
canonical MessagePack (shortest form everywhere), which `dumps_key` relies on.

Encoder
-------
One growing C buffer (PyMem, doubling); ``bytes`` is built once at the end. The working
state (buffer, hooks, error steps) is kept as one spare between calls, so a small value
costs no allocation beyond its ``bytes``; a call that finds the spare taken (a hook that
encodes from inside an encode, or another thread while a hook runs) makes a fresh one, and
a buffer grown past 16 KiB (KEEP_BUFFER) is freed when the call ends. The decoder keeps a spare the same
way. ``Encoder``/``Decoder`` bind the hooks once (the layers above keep one of each per
transaction), so a call is one positional argument: no keyword parsing per value::

    Encoder(ref_hook=h).encode(v)  ==  dumps(v, ref_hook=h)
    Decoder(ref_resolver=r).decode(b)  ==  loads(b, ref_resolver=r)

Dispatch is by *exact* type with C checks (``PyDict_CheckExact``...), cheapest first. A
type that is not a plain built-in goes, in order, to ``ref_hook`` (pb collections are
stored by reference), ``default`` (extension codes of upper layers), then to a per-class
``_ClassInfo`` computed once and cached in a dict: Enum, numpy, namedtuple, dataclass,
ordinary instance, or refused with the reason. Subclasses of built-in value types (a
``dict`` subclass, a ``str`` subclass...) are refused: encoding them as the base type
would silently lose their class, and restoring them would need their own ``__new__``.

A ``default`` hook is a Python call per value it sees, and an index leaf holds dozens of
id sets (a 50k-row index build wrote 40k of them through one). ``ExtDefault(cls, code,
to_bytes, fallback)`` is a ``default`` the encoder recognises: a value of exactly ``cls``
is written as extension ``code`` with the bytes ``to_bytes(value)`` returns, in C (when
``to_bytes`` is itself a C method, no Python frame runs at all); every other value goes to
``fallback``, the ordinary hook. Calling the object from Python does the same, so it is a
valid ``default`` wherever one is accepted and encodes byte for byte alike::

    default = ExtDefault(IdSet, 65, IdSet.to_bytes, other_hook)
    value of type IdSet  -> ext 65, IdSet.to_bytes(value)       (C: no frame)
    anything else        -> other_hook(value)                     (None: not handled)

Code of the value's own runs in the middle of an encode (``__getstate__``, a hook, a
metaclass ``__hash__`` behind the class lookup) and may change a container the encoder is
walking. So every container loop holds a strong reference to the item (or key and value)
it took, never a borrowed one across a nested encode, and re-checks the container's size
after each item: a list, dict, set or instance ``__dict__`` that changed while it was
written is a ``SerializationError`` at the item during which it changed, and a dict or set
that yields more entries than its size (keys deleted and inserted again) is one too.

Errors carry a path. Nothing is tracked on the success path: when a child fails, each
container frame appends ``(container, step)`` to the encoder while the exception unwinds
(one ``try`` per container, which knows the index or key it was at),
and ``dumps`` formats ``value['k'][3].attr``. Cycles cost nothing either: a cycle recurses
until the depth limit (``MAX_DEPTH``, 1000 levels), and the unwound path then shows the
first container that repeats, reported as a cycle at the path of its second occurrence.

Decoder
-------
Direct reads from the caller's buffer with an explicit ``end``; every length is checked
against the bytes that remain *before* anything is allocated (an array of N items needs at
least N bytes), so a forged header cannot cause a huge allocation. An extension narrows
``end`` to its payload and must consume it exactly. Nesting deeper than ``MAX_DEPTH``, bad
UTF-8, unknown codes, values of the wrong type inside an extension, and trailing bytes are
all ``DecodeError``; any other failure while building a value from forged fields (an
invalid date, an unhashable key) is converted to ``DecodeError`` too, and so is input that
is no buffer at all (a forged node can hold an int where a stored value's bytes belong). Exceptions raised by
the caller's own hooks (``ref_resolver``, ``ext_hook``) pass through unchanged.

``Decoder.decode_field(data, name, ...)`` reads one entry of an encoded plain dict: it walks
the map's keys, skipping every other value by its header (``_skip`` checks the same bounds
and nesting limit as ``_dec`` but builds nothing), and decodes only the value under
``name``. An index build reads one field of every row this way. ``refs(data)`` walks a
value the same way, building nothing but the ids of its collection references (it enters
only the extensions that hold nested values; class names stay unresolved bytes), which is
how ``db.check()`` finds a reference to a collection that does not exist.

Two small caches make repeated shapes cheap: short ASCII map keys are looked up in a
direct-mapped table of 1024 interned-like ``str`` objects (hit verified by memcmp, so a
collision only costs a miss), and a class name equal to the last class decoded is matched
by one memcmp instead of a str allocation and a dict lookup. Instances are created through
the type's ``tp_new`` slot, which is what ``cls.__new__(cls)`` calls.

Classes
-------
Stored by name ``module:qualname`` (or the name given to ``register_class``: dotted
identifiers or ``module:qualname``, checked at registration). Decoding an instance runs its
class's code, so the file never picks the class: a decode admits only *trusted* classes,

    registered name        -> _name_to_class       (process-wide)
    name this process      -> _stored              (process-wide; filled by the encoder the
      stored a class under                           first time it classifies a class)
    module:qualname of a   -> sys.modules[module]  (per decode: the Decoder's `trust`, which
      trusted module          then qualname          pb.open(trust=) imported; the class
                                                     must belong to that module)

and nothing here ever imports a module. A resolved name is cached in ``_dec_info`` with how
it was admitted (``trusted``: process-wide; ``trust_module``: for decoders trusting that
module), and ``_admits`` re-checks that on every cache hit and on the last-class fast path,
so one database's trusted modules never leak into another's decodes. Any other name is a
DecodeError naming the class and the fix; with ``opaque=True`` (the command line) it is an
``Opaque`` instead: the extension code, the exact payload bytes, and the collections the
payload refers to (found by ``_scan``, which walks nested extensions). Encoding an Opaque
copies its payload unchanged, or, when it holds references, re-frames it with each reference
renumbered through ``ref_hook`` (``_copy_renumbered``), so a dump and load keeps it byte for
byte. The encoder warns once per class (``_warned``) when it stores an unregistered class
whose module the encoding database does not trust: other processes could not read it.
Instances are created with ``cls.__new__(cls)`` and given their state with
``object.__setattr__`` semantics (``__init__`` is never called), or by their ``__setstate__``;
no other code runs: no ``__reduce__``, no arbitrary callables. ``strict=True`` admits
registered classes only.

Keys
----
``dumps_key`` writes a canonical form so equal keys give identical bytes: numbers by exact
value (int when integral, float when the value is exactly a float, else an exact fraction;
one NaN), aware datetimes/times converted to UTC, frozensets with sorted members, IntEnum /
StrEnum members as their plain value (they are equal to it in a dict).

Complexity: O(size of the value) both ways. The header slide moves a structured extension's
payload once per enclosing structured extension, so bytes nested k extensions deep move k
times (short payloads in practice). Class metadata is O(1) after a class's first use.
"""
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_CheckBuffer, PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.dict cimport PyDict_New, PyDict_SetItem, PyDict_Next, PyDict_GetItem
from cpython.list cimport PyList_New, PyList_SET_ITEM, PyList_GET_ITEM
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM, PyTuple_GET_ITEM
from cpython.set cimport PySet_Add
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.ref cimport PyObject, Py_INCREF
from cpython.object cimport PyObject_GenericSetAttr
from libc.string cimport memcpy, memmove
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.math cimport isnan, isinf
cimport cpython.datetime as cdt

import sys
import warnings as _warnings
import datetime as _dt
import decimal as _decimal
import fractions as _fractions
import uuid as _uuid
import enum as _enum
import dataclasses as _dataclasses

from protobase.errors import SerializationError, DecodeError, InvalidArgumentError

cdef extern from *:
    const char *PB_SOURCE_DIGEST
__source_digest__ = PB_SOURCE_DIGEST.decode("ascii")

cdef extern from "Python.h":
    bint PyUnicode_CheckExact(object)
    bint PyBytes_CheckExact(object)
    bint PyLong_CheckExact(object)
    bint PyFloat_CheckExact(object)
    bint PyBool_Check(object)
    bint PyList_CheckExact(object)
    bint PyTuple_CheckExact(object)
    bint PyDict_CheckExact(object)
    bint PyByteArray_CheckExact(object)
    Py_ssize_t PyList_GET_SIZE(object)
    Py_ssize_t PyTuple_GET_SIZE(object)
    Py_ssize_t PyDict_GET_SIZE(object)
    const char *_utf8_or_null "PyUnicode_AsUTF8AndSize"(object, Py_ssize_t *)
    bint PyErr_ExceptionMatches(object)
    void PyErr_Clear()
    object PyUnicode_DecodeUTF8(const char *, Py_ssize_t, const char *)
    char *PyByteArray_AS_STRING(object)
    Py_ssize_t PyByteArray_GET_SIZE(object)
    object PyByteArray_FromStringAndSize(const char *, Py_ssize_t)
    long long PyLong_AsLongLongAndOverflow(object, int *) except? -1
    unsigned long long PyLong_AsUnsignedLongLong(object) except? -1
    object PyLong_FromLongLong(long long)
    object PyLong_FromUnsignedLongLong(unsigned long long)
    double PyFloat_AS_DOUBLE(object)
    object PyFloat_FromDouble(double)
    object PyComplex_FromDoubles(double, double)
    double PyComplex_RealAsDouble(object) except? -1
    double PyComplex_ImagAsDouble(object) except? -1
    object PyObject_CallOneArg(object, object)
    object PyNumber_Index(object)
    object PyUnicode_FromObject(object)
    unsigned long Py_TPFLAGS_HEAPTYPE
    object PyObject_GenericGetDict(object, void *)
    bint PyUnicode_IS_COMPACT_ASCII(PyObject *)
    void *PyUnicode_DATA(PyObject *)
    Py_ssize_t PyUnicode_GET_LENGTH(PyObject *)
    void Py_XDECREF(PyObject *)
    int memcmp(const void *, const void *, size_t)

cdef extern from *:
    """
    /* cls.__new__(cls) through the type slot: what `cls.__new__(cls)` does, minus the lookup. */
    static PyObject *pb_tp_new(PyObject *cls, PyObject *args) {
        return ((PyTypeObject *)cls)->tp_new((PyTypeObject *)cls, args, NULL);
    }
    """
    object pb_tp_new(object cls, object args)

cdt.import_datetime()

cdef enum:
    DEPTH_LIMIT = 1000      # nesting levels, for encoding and decoding alike

# Kinds of _ClassInfo.
cdef enum:
    K_REFUSED = 0
    K_ENUM = 1
    K_NAMEDTUPLE = 2
    K_DATACLASS = 3
    K_OBJECT = 4
    K_NDARRAY = 5
    K_NPSCALAR = 6
    K_ZONEINFO = 7
    K_VALUE_ENUM = 8        # Enum mixed with int/float/str/bytes: a key is its plain value

# Steps of an error path (how a child sits in its container).
cdef enum:
    S_OBJECT = -1           # entering an instance (no text; its state steps follow)
    S_INDEX = 0
    S_KEY = 1
    S_DICTKEY = 2
    S_MEMBER = 3
    S_ATTR = 4
    S_STATE = 5
    S_DEPTH = 6

__all__ = ["dumps", "loads", "Encoder", "Decoder", "ExtDefault", "Opaque", "dumps_key",
           "register_class", "refs", "trust_modules", "MAX_DEPTH"]

MAX_DEPTH = DEPTH_LIMIT

cdef object _Decimal = _decimal.Decimal
cdef object _Fraction = _fractions.Fraction
cdef object _UUID = _uuid.UUID
cdef object _timezone = _dt.timezone
cdef object _timedelta = _dt.timedelta
cdef object _tzinfo = _dt.tzinfo
cdef object _utc = _dt.timezone.utc
cdef object _Enum = _enum.Enum
cdef object _object_getstate = object.__getstate__
cdef object _canonical_nan = float("nan")
cdef tuple _no_args = ()

# Built-in value types whose subclasses are refused (see the essay).
cdef tuple _BUILTIN_VALUE_TYPES = (
    dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex,
    _dt.datetime, _dt.date, _dt.time, _dt.timedelta, _dt.timezone, _decimal.Decimal,
    _fractions.Fraction, _uuid.UUID,
)

# --------------------------------------------------------------------------- registry

cdef dict _name_to_class = {}       # registered name -> class
cdef dict _class_to_name = {}       # class -> registered name (the latest registration)
cdef dict _stored = {}              # name -> class this process encoded under that name
cdef set _warned = set()            # classes already warned about (stored but unshared)
cdef dict _enc_info = {}            # class -> _ClassInfo, for encoding
cdef dict _dec_info = {}            # stored name -> _ClassInfo of a class some decoder admitted
cdef _ClassInfo _last_dec = None    # the class decoded last: homogeneous data skips the lookup


cdef bint _dotted(str s):
    if not s:
        return False
    for part in s.split("."):
        if not part.isidentifier():
            return False
    return True


cdef bint _valid_name(str name):
    module, sep, qualname = name.partition(":")
    return _dotted(module) and (not sep or _dotted(qualname))


def register_class(cls, name):
    """Store instances of `cls` under the stable `name`, and resolve `name` to `cls` when
    decoding, in this process (every process that reads the data registers it too). A
    renamed or moved class keeps loading old data when registered under the name it was
    stored with. A name is dotted identifiers (``"app.Point"``) or ``module:qualname``
    (``"app.models:Point"``, the form of unregistered classes)."""
    if not isinstance(cls, type):
        raise TypeError(f"register_class expects a class, got {type(cls).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError("register_class expects a non-empty str name")
    if not _valid_name(name):
        raise InvalidArgumentError(
            f"register_class name {name!r} is not a class name: use dotted identifiers "
            f"('app.Point') or 'module:qualname' ('app.models:Point')")
    other = _name_to_class.get(name)
    if other is not None and other is not cls:
        raise ValueError(f"the name {name!r} is already registered for {other!r}")
    _name_to_class[name] = cls
    _class_to_name[cls] = name
    _enc_info.clear()
    _dec_info.clear()
    global _last_dec
    _last_dec = None


cdef frozenset _trust_set(object trust, str who):
    """`trust` (None or an iterable of module names) as the frozenset the codec keeps."""
    if trust is None:
        return None
    if isinstance(trust, (str, bytes)):
        raise TypeError(f"{who} trust= takes a list of module names, not one "
                        f"{type(trust).__name__}: write trust=[{trust!r}]")
    out = frozenset(trust)
    for m in out:
        if not isinstance(m, str) or not _dotted(m):
            raise TypeError(f"{who} trust= takes module names (dotted identifiers such as "
                            f"'myapp.models'), not {m!r:.60}")
    return out or None


def trust_modules(trust, who="pb.open()"):
    """`trust` (None or an iterable of module names) checked as every trust= argument is
    (TypeError naming `who` otherwise): a frozenset of dotted module names, or None."""
    return _trust_set(trust, who)


cdef str _default_name(cls):
    return f"{cls.__module__}:{cls.__qualname__}"


cdef object _lookup_qualname(str module, str qualname):
    """The object `qualname` names in the already imported `module`; never imports."""
    obj = sys.modules.get(module)
    if obj is None:
        raise LookupError(f"module {module!r} is not imported")
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


cdef _ClassInfo _classify(object cls):
    """Everything the encoder needs to know about a class, computed once."""
    cdef _ClassInfo info = _ClassInfo.__new__(_ClassInfo)
    info.cls = cls
    info.kind = K_REFUSED
    tname = cls.__qualname__
    if issubclass(cls, type):
        info.refusal = f"cannot store a class object ({tname}); store data, not classes"
        return info
    if issubclass(cls, _Enum):
        info.kind = K_ENUM
        for base in (int, float, str, bytes):
            if issubclass(cls, base):
                info.kind = K_VALUE_ENUM
        return _named(info)
    np = sys.modules.get("numpy")
    if np is not None:
        if issubclass(cls, np.ndarray):
            if cls is np.ndarray:
                info.kind = K_NDARRAY
            else:
                info.refusal = (f"cannot store a numpy.ndarray subclass ({tname}); "
                                f"convert it with numpy.asarray()")
            return info
        if issubclass(cls, np.generic):
            info.kind = K_NPSCALAR
            return info
    zi = sys.modules.get("zoneinfo")
    if zi is not None and cls is zi.ZoneInfo:
        info.kind = K_ZONEINFO
        return info
    if issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple) \
            and cls.__dict__.get("__slots__", None) == ():
        info.kind = K_NAMEDTUPLE
        info.fields = tuple(sys.intern(f) for f in cls._fields)
        return _named(info)
    for base in _BUILTIN_VALUE_TYPES:
        if issubclass(cls, base):
            info.refusal = (f"cannot store an instance of {tname}, a subclass of "
                            f"{base.__name__}: its class would be lost; convert it to a plain "
                            f"{base.__name__} or make it an ordinary class")
            return info
    if not (cls.__flags__ & Py_TPFLAGS_HEAPTYPE):
        info.refusal = _c_type_refusal(cls)
        return info
    for base in cls.__mro__:
        if base is not object and base is not _tzinfo and not (base.__flags__ & Py_TPFLAGS_HEAPTYPE):
            info.refusal = (f"cannot store an instance of {tname}: it extends the built-in "
                            f"type {base.__qualname__}, whose internal state cannot be saved")
            return info
    getstate = getattr(cls, "__getstate__", _object_getstate)
    info.custom_state = getstate is not _object_getstate
    info.has_setstate = hasattr(cls, "__setstate__")
    # dataclass(slots=True, frozen=True) adds its own get/setstate: plain fields all the same.
    generated = getattr(getstate, "__qualname__", "") == "_dataclass_getstate"
    if _dataclasses.is_dataclass(cls) and (generated or not (info.custom_state or info.has_setstate)):
        info.kind = K_DATACLASS
        info.fields = tuple(sys.intern(f.name) for f in _dataclasses.fields(cls))
        info.use_dict = cls.__dictoffset__ != 0
    else:
        info.kind = K_OBJECT
    return _named(info)


cdef str _c_type_refusal(cls):
    import types
    tname = cls.__qualname__
    if issubclass(cls, (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                        types.LambdaType)):
        return f"cannot store a function ({tname}): functions and lambdas are code, not data"
    if issubclass(cls, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        return f"cannot store a {tname}: its running state cannot be saved"
    if issubclass(cls, types.ModuleType):
        return "cannot store a module; store the data it holds"
    if issubclass(cls, memoryview):
        return ("cannot store a memoryview: it is a view of another object's memory; "
                "store bytes(view) (or bytearray(view)) instead")
    if issubclass(cls, (range, type({}.keys()), type({}.values()), type({}.items()))) \
            or hasattr(cls, "__next__"):
        return (f"cannot store a {tname}: it is a view or an iterator, not data; store "
                f"list(value) (or tuple/set/dict of it) instead")
    return (f"cannot store a value of type {cls.__module__}.{tname}: it is not a supported "
            f"value type (see docs/format.md); convert it to one (a dict, list, str, bytes, "
            f"a number...) or store an instance of an ordinary class of yours instead")


cdef _ClassInfo _named(_ClassInfo info):
    cls = info.cls
    name = _class_to_name.get(cls)
    if name is None:
        name = _default_name(cls)
        if name in _name_to_class:
            info.kind = K_REFUSED
            info.refusal = (f"cannot store an instance of {cls.__qualname__}: its name {name!r} "
                            f"is registered for another class; register this one under a new name")
            return info
        try:
            found = _lookup_qualname(cls.__module__, cls.__qualname__)
        except Exception:
            found = None
        if found is not cls:
            info.kind = K_REFUSED
            info.refusal = (f"cannot store an instance of {cls.__qualname__}: the class cannot "
                            f"be found again by its name {name!r} (a local or replaced class); "
                            f"give it a stable name with pb.register_class(cls, name)")
            return info
    info.name = name
    info.registered = _name_to_class.get(name) is cls
    info.unshared = not info.registered
    cdef _Encoder e = _Encoder.__new__(_Encoder)
    _w_str(e, name)
    info.name_packed = e.take()
    return info


cdef inline _ClassInfo _class_info(object cls):
    """The encoder's view of `cls`; the first time, the class becomes one this process stored."""
    cdef PyObject *p = PyDict_GetItem(_enc_info, cls)
    if p != NULL:
        return <_ClassInfo>p
    info = _classify(cls)
    _enc_info[cls] = info
    if info.name is not None:
        _stored.setdefault(info.name, cls)
    return info


cdef int _warn_unshared(_Encoder e, _ClassInfo info) except -1:
    """An unregistered class is being stored: other processes read it only if they trust its
    module, so say so once per class (unless this encoder's database trusts the module,
    which a script's __main__ never counts as: it is another module in every process)."""
    cls = info.cls
    module = cls.__module__
    if e.trust is not None and module in e.trust and module != "__main__":
        return 0
    info.unshared = False
    if cls in _warned:
        return 0
    _warned.add(cls)
    fix = (f"call pb.register_class({cls.__qualname__}, 'app.{cls.__qualname__}') in every "
           f"process that writes or reads it")
    if module == "__main__":
        where = "it is defined in __main__ (a script or notebook), another module in every process"
    else:
        where = f"other processes decode it only when they trust its module {module!r}"
        fix += f", or open the database with trust=[{module!r}]"
    _warnings.warn(f"storing an instance of {module}.{cls.__qualname__}, a class that is not "
                   f"registered: {where}; {fix}", UserWarning, stacklevel=1)
    return 0


cdef inline bint _admits(_Decoder d, _ClassInfo info):
    """Whether this decode may build instances of the class `info` resolved."""
    if d.strict:
        return info.registered
    return info.trusted or (info.trust_module is not None and d.trust is not None
                            and info.trust_module in d.trust)


cdef _ClassInfo _find_trusted(_Decoder d, str name):
    """The class stored under `name` when this decode trusts it, else None. Trusted are the
    registered names, the names this process stored, and `module:qualname` names of the
    decoder's trusted modules (already imported by whoever named them: nothing here imports,
    so a file never chooses what module is loaded or which class runs)."""
    cdef PyObject *p = PyDict_GetItem(_dec_info, name)
    cdef _ClassInfo info
    if p != NULL and _admits(d, <_ClassInfo>p):
        return <_ClassInfo>p
    cls = _name_to_class.get(name)
    if cls is None and not d.strict:
        cls = _stored.get(name)
    module = None
    if cls is None:
        if d.strict or d.trust is None:
            return None
        module, sep, qualname = name.partition(":")
        if not sep or module not in d.trust:
            return None
        try:
            cls = _lookup_qualname(module, qualname)
        except Exception as exc:
            raise DecodeError(f"class {name!r} of a stored value is not in its trusted module "
                              f"{module!r} ({exc!r}); register the class it was renamed to with "
                              f"pb.register_class(cls, {name!r})") from None
        if not isinstance(cls, type):
            raise DecodeError(f"{name!r} in the stored value does not name a class")
        if cls.__module__ != module or cls.__qualname__ != qualname:
            # found through an import into the module: the class belongs elsewhere
            raise DecodeError(f"{name!r} in the stored value names {_default_name(cls)!r}, a "
                              f"class outside the trusted module {module!r}")
    info = _classify(cls)
    if info.kind == K_REFUSED:
        raise DecodeError(f"class {name!r} cannot hold a stored value: {info.refusal}")
    info.trusted = module is None
    info.trust_module = module
    _dec_info[name] = info
    return info


cdef object _untrusted(_Decoder d, str name):
    """The DecodeError for a class name this decode does not trust."""
    if d.strict:
        return DecodeError(f"class {name!r} is not registered and strict=True refuses it; "
                           f"call pb.register_class(cls, {name!r}) to allow it")
    module, sep, qualname = name.partition(":")
    if not sep:
        return DecodeError(
            f"class name {name!r} of a stored value is not registered in this process; "
            f"call pb.register_class(cls, {name!r}) before reading, as the writer did")
    return DecodeError(
        f"class {name!r} of a stored value is not trusted by this process, so it was not "
        f"decoded (a file never chooses what code runs); call pb.register_class(cls, {name!r}) "
        f"or open the database with trust=[{module!r}]")


cdef _ClassInfo _resolve(_Decoder d, str name, int expect):
    """The class stored under `name`, trusted and checked to be of the kind the bytes claim."""
    cdef _ClassInfo info = _find_trusted(d, name)
    if info is None:
        raise _untrusted(d, name)
    if d.strict and _name_to_class.get(name) is not info.cls:
        raise _untrusted(d, name)
    if not _kind_ok(info.kind, expect):
        raise DecodeError(f"class {name!r} is not of the kind the stored value needs "
                          f"(the class changed since the value was written?)")
    return info


cdef inline bint _kind_ok(int kind, int expect) noexcept:
    return (kind == expect or (kind == K_VALUE_ENUM and expect == K_ENUM)
            # a dataclass with attributes beyond its fields is stored as an object
            or (kind == K_DATACLASS and expect == K_OBJECT))


cdef _ClassInfo _dec_class(_Decoder d, int depth, int expect):
    """Read a stored class name and resolve it; a repeat of the last class is one memcmp."""
    global _last_dec
    cdef _ClassInfo last = _last_dec
    cdef Py_ssize_t n
    if last is not None and _kind_ok(last.kind, expect) and _admits(d, last):
        n = PyBytes_GET_SIZE(last.name_packed)
        if d.end - d.pos >= n and memcmp(d.buf + d.pos, PyBytes_AS_STRING(last.name_packed), n) == 0:
            d.pos += n
            return last
    info = _resolve(d, _dec_of(d, depth + 1, str, "a class name"), expect)
    if info.name_packed is not None:
        _last_dec = info
    return info


# --------------------------------------------------------------------------- encoder

@cython.final
@cython.freelist(8)
cdef class _ClassInfo:
    pass


@cython.final
@cython.freelist(8)
cdef class _Encoder:

    def __dealloc__(self):
        if self.buf != NULL:
            PyMem_Free(self.buf)

    cdef bytes take(self):
        if self.buf == NULL:
            return b""
        return PyBytes_FromStringAndSize(self.buf, self.length)


cdef int _grow(_Encoder e, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = e.cap * 2 if e.cap else 256
    while cap < e.length + need:
        cap *= 2
    cdef char *nb = <char *>PyMem_Realloc(e.buf, cap)
    if nb == NULL:
        raise MemoryError()
    e.buf = nb
    e.cap = cap
    return 0


cdef inline int _reserve(_Encoder e, Py_ssize_t need) except -1:
    if e.length + need > e.cap:
        _grow(e, need)
    return 0


cdef inline void _be16(char *p, uint16_t v) noexcept:
    p[0] = <char>(v >> 8)
    p[1] = <char>v


cdef inline void _be32(char *p, uint32_t v) noexcept:
    p[0] = <char>(v >> 24)
    p[1] = <char>(v >> 16)
    p[2] = <char>(v >> 8)
    p[3] = <char>v


cdef inline void _be64(char *p, uint64_t v) noexcept:
    _be32(p, <uint32_t>(v >> 32))
    _be32(p + 4, <uint32_t>v)


cdef inline int _w_byte(_Encoder e, uint8_t b) except -1:
    _reserve(e, 1)
    e.buf[e.length] = <char>b
    e.length += 1
    return 0


cdef inline int _w_raw(_Encoder e, const char *p, Py_ssize_t n) except -1:
    _reserve(e, n)
    memcpy(e.buf + e.length, p, n)
    e.length += n
    return 0


cdef int _w_i64(_Encoder e, int64_t v) except -1:
    _reserve(e, 9)
    cdef char *p = e.buf + e.length
    if v >= 0:
        if v < 128:
            p[0] = <char>v
            e.length += 1
        elif v < 256:
            p[0] = <char>0xcc
            p[1] = <char>v
            e.length += 2
        elif v < 65536:
            p[0] = <char>0xcd
            _be16(p + 1, <uint16_t>v)
            e.length += 3
        elif v < 4294967296:
            p[0] = <char>0xce
            _be32(p + 1, <uint32_t>v)
            e.length += 5
        else:
            p[0] = <char>0xcf
            _be64(p + 1, <uint64_t>v)
            e.length += 9
    else:
        if v >= -32:
            p[0] = <char>v
            e.length += 1
        elif v >= -128:
            p[0] = <char>0xd0
            p[1] = <char>v
            e.length += 2
        elif v >= -32768:
            p[0] = <char>0xd1
            _be16(p + 1, <uint16_t>v)
            e.length += 3
        elif v >= -2147483648:
            p[0] = <char>0xd2
            _be32(p + 1, <uint32_t>v)
            e.length += 5
        else:
            p[0] = <char>0xd3
            _be64(p + 1, <uint64_t>v)
            e.length += 9
    return 0


cdef int _w_int(_Encoder e, object o) except -1:
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(o, &overflow)
    if overflow == 0:
        return _w_i64(e, v)
    cdef unsigned long long u
    if overflow > 0 and o.bit_length() <= 64:
        u = PyLong_AsUnsignedLongLong(o)
        _reserve(e, 9)
        e.buf[e.length] = <char>0xcf
        _be64(e.buf + e.length + 1, u)
        e.length += 9
        return 0
    # Beyond 64 bits: minimal two's complement, big-endian.
    nbytes = ((o if o >= 0 else ~o).bit_length() + 8) // 8
    raw = o.to_bytes(nbytes, "big", signed=True)
    _w_ext_header(e, EXT_BIGINT, len(raw))
    return _w_raw(e, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))


cdef int _w_float(_Encoder e, double f) except -1:
    cdef uint64_t bits
    _reserve(e, 9)
    memcpy(&bits, &f, 8)
    e.buf[e.length] = <char>0xcb
    _be64(e.buf + e.length + 1, bits)
    e.length += 9
    return 0


cdef int _w_len_header(_Encoder e, Py_ssize_t n, uint8_t fix, uint8_t fixmax,
                       uint8_t c8, uint8_t c16, uint8_t c32) except -1:
    _reserve(e, 5)
    cdef char *p = e.buf + e.length
    if n < fixmax:
        p[0] = <char>(fix | n)
        e.length += 1
    elif c8 != 0 and n < 256:
        p[0] = <char>c8
        p[1] = <char>n
        e.length += 2
    elif n < 65536:
        p[0] = <char>c16
        _be16(p + 1, <uint16_t>n)
        e.length += 3
    elif n <= 0xffffffff:
        p[0] = <char>c32
        _be32(p + 1, <uint32_t>n)
        e.length += 5
    else:
        raise SerializationError("a value is too large for the format (over 2**32-1 items or bytes)",
                                 type_name="int")
    return 0


cdef inline int _w_array_header(_Encoder e, Py_ssize_t n) except -1:
    if n < 16:
        return _w_byte(e, 0x90 | n)
    return _w_len_header(e, n, 0x90, 16, 0, 0xdc, 0xdd)


cdef inline int _w_map_header(_Encoder e, Py_ssize_t n) except -1:
    if n < 16:
        return _w_byte(e, 0x80 | n)
    return _w_len_header(e, n, 0x80, 16, 0, 0xde, 0xdf)


cdef inline int _w_bin(_Encoder e, const char *p, Py_ssize_t n) except -1:
    _w_len_header(e, n, 0, 0, 0xc4, 0xc5, 0xc6)
    return _w_raw(e, p, n)


cdef int _w_str(_Encoder e, object s) except -1:
    cdef Py_ssize_t n
    cdef const char *p
    cdef char *w
    if PyUnicode_IS_COMPACT_ASCII(<PyObject *>s):
        # ASCII is its own UTF-8: copy the characters, and a short one's header is one byte.
        n = PyUnicode_GET_LENGTH(<PyObject *>s)
        p = <const char *>PyUnicode_DATA(<PyObject *>s)
        if n < 32:
            _reserve(e, n + 1)
            w = e.buf + e.length
            w[0] = <char>(0xa0 | n)
            memcpy(w + 1, p, n)
            e.length += n + 1
            return 0
    else:
        p = _utf8_or_null(s, &n)
        if p == NULL:
            if not PyErr_ExceptionMatches(UnicodeEncodeError):
                raise MemoryError()
            PyErr_Clear()
            # Lone surrogates are valid in a str but not in UTF-8: keep them in an extension.
            raw = (<str>s).encode("utf-8", "surrogatepass")
            _w_ext_header(e, EXT_SURROGATE_STR, len(raw))
            return _w_raw(e, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
    _w_len_header(e, n, 0xa0, 32, 0xd9, 0xda, 0xdb)
    return _w_raw(e, p, n)


cdef int _w_ext_header(_Encoder e, int code, Py_ssize_t n) except -1:
    _reserve(e, 6)
    cdef char *p = e.buf + e.length
    if n == 1 or n == 2 or n == 4 or n == 8 or n == 16:
        p[0] = <char>(0xd4 if n == 1 else 0xd5 if n == 2 else 0xd6 if n == 4 else
                      0xd7 if n == 8 else 0xd8)
        p[1] = <char>code
        e.length += 2
    elif n < 256:
        p[0] = <char>0xc7
        p[1] = <char>n
        p[2] = <char>code
        e.length += 3
    elif n < 65536:
        p[0] = <char>0xc8
        _be16(p + 1, <uint16_t>n)
        p[3] = <char>code
        e.length += 4
    elif n <= 0xffffffff:
        p[0] = <char>0xc9
        _be32(p + 1, <uint32_t>n)
        p[5] = <char>code
        e.length += 6
    else:
        raise SerializationError("a value is too large for the format", type_name="bytes")
    return 0


cdef inline Py_ssize_t _ext_begin(_Encoder e) except -1:
    """Reserve the largest ext header; the payload follows. Returns the header position."""
    _reserve(e, 6)
    e.length += 6
    return e.length - 6


cdef int _ext_end(_Encoder e, Py_ssize_t start, int code) except -1:
    """Write the smallest header for the payload written since `start` and slide it left."""
    cdef Py_ssize_t n = e.length - start - 6
    e.length = start
    _w_ext_header(e, code, n)
    cdef Py_ssize_t hdr = e.length - start
    if hdr != 6:
        memmove(e.buf + e.length, e.buf + start + 6, n)
    e.length += n
    return 0


cdef inline void _step(_Encoder e, object container, int kind, object key):
    if e.steps is None:
        e.steps = []
    e.steps.append((container, kind, key))


cdef int _too_deep(_Encoder e, object obj) except -1:
    _step(e, obj, S_DEPTH, None)
    raise SerializationError(f"value nested deeper than {DEPTH_LIMIT} levels", type_name=type(obj).__name__)


cdef int _changed(object container) except -1:
    t = type(container).__qualname__
    raise SerializationError(f"{t} changed while it was being stored (code run by a value "
                             f"inside it, such as a __getstate__ or a hook, modified it); "
                             f"store a copy, or leave a value alone while it is written",
                             type_name=t)


cdef int _refuse(object obj, str why) except -1:
    raise SerializationError(why, type_name=type(obj).__qualname__)


cdef int _enc(_Encoder e, object obj, int depth) except -1:
    """Append the encoding of `obj`. Exact built-in types first, cheapest checks first."""
    cdef Py_ssize_t i, n, start
    cdef object item
    if PyUnicode_CheckExact(obj):
        return _w_str(e, obj)
    if PyLong_CheckExact(obj):
        return _w_int(e, obj)
    if obj is None:
        return _w_byte(e, 0xc0)
    if PyBool_Check(obj):
        return _w_byte(e, 0xc3 if obj is True else 0xc2)
    if PyFloat_CheckExact(obj):
        return _w_float(e, PyFloat_AS_DOUBLE(obj))
    if PyDict_CheckExact(obj):
        if depth >= DEPTH_LIMIT:
            return _too_deep(e, obj)
        return _enc_dict(e, obj, depth, S_KEY)
    if PyList_CheckExact(obj):
        if depth >= DEPTH_LIMIT:
            return _too_deep(e, obj)
        n = PyList_GET_SIZE(obj)
        _w_array_header(e, n)
        i = 0
        try:                    # one try per container, not per item: entering one costs
            while i < n:
                item = <object>PyList_GET_ITEM(obj, i)     # held: the list may drop it
                _enc(e, item, depth + 1)
                if PyList_GET_SIZE(obj) != n:
                    _changed(obj)
                i += 1
        except BaseException:
            _step(e, obj, S_INDEX, i)
            raise
        return 0
    if PyBytes_CheckExact(obj):
        return _w_bin(e, PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj))
    if PyTuple_CheckExact(obj):
        if depth >= DEPTH_LIMIT:
            return _too_deep(e, obj)
        start = _ext_begin(e)
        _enc_tuple_items(e, obj, depth)
        return _ext_end(e, start, EXT_TUPLE)
    return _enc_other(e, obj, depth)


cdef int _enc_tuple_items(_Encoder e, tuple t, int depth) except -1:
    cdef Py_ssize_t i = 0, n = PyTuple_GET_SIZE(t)
    _w_array_header(e, n)
    try:
        while i < n:
            _enc(e, <object>PyTuple_GET_ITEM(t, i), depth + 1)
            i += 1
    except BaseException:
        _step(e, t, S_INDEX, i)
        raise
    return 0


cdef int _enc_dict(_Encoder e, dict d, int depth, int kind) except -1:
    """A map; `kind` is S_KEY for a dict value, S_ATTR for an instance's __dict__ state."""
    cdef Py_ssize_t pos = 0, n = PyDict_GET_SIZE(d), seen = 0
    cdef PyObject *k
    cdef PyObject *v
    cdef object key = None, value
    cdef bint at_key = False
    _w_map_header(e, n)
    try:                        # one try for the whole map; at_key tells which part failed
        while seen < n and PyDict_Next(d, &pos, &k, &v):
            key = <object>k     # held: code run while encoding may delete the entry
            value = <object>v
            at_key = True
            if PyUnicode_CheckExact(key):
                _w_str(e, key)
            else:
                _enc(e, key, depth + 1)
                if PyDict_GET_SIZE(d) != n:
                    _changed(d)
            at_key = False
            _enc(e, value, depth + 1)
            if PyDict_GET_SIZE(d) != n:
                _changed(d)
            seen += 1
    except BaseException:
        if at_key:
            _step(e, d, S_DICTKEY, seen)
        else:
            _step(e, d, kind, key)
        raise
    # Fewer entries than its size, or more (keys deleted and inserted again at equal size).
    if seen != n or PyDict_Next(d, &pos, &k, &v):
        _changed(d)
    return 0


cdef int _enc_members(_Encoder e, object s, int depth, int code) except -1:
    cdef Py_ssize_t i = 0, n = len(s)
    start = _ext_begin(e)
    _w_array_header(e, n)
    for item in s:
        if i == n:              # more members than its size: changed at equal size
            _changed(s)
        try:
            _enc(e, item, depth + 1)
            if len(s) != n:     # checked before the set's own iterator raises RuntimeError
                _changed(s)
        except BaseException:
            _step(e, s, S_MEMBER, i)
            raise
        i += 1
    if i != n:
        _changed(s)
    return _ext_end(e, start, code)


cdef inline int64_t _td_us(object td):
    return ((<int64_t>cdt.timedelta_days(td) * 86400 + cdt.timedelta_seconds(td)) * 1000000
            + cdt.timedelta_microseconds(td))


cdef int _enc_tz_field(_Encoder e, object owner, object tz, int depth) except -1:
    if tz is None:
        return _w_byte(e, 0xc0)
    try:
        _enc(e, tz, depth + 1)
    except BaseException:
        _step(e, owner, S_ATTR, "tzinfo")
        raise
    return 0


cdef int _enc_other(_Encoder e, object obj, int depth) except -1:
    """Everything but the six commonest types: extensions, hooks, classes."""
    cdef Py_ssize_t start, n
    cdef double re, im
    cdef uint64_t bits
    cdef object t = type(obj)
    if depth >= DEPTH_LIMIT:
        return _too_deep(e, obj)
    if t is set or t is frozenset:
        return _enc_members(e, obj, depth, EXT_SET if t is set else EXT_FROZENSET)
    if PyByteArray_CheckExact(obj):
        _w_ext_header(e, EXT_BYTEARRAY, PyByteArray_GET_SIZE(obj))
        return _w_raw(e, PyByteArray_AS_STRING(obj), PyByteArray_GET_SIZE(obj))
    if cdt.PyDateTime_CheckExact(obj):
        start = _ext_begin(e)
        _w_array_header(e, 9)
        _w_i64(e, cdt.datetime_year(obj))
        _w_i64(e, cdt.datetime_month(obj))
        _w_i64(e, cdt.datetime_day(obj))
        _w_i64(e, cdt.datetime_hour(obj))
        _w_i64(e, cdt.datetime_minute(obj))
        _w_i64(e, cdt.datetime_second(obj))
        _w_i64(e, cdt.datetime_microsecond(obj))
        _w_i64(e, cdt.datetime_fold(obj))
        _enc_tz_field(e, obj, cdt.datetime_tzinfo(obj), depth)
        return _ext_end(e, start, EXT_DATETIME)
    if cdt.PyDate_CheckExact(obj):
        start = _ext_begin(e)
        _w_array_header(e, 3)
        _w_i64(e, cdt.date_year(obj))
        _w_i64(e, cdt.date_month(obj))
        _w_i64(e, cdt.date_day(obj))
        return _ext_end(e, start, EXT_DATE)
    if cdt.PyTime_CheckExact(obj):
        start = _ext_begin(e)
        _w_array_header(e, 6)
        _w_i64(e, cdt.time_hour(obj))
        _w_i64(e, cdt.time_minute(obj))
        _w_i64(e, cdt.time_second(obj))
        _w_i64(e, cdt.time_microsecond(obj))
        _w_i64(e, cdt.time_fold(obj))
        _enc_tz_field(e, obj, cdt.time_tzinfo(obj), depth)
        return _ext_end(e, start, EXT_TIME)
    if cdt.PyDelta_CheckExact(obj):
        start = _ext_begin(e)
        _w_array_header(e, 3)
        _w_i64(e, cdt.timedelta_days(obj))
        _w_i64(e, cdt.timedelta_seconds(obj))
        _w_i64(e, cdt.timedelta_microseconds(obj))
        return _ext_end(e, start, EXT_TIMEDELTA)
    if t is _timezone:
        args = obj.__getinitargs__()
        start = _ext_begin(e)
        _w_array_header(e, len(args))
        _w_i64(e, _td_us(args[0]))
        if len(args) > 1:
            _w_str(e, args[1])
        return _ext_end(e, start, EXT_TIMEZONE)
    if t is _Decimal:
        raw = str(obj).encode("ascii")
        _w_ext_header(e, EXT_DECIMAL, len(raw))
        return _w_raw(e, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
    if t is _Fraction:
        start = _ext_begin(e)
        _w_array_header(e, 2)
        _w_int(e, obj.numerator)
        _w_int(e, obj.denominator)
        return _ext_end(e, start, EXT_FRACTION)
    if t is _UUID:
        raw = obj.bytes
        _w_ext_header(e, EXT_UUID, 16)
        return _w_raw(e, PyBytes_AS_STRING(raw), 16)
    if t is complex:
        re = PyComplex_RealAsDouble(obj)
        im = PyComplex_ImagAsDouble(obj)
        _w_ext_header(e, EXT_COMPLEX, 16)
        _reserve(e, 16)
        memcpy(&bits, &re, 8)
        _be64(e.buf + e.length, bits)
        memcpy(&bits, &im, 8)
        _be64(e.buf + e.length + 8, bits)
        e.length += 16
        return 0
    return _enc_hooked(e, obj, depth)


cdef int _w_ext_bytes(_Encoder e, int code, object data, object obj) except -1:
    """An ExtDefault's extension: ``data`` must be bytes."""
    if type(data) is not bytes:
        raise SerializationError(f"ExtDefault to_bytes returned {type(data).__name__}, "
                                 f"expected bytes", type_name=type(obj).__qualname__)
    _w_ext_header(e, code, PyBytes_GET_SIZE(data))
    return _w_raw(e, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


@cython.final
@cython.auto_pickle(False)
cdef class ExtDefault:
    """A ``default`` hook with one exact type handled in C (see the essay): values of
    exactly ``cls`` become extension ``code`` (64..127) holding ``to_bytes(value)``; any
    other value goes to ``fallback`` (a ``default`` hook, or None: not handled)."""

    cdef readonly object cls
    cdef readonly int code
    cdef readonly object to_bytes
    cdef readonly object fallback

    def __init__(self, cls, int code, to_bytes, fallback=None):
        if not isinstance(cls, type):
            raise TypeError(f"ExtDefault needs a class, not {cls!r:.60}")
        if not EXT_USER_MIN <= code <= EXT_USER_MAX:
            raise ValueError(f"extension code {code} is outside {EXT_USER_MIN}..{EXT_USER_MAX}")
        if not callable(to_bytes) or (fallback is not None and not callable(fallback)):
            raise TypeError("ExtDefault needs a callable to_bytes and a callable or None fallback")
        self.cls = cls
        self.code = code
        self.to_bytes = to_bytes
        self.fallback = fallback

    def __call__(self, obj):
        """What the encoder does with ``obj``, as a ``default`` hook's answer."""
        if type(obj) is self.cls:
            data = self.to_bytes(obj)
            if type(data) is not bytes:
                raise SerializationError(f"ExtDefault to_bytes returned {type(data).__name__}, "
                                         f"expected bytes", type_name=type(obj).__qualname__)
            return self.code, data
        return None if self.fallback is None else self.fallback(obj)


cdef int _enc_hooked(_Encoder e, object obj, int depth) except -1:
    """Not a plain built-in value: the caller's hooks first, then the class."""
    cdef Py_ssize_t start
    if type(obj) is Opaque:
        return _enc_opaque(e, <Opaque>obj, depth)
    if e.ref_hook is not None:
        ref = PyObject_CallOneArg(e.ref_hook, obj)
        if ref is not None:
            if not PyLong_CheckExact(ref):
                raise SerializationError(f"ref_hook returned {type(ref).__name__}, expected an int "
                                         f"or None", type_name=type(obj).__qualname__)
            start = _ext_begin(e)
            _w_int(e, ref)
            return _ext_end(e, start, EXT_REF)
    cdef ExtDefault fast
    if e.default is not None:
        if type(e.default) is ExtDefault:
            fast = <ExtDefault>e.default
            if type(obj) is fast.cls:
                return _w_ext_bytes(e, fast.code, PyObject_CallOneArg(fast.to_bytes, obj), obj)
            res = None if fast.fallback is None else PyObject_CallOneArg(fast.fallback, obj)
        else:
            res = PyObject_CallOneArg(e.default, obj)
        if res is not None:
            if not (type(res) is tuple and len(res) == 2 and type(res[0]) is int
                    and EXT_USER_MIN <= res[0] <= EXT_USER_MAX and type(res[1]) is bytes):
                raise SerializationError(f"default returned {res!r:.60}, expected None or "
                                         f"(code in 64..127, bytes)", type_name=type(obj).__qualname__)
            _w_ext_header(e, res[0], len(res[1]))
            return _w_raw(e, PyBytes_AS_STRING(res[1]), PyBytes_GET_SIZE(res[1]))
    cdef _ClassInfo info = _class_info(type(obj))
    if info.unshared:
        _warn_unshared(e, info)
    if info.kind == K_DATACLASS:
        return _enc_dataclass(e, info, obj, depth)
    if info.kind == K_OBJECT:
        return _enc_object(e, info, obj, depth)
    if info.kind == K_ENUM or info.kind == K_VALUE_ENUM:
        return _enc_enum(e, info, obj, depth)
    if info.kind == K_NAMEDTUPLE:
        start = _ext_begin(e)
        _w_array_header(e, PyTuple_GET_SIZE(obj) + 1)
        _w_raw(e, PyBytes_AS_STRING(info.name_packed), PyBytes_GET_SIZE(info.name_packed))
        for i in range(PyTuple_GET_SIZE(obj)):
            try:
                _enc(e, <object>PyTuple_GET_ITEM(obj, i), depth + 1)
            except BaseException:
                _step(e, obj, S_ATTR, info.fields[i] if i < len(info.fields) else str(i))
                raise
        return _ext_end(e, start, EXT_NAMEDTUPLE)
    if info.kind == K_NDARRAY:
        return _enc_ndarray(e, obj, depth)
    if info.kind == K_NPSCALAR:
        dtype = obj.dtype
        if dtype.hasobject:
            _refuse(obj, "cannot store a numpy object scalar")
        start = _ext_begin(e)
        _w_array_header(e, 2)
        _enc(e, _dtype_spec(dtype), depth + 1)
        raw = obj.tobytes()
        _w_bin(e, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
        return _ext_end(e, start, EXT_NPSCALAR)
    if info.kind == K_ZONEINFO:
        key = obj.key
        if type(key) is not str:
            _refuse(obj, "cannot store a ZoneInfo made from a file (it has no key name)")
        raw = (<str>key).encode("utf-8")
        _w_ext_header(e, EXT_ZONEINFO, len(raw))
        return _w_raw(e, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
    return _refuse(obj, info.refusal)


cdef object _dtype_spec(dtype):
    return dtype.descr if dtype.names is not None else dtype.str


cdef int _enc_ndarray(_Encoder e, object arr, int depth) except -1:
    dtype = arr.dtype
    if dtype.hasobject:
        _refuse(arr, "cannot store a numpy array of dtype object (it holds arbitrary Python "
                     "objects); convert it to a list or a fixed dtype")
    spec = _dtype_spec(dtype)
    if dtype.names is not None:
        # A structured dtype travels as its descr; refuse one that descr cannot rebuild
        # (aligned padding, offsets) rather than write bytes that would not decode.
        rebuilt = sys.modules["numpy"].dtype(spec)
        if rebuilt != dtype or _dtype_spec(rebuilt) != spec:
            _refuse(arr, f"cannot store a numpy array of structured dtype {dtype} (padding or "
                         f"explicit offsets); use a packed dtype (align=False)")
    flags = arr.flags
    fortran = bool(flags.f_contiguous and not flags.c_contiguous)
    raw = arr.tobytes(order="F" if fortran else "C")
    start = _ext_begin(e)
    _w_array_header(e, 4)
    _enc(e, spec, depth + 1)
    _w_array_header(e, len(arr.shape))
    for dim in arr.shape:
        _w_int(e, dim)
    _w_byte(e, 0xc3 if fortran else 0xc2)
    _w_bin(e, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
    return _ext_end(e, start, EXT_NDARRAY)


@cython.final
@cython.auto_pickle(False)
cdef class Opaque:
    """A class instance carried undecoded because its class is not trusted here (decoders
    with ``opaque=True`` make them: the command line reads untrusted data so). `code` is its
    extension code, `name` the class name it was stored under, `payload` the exact bytes,
    `refs` the collections referenced inside, in order. Encoding it writes the same bytes,
    with each reference renumbered through ``ref_hook``; no class code ever runs."""

    def __init__(self, *args, **kwargs):
        raise TypeError("Opaque values are made by decoding with opaque=True, not by hand")

    def __repr__(self):
        return f"<opaque {self.name} instance: {len(self.payload)} bytes>"

    def __eq__(self, other):
        if type(other) is not Opaque:
            return NotImplemented
        o = <Opaque>other
        return self.code == o.code and self.payload == o.payload and self.refs == o.refs

    def __hash__(self):
        return hash((self.code, self.payload))


cdef int _enc_opaque(_Encoder e, Opaque o, int depth) except -1:
    if not o.refs:
        _w_ext_header(e, o.code, PyBytes_GET_SIZE(o.payload))
        return _w_raw(e, PyBytes_AS_STRING(o.payload), PyBytes_GET_SIZE(o.payload))
    if e.ref_hook is None:
        raise SerializationError(f"an opaque {o.name} instance refers to collections: encode it "
                                 f"with a ref_hook", type_name="Opaque")
    cdef _Decoder d = _Decoder.__new__(_Decoder)
    d.buf = <const unsigned char *>PyBytes_AS_STRING(o.payload)
    d.end = PyBytes_GET_SIZE(o.payload)
    cdef Py_ssize_t k = 0
    cdef Py_ssize_t start = _ext_begin(e)
    while d.pos < d.end:
        _copy_renumbered(e, d, o.refs, &k, depth + 1)
    return _ext_end(e, start, o.code)


cdef int _copy_renumbered(_Encoder e, _Decoder d, tuple refs, Py_ssize_t *k, int depth) except -1:
    """Copy one value of an Opaque's payload byte for byte, except that the k-th collection
    reference becomes ``ref_hook(refs[k])`` (enclosing extension headers re-sized to fit)."""
    cdef Py_ssize_t i, n, saved, s = d.pos, es
    cdef int code = 0
    n = _container_items(d)
    if n >= 0:
        _w_raw(e, <const char *>d.buf + s, d.pos - s)
        for i in range(n):
            _copy_renumbered(e, d, refs, k, depth + 1)
        return 0
    n = _ext_header(d, &code)
    if n < 0 or not _structured(code):
        if n < 0:
            _skip(d, depth)
        else:
            d.pos += n
        return _w_raw(e, <const char *>d.buf + s, d.pos - s)
    if code == EXT_REF:
        d.pos += n
        if k[0] >= PyTuple_GET_SIZE(refs):
            raise SerializationError("an opaque value holds more references than it resolved",
                                     type_name="Opaque")
        ref = PyObject_CallOneArg(e.ref_hook, <object>PyTuple_GET_ITEM(refs, k[0]))
        k[0] += 1
        if not PyLong_CheckExact(ref):
            raise SerializationError(f"ref_hook returned {type(ref).__name__} for a collection "
                                     f"an opaque value refers to, expected an int",
                                     type_name="Opaque")
        es = _ext_begin(e)
        _w_int(e, ref)
        return _ext_end(e, es, EXT_REF)
    saved = d.end
    d.end = d.pos + n
    es = _ext_begin(e)
    while d.pos < d.end:
        _copy_renumbered(e, d, refs, k, depth + 1)
    d.end = saved
    return _ext_end(e, es, code)


cdef int _enc_enum(_Encoder e, _ClassInfo info, object obj, int depth) except -1:
    start = _ext_begin(e)
    name = obj._name_
    members = type(obj)._member_map_
    if name is not None and members.get(name) is obj:
        _w_array_header(e, 2)
        _w_raw(e, PyBytes_AS_STRING(info.name_packed), PyBytes_GET_SIZE(info.name_packed))
        _w_str(e, name)
    else:
        # A composite Flag value has no single member name: store its value.
        _w_array_header(e, 3)
        _w_raw(e, PyBytes_AS_STRING(info.name_packed), PyBytes_GET_SIZE(info.name_packed))
        _w_byte(e, 0xc0)
        _enc(e, obj._value_, depth + 1)
    return _ext_end(e, start, EXT_ENUM)


cdef int _enc_dataclass(_Encoder e, _ClassInfo info, object obj, int depth) except -1:
    cdef Py_ssize_t i, n = PyTuple_GET_SIZE(info.fields)
    cdef object d = None
    cdef PyObject *p
    if info.use_dict:
        d = PyObject_GenericGetDict(obj, NULL)
        if PyDict_GET_SIZE(d) != n:
            # Attributes beyond the fields (or missing ones): keep them all, by name.
            return _enc_object(e, info, obj, depth)
    start = _ext_begin(e)
    _w_array_header(e, n + 1)
    _w_raw(e, PyBytes_AS_STRING(info.name_packed), PyBytes_GET_SIZE(info.name_packed))
    for i in range(n):
        name = <object>PyTuple_GET_ITEM(info.fields, i)
        if d is not None:
            p = PyDict_GetItem(d, name)
            if p == NULL:
                e.length = start
                return _enc_object(e, info, obj, depth)
            value = <object>p
        else:
            value = getattr(obj, name)
        try:
            _enc(e, value, depth + 1)
            if d is not None and PyDict_GET_SIZE(d) != n:
                _changed(d)
        except BaseException:
            _step(e, obj, S_ATTR, name)
            raise
    return _ext_end(e, start, EXT_DATACLASS)


cdef int _enc_object(_Encoder e, _ClassInfo info, object obj, int depth) except -1:
    try:
        state = obj.__getstate__()
    except TypeError as exc:
        raise SerializationError(f"cannot store an instance of {type(obj).__qualname__}: {exc}",
                                 type_name=type(obj).__qualname__) from None
    # The default state is a dict (one level below the object) or a slots pair (two levels).
    if not info.custom_state and depth + (2 if PyTuple_CheckExact(state) else 1) >= DEPTH_LIMIT:
        return _too_deep(e, obj)
    start = _ext_begin(e)
    _w_array_header(e, 2)
    _w_raw(e, PyBytes_AS_STRING(info.name_packed), PyBytes_GET_SIZE(info.name_packed))
    try:
        if info.custom_state:
            try:
                _enc(e, state, depth + 1)
            except BaseException:
                _step(e, None, S_STATE, None)
                raise
        elif PyDict_CheckExact(state):
            _enc_dict(e, state, depth + 1, S_ATTR)
        elif PyTuple_CheckExact(state) and PyTuple_GET_SIZE(state) == 2:
            # object.__getstate__ of a class with __slots__: (dict or None, {slot: value}).
            tstart = _ext_begin(e)
            _w_array_header(e, 2)
            for part in state:
                if part is None:
                    _w_byte(e, 0xc0)
                else:
                    _enc_dict(e, part, depth + 2, S_ATTR)
            _ext_end(e, tstart, EXT_TUPLE)
        else:
            _enc(e, state, depth + 1)
    except BaseException:
        _step(e, obj, S_OBJECT, None)
        raise
    return _ext_end(e, start, EXT_OBJECT)


cdef str _format_path(list steps):
    parts = ["value"]
    for container, kind, key in steps:
        if kind == S_INDEX:
            parts.append(f"[{key}]")
        elif kind == S_KEY:
            parts.append(f"[{key!r}]")
        elif kind == S_DICTKEY:
            parts.append(f".keys()[{key}]")
        elif kind == S_MEMBER:
            parts.append(f"{{member {key}}}")
        elif kind == S_ATTR:
            parts.append(f".{key}")
        elif kind == S_STATE:
            parts.append(".__getstate__()")
    return "".join(parts)


cdef object _path_error(_Encoder e, object exc):
    """Rebuild a SerializationError raised deep inside with the path to where it happened."""
    steps = list(reversed(e.steps or []))
    message = exc.args[0] if exc.args else "cannot store value"
    type_name = exc.type_name
    if steps and steps[len(steps) - 1][1] == S_DEPTH:
        # Too deep: a container repeating on the path is a cycle, reported where it recurs.
        seen = {}
        for i, (container, kind, key) in enumerate(steps):
            if container is None:
                continue
            j = seen.get(id(container))
            if j is not None and steps[j][0] is container:
                steps = steps[:i]
                type_name = type(container).__qualname__
                message = (f"cycle: a {type_name} contains itself; a plain value must be a "
                           f"tree (store shared parts in a pb collection)")
                break
            seen[id(container)] = i
    path = _format_path(steps)
    return SerializationError(f"{message} (at {path})", type_name=type_name, path=path)


# One spare encoder state is kept between calls, so an encode reuses its buffer instead of
# allocating a state and a buffer and freeing both again. Taking it clears the slot, so a
# hook that encodes from inside an encode (a free-standing collection adopted by ref_hook),
# or another thread that got the GIL while a hook ran Python code, gets a fresh state.
cdef _Encoder _spare_encoder = None

cdef enum:
    KEEP_BUFFER = 16384     # a spare state keeps a buffer up to this size for the next call


cdef inline _Encoder _take_encoder(object ref_hook, object default, frozenset trust):
    global _spare_encoder
    cdef _Encoder e = _spare_encoder
    if e is None:
        e = _Encoder.__new__(_Encoder)
    else:
        _spare_encoder = None
    e.ref_hook = ref_hook
    e.default = default
    e.trust = trust
    return e


cdef inline void _give_back_encoder(_Encoder e) noexcept:
    global _spare_encoder
    e.length = 0
    e.ref_hook = None
    e.default = None
    e.trust = None
    e.steps = None
    if e.cap > KEEP_BUFFER:
        PyMem_Free(e.buf)
        e.buf = NULL
        e.cap = 0
    _spare_encoder = e


cdef bytes _encode(object obj, object ref_hook, object default, frozenset trust):
    cdef _Encoder e = _take_encoder(ref_hook, default, trust)
    try:
        _enc(e, obj, 0)
        return e.take()
    except SerializationError as exc:
        raise _path_error(e, exc) from None
    finally:
        _give_back_encoder(e)


def dumps(obj, *, ref_hook=None, default=None):
    """Encode `obj` to MessagePack bytes (extension types for what MessagePack lacks).

    `ref_hook(x)` is asked about every value that is not a plain built-in before it is
    encoded as a class instance: an int N stores "a reference to collection N". `default(x)`
    may return ``(code, bytes)`` with code in 64..127. Unsupported values raise
    SerializationError with `type_name` and `path`."""
    return _encode(obj, ref_hook, default, None)


@cython.final
@cython.auto_pickle(False)
cdef class Encoder:
    """`dumps` with its hooks bound once: ``Encoder(ref_hook=h).encode(x)`` is
    ``dumps(x, ref_hook=h)`` without the keyword handling on every call (the layers
    above encode every written value through one per transaction)."""

    def __init__(self, *, ref_hook=None, default=None, trust=None):
        self.ref_hook = ref_hook
        self.default = default
        self.trust = _trust_set(trust, "Encoder")

    @cython.binding(False)                 # a plain C method: called without cyfunction dispatch
    @cython.always_allow_keywords(False)   # METH_O: one positional argument, no parsing
    def encode(self, obj):
        """Encode `obj` exactly as dumps() with this encoder's hooks does."""
        return _encode(obj, self.ref_hook, self.default, self.trust)


# --------------------------------------------------------------------------- keys

cdef int _key_number(_Encoder e, object n, object num, object den) except -1:
    """An exact rational num/den (den > 0, reduced): int, else float if exact, else fraction."""
    if den == 1:
        return _w_int(e, num)
    try:
        f = num / den
    except OverflowError:
        f = None
    if f is not None and f.as_integer_ratio() == (num, den):
        return _w_float(e, f)
    start = _ext_begin(e)
    _w_array_header(e, 2)
    _w_int(e, num)
    _w_int(e, den)
    return _ext_end(e, start, EXT_FRACTION)


cdef int _key_float(_Encoder e, double f) except -1:
    if isnan(f):
        return _w_float(e, PyFloat_AS_DOUBLE(_canonical_nan))
    if -9.2e18 < f < 9.2e18 and f == <double><int64_t>f:
        return _w_i64(e, <int64_t>f)
    if not isinf(f) and f == int(f):
        return _w_int(e, int(f))
    return _w_float(e, f)


cdef int _key(_Encoder e, object k, int depth) except -1:
    cdef object t = type(k)
    cdef Py_ssize_t i, start
    cdef _Encoder sub
    if depth >= DEPTH_LIMIT:
        return _too_deep(e, k)
    if t is str:
        return _w_str(e, k)
    if t is int:
        return _w_int(e, k)
    if t is bool:
        return _w_i64(e, 1 if k else 0)
    if t is float:
        return _key_float(e, PyFloat_AS_DOUBLE(k))
    if k is None:
        return _w_byte(e, 0xc0)
    if t is bytes:
        return _w_bin(e, PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k))
    if t is tuple:
        start = _ext_begin(e)
        _w_array_header(e, PyTuple_GET_SIZE(k))
        for i in range(PyTuple_GET_SIZE(k)):
            try:
                _key(e, <object>PyTuple_GET_ITEM(k, i), depth + 1)
            except BaseException:
                _step(e, k, S_INDEX, i)
                raise
        return _ext_end(e, start, EXT_TUPLE)
    if t is frozenset:
        # Members in the order of their key bytes: equal sets, identical bytes.
        parts = []
        for item in k:
            sub = _Encoder.__new__(_Encoder)
            try:
                _key(sub, item, depth + 1)
            except BaseException:
                e.steps = sub.steps
                _step(e, k, S_MEMBER, len(parts))
                raise
            parts.append(sub.take())
        parts.sort()
        start = _ext_begin(e)
        _w_array_header(e, len(parts))
        for part in parts:
            _w_raw(e, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part))
        return _ext_end(e, start, EXT_FROZENSET)
    if t is _Decimal:
        if k.is_nan():
            if k.is_snan():
                raise SerializationError("a signaling NaN Decimal cannot be a key (it is unhashable)",
                                         type_name="Decimal")
            return _key_float(e, PyFloat_AS_DOUBLE(_canonical_nan))
        if k.is_infinite():
            return _w_float(e, float(k))
        num, den = k.as_integer_ratio()
        return _key_number(e, k, num, den)
    if t is _Fraction:
        return _key_number(e, k, k.numerator, k.denominator)
    if cdt.PyDateTime_CheckExact(k):
        off = k.utcoffset()
        if off is None:
            return _enc(e, k.replace(tzinfo=None, fold=0), depth)
        try:
            return _enc(e, (k.replace(tzinfo=None) - off).replace(tzinfo=_utc, fold=0), depth)
        except OverflowError:
            return _enc(e, k.replace(tzinfo=_timezone(off), fold=0), depth)
    if cdt.PyTime_CheckExact(k):
        off = k.utcoffset()
        if off is None:
            return _enc(e, k.replace(tzinfo=None, fold=0), depth)
        return _enc(e, _canonical_time(k, off), depth)
    if cdt.PyDate_CheckExact(k) or t is _UUID or cdt.PyDelta_CheckExact(k):
        return _enc(e, k, depth)
    if isinstance(k, _Enum):
        if isinstance(k, int):
            return _key(e, PyNumber_Index(k), depth)
        if isinstance(k, float):
            return _key(e, PyFloat_FromDouble(PyFloat_AS_DOUBLE(k)), depth)
        if isinstance(k, str):
            return _w_str(e, PyUnicode_FromObject(k))
        if isinstance(k, bytes):
            return _key(e, bytes(k), depth)
        info = _class_info(t)
        if info.kind != K_ENUM:
            return _refuse(k, info.refusal)
        if info.unshared:
            _warn_unshared(e, info)
        return _enc_enum(e, info, k, depth)
    if isinstance(k, tuple) and _class_info(t).kind == K_NAMEDTUPLE:
        return _key(e, tuple(k), depth)
    raise SerializationError(f"{t.__qualname__} cannot be a key: keys are None, bool, int, float, "
                             f"str, bytes, tuple/frozenset of keys, date/time/datetime, timedelta, "
                             f"Decimal, Fraction, UUID or Enum members", type_name=t.__qualname__)


cdef object _canonical_time(object k, object off):
    """An aware time equal to `k`. CPython compares aware times by (whole seconds minus the
    offset's whole seconds, then microseconds), with no wrap at midnight; keep both parts and
    pick the representative in UTC when it fits the day, else at the day's edge."""
    cdef int64_t local = (<int64_t>cdt.time_hour(k) * 3600 + cdt.time_minute(k) * 60
                          + cdt.time_second(k))
    cdef int64_t adj = local - (<int64_t>cdt.timedelta_days(off) * 86400 + cdt.timedelta_seconds(off))
    cdef int64_t secs, off_secs
    if 0 <= adj < 86400:
        secs, off_secs = adj, 0
    elif adj < 0:
        secs, off_secs = 0, -adj
    else:
        secs = 86399
        off_secs = secs - adj
    tz = _utc if off_secs == 0 else _timezone(_timedelta(seconds=off_secs))
    return _dt.time(<int>(secs // 3600), <int>(secs // 60 % 60), <int>(secs % 60),
                    cdt.time_microsecond(k), tz)


cpdef bytes dumps_key(object key):
    """Canonical bytes of a key: equal keys (as in a dict: 1, 1.0, True, Decimal(1)) give
    identical bytes. A non-key type raises SerializationError (a TypeError)."""
    cdef _Encoder e = _Encoder.__new__(_Encoder)
    try:
        _key(e, key, 0)
    except SerializationError as exc:
        raise _path_error(e, exc) from None
    return e.take()


# --------------------------------------------------------------------------- decoder

@cython.final
@cython.freelist(8)
cdef class _Decoder:
    pass


cdef int _fail(_Decoder d, str why) except -1:
    raise DecodeError(f"{why} (at byte {d.pos})", offset=d.pos)


cdef inline int _need(_Decoder d, Py_ssize_t n) except -1:
    if n < 0 or d.end - d.pos < n:
        _fail(d, "truncated value")
    return 0


cdef inline uint64_t _rd(_Decoder d, int n) except? 0xffffffffffffffff:
    """Read an n-byte big-endian unsigned integer."""
    cdef uint64_t v = 0
    cdef int i
    _need(d, n)
    for i in range(n):
        v = (v << 8) | d.buf[d.pos + i]
    d.pos += n
    return v


cdef inline object _rd_str(_Decoder d, Py_ssize_t n):
    _need(d, n)
    s = PyUnicode_DecodeUTF8(<const char *>d.buf + d.pos, n, NULL)
    d.pos += n
    return s


cdef inline object _rd_bin(_Decoder d, Py_ssize_t n):
    _need(d, n)
    b = PyBytes_FromStringAndSize(<const char *>d.buf + d.pos, n)
    d.pos += n
    return b


cdef inline double _rd_double(_Decoder d) except? -1.0:
    cdef uint64_t bits = _rd(d, 8)
    cdef double f
    memcpy(&f, &bits, 8)
    return f


cdef object _dec_array(_Decoder d, Py_ssize_t n, int depth):
    cdef Py_ssize_t i
    if depth >= DEPTH_LIMIT:
        _fail(d, f"value nested deeper than {DEPTH_LIMIT} levels")
    _need(d, n)
    lst = PyList_New(n)
    for i in range(n):
        item = _dec(d, depth + 1)
        Py_INCREF(item)
        PyList_SET_ITEM(lst, i, item)
    return lst


# Short ASCII map keys repeat across values ("id", "name"...): reuse one str per key instead
# of allocating it again. Direct-mapped by a hash of the bytes; a hit is verified by memcmp.
cdef PyObject *_key_cache[1024]


cdef object _dec_key(_Decoder d, int depth):
    cdef uint8_t b
    cdef Py_ssize_t n, i
    cdef uint32_t h = 2166136261u
    cdef const unsigned char *p
    cdef PyObject *c
    if d.pos >= d.end:
        return _dec(d, depth)
    b = d.buf[d.pos]
    n = b & 0x1f
    if b < 0xa0 or b > 0xbf or n > 24 or d.end - d.pos - 1 < n:
        return _dec(d, depth)
    p = d.buf + d.pos + 1
    for i in range(n):
        h = (h ^ p[i]) * 16777619u
    h = (h ^ (h >> 15)) & 1023
    c = _key_cache[h]
    if c != NULL and PyUnicode_GET_LENGTH(c) == n and memcmp(PyUnicode_DATA(c), p, n) == 0:
        d.pos += 1 + n
        return <object>c
    d.pos += 1
    k = _rd_str(d, n)
    if PyUnicode_IS_COMPACT_ASCII(<PyObject *>k):
        Py_INCREF(k)
        Py_XDECREF(c)
        _key_cache[h] = <PyObject *>k
    return k


cdef object _dec_map(_Decoder d, Py_ssize_t n, int depth):
    cdef Py_ssize_t i
    if depth >= DEPTH_LIMIT:
        _fail(d, f"value nested deeper than {DEPTH_LIMIT} levels")
    _need(d, 2 * n)
    dct = PyDict_New()
    for i in range(n):
        k = _dec_key(d, depth + 1)
        v = _dec(d, depth + 1)
        PyDict_SetItem(dct, k, v)
    return dct


cdef object _dec(_Decoder d, int depth):
    _need(d, 1)
    cdef uint8_t b = d.buf[d.pos]
    cdef Py_ssize_t n
    cdef uint32_t f32
    cdef float f
    d.pos += 1
    if b < 0x80:
        return PyLong_FromLongLong(b)
    if b >= 0xe0:
        return PyLong_FromLongLong(<int>b - 256)
    if b >= 0xa0 and b <= 0xbf:
        return _rd_str(d, b & 0x1f)
    if b >= 0x80 and b <= 0x8f:
        return _dec_map(d, b & 0x0f, depth)
    if b >= 0x90 and b <= 0x9f:
        return _dec_array(d, b & 0x0f, depth)
    if b == 0xc0:
        return None
    if b == 0xc2:
        return False
    if b == 0xc3:
        return True
    if b == 0xcb:
        return PyFloat_FromDouble(_rd_double(d))
    if b == 0xca:
        f32 = <uint32_t>_rd(d, 4)
        memcpy(&f, &f32, 4)
        return PyFloat_FromDouble(f)
    if b == 0xcc:
        return PyLong_FromLongLong(<long long>_rd(d, 1))
    if b == 0xcd:
        return PyLong_FromLongLong(<long long>_rd(d, 2))
    if b == 0xce:
        return PyLong_FromLongLong(<long long>_rd(d, 4))
    if b == 0xcf:
        return PyLong_FromUnsignedLongLong(_rd(d, 8))
    if b == 0xd0:
        return PyLong_FromLongLong(<signed char>_rd(d, 1))
    if b == 0xd1:
        return PyLong_FromLongLong(<short>_rd(d, 2))
    if b == 0xd2:
        return PyLong_FromLongLong(<int>_rd(d, 4))
    if b == 0xd3:
        return PyLong_FromLongLong(<long long>_rd(d, 8))
    if b == 0xd9:
        return _rd_str(d, <Py_ssize_t>_rd(d, 1))
    if b == 0xda:
        return _rd_str(d, <Py_ssize_t>_rd(d, 2))
    if b == 0xdb:
        return _rd_str(d, <Py_ssize_t>_rd(d, 4))
    if b == 0xc4:
        return _rd_bin(d, <Py_ssize_t>_rd(d, 1))
    if b == 0xc5:
        return _rd_bin(d, <Py_ssize_t>_rd(d, 2))
    if b == 0xc6:
        return _rd_bin(d, <Py_ssize_t>_rd(d, 4))
    if b == 0xdc:
        return _dec_array(d, <Py_ssize_t>_rd(d, 2), depth)
    if b == 0xdd:
        return _dec_array(d, <Py_ssize_t>_rd(d, 4), depth)
    if b == 0xde:
        return _dec_map(d, <Py_ssize_t>_rd(d, 2), depth)
    if b == 0xdf:
        return _dec_map(d, <Py_ssize_t>_rd(d, 4), depth)
    if b >= 0xd4 and b <= 0xd8:
        return _dec_ext(d, 1 << (b - 0xd4), depth)
    if b == 0xc7:
        return _dec_ext(d, <Py_ssize_t>_rd(d, 1), depth)
    if b == 0xc8:
        return _dec_ext(d, <Py_ssize_t>_rd(d, 2), depth)
    if b == 0xc9:
        return _dec_ext(d, <Py_ssize_t>_rd(d, 4), depth)
    d.pos -= 1
    _fail(d, f"invalid type byte 0x{b:02x}")


cdef Py_ssize_t _rd_array_header(_Decoder d) except -1:
    _need(d, 1)
    cdef uint8_t b = d.buf[d.pos]
    cdef Py_ssize_t n
    d.pos += 1
    if 0x90 <= b <= 0x9f:
        n = b & 0x0f
    elif b == 0xdc:
        n = <Py_ssize_t>_rd(d, 2)
    elif b == 0xdd:
        n = <Py_ssize_t>_rd(d, 4)
    else:
        d.pos -= 1
        return _fail(d, "an extension's payload must be an array here")
    _need(d, n)
    return n


cdef Py_ssize_t _fields(_Decoder d, Py_ssize_t lo, Py_ssize_t hi, str what) except -1:
    cdef Py_ssize_t n = _rd_array_header(d)
    if n < lo or n > hi:
        _fail(d, f"{what} with {n} fields")
    return n


cdef object _dec_of(_Decoder d, int depth, type t, str what):
    x = _dec(d, depth)
    if type(x) is not t:
        _fail(d, f"{what} must be {t.__name__}, not {type(x).__name__}")
    return x


cdef int _dec_ints(_Decoder d, int depth, int n, str what, int *out) except -1:
    # The int fields of a date/time/datetime as C ints: one out of C range raises
    # OverflowError, as the Python constructors would.
    cdef int i
    for i in range(n):
        out[i] = _dec_of(d, depth, int, what)
    return 0


cdef object _dec_ext(_Decoder d, Py_ssize_t n, int depth):
    cdef int code = <signed char>_rd(d, 1)
    _need(d, n)
    cdef Py_ssize_t saved_end = d.end
    cdef Py_ssize_t start = d.pos
    cdef Py_ssize_t i, m
    cdef uint64_t bits
    cdef double re, im
    cdef int fi[8]
    # Raw big ints and surrogate strs are leaves to the encoder: no level of their own.
    if depth >= DEPTH_LIMIT and code != EXT_BIGINT and code != EXT_SURROGATE_STR:
        _fail(d, f"value nested deeper than {DEPTH_LIMIT} levels")
    d.end = d.pos + n
    if d.opaque and (code == EXT_ENUM or code == EXT_NAMEDTUPLE or code == EXT_DATACLASS
                     or code == EXT_OBJECT):
        out = _untrusted_opaque(d, code, start, n, depth)
        if out is not None:
            d.end = saved_end
            return out
    if code == EXT_TUPLE:
        m = _rd_array_header(d)
        out = PyTuple_New(m)
        for i in range(m):
            item = _dec(d, depth + 1)
            Py_INCREF(item)
            PyTuple_SET_ITEM(out, i, item)
    elif code == EXT_SET or code == EXT_FROZENSET:
        m = _rd_array_header(d)
        out = set()
        for i in range(m):
            PySet_Add(out, _dec(d, depth + 1))
        if code == EXT_FROZENSET:
            out = frozenset(out)
    elif code == EXT_BIGINT:
        if n == 0:
            _fail(d, "empty big int")
        out = int.from_bytes(_rd_bin(d, n), "big", signed=True)
    elif code == EXT_BYTEARRAY:
        out = PyByteArray_FromStringAndSize(<const char *>d.buf + d.pos, n)
        d.pos += n
    elif code == EXT_SURROGATE_STR:
        _need(d, n)
        out = PyUnicode_DecodeUTF8(<const char *>d.buf + d.pos, n, "surrogatepass")
        d.pos += n
    elif code == EXT_COMPLEX:
        if n != 16:
            _fail(d, "complex payload must be 16 bytes")
        re = _rd_double(d)
        im = _rd_double(d)
        out = PyComplex_FromDoubles(re, im)
    elif code == EXT_UUID:
        if n != 16:
            _fail(d, "UUID payload must be 16 bytes")
        out = _UUID(bytes=_rd_bin(d, 16))
    elif code == EXT_DECIMAL:
        text = _rd_bin(d, n).decode("ascii")
        out = _Decimal(text)
    elif code == EXT_DATETIME:
        _fields(d, 9, 9, "datetime")
        _dec_ints(d, depth + 1, 8, "a datetime field", fi)
        tz = _dec_tz(d, depth)
        out = cdt.datetime_new(fi[0], fi[1], fi[2], fi[3], fi[4], fi[5], fi[6], tz, fi[7])
    elif code == EXT_DATE:
        _fields(d, 3, 3, "date")
        _dec_ints(d, depth + 1, 3, "a date field", fi)
        out = cdt.date_new(fi[0], fi[1], fi[2])
    elif code == EXT_TIME:
        _fields(d, 6, 6, "time")
        _dec_ints(d, depth + 1, 5, "a time field", fi)
        tz = _dec_tz(d, depth)
        out = cdt.time_new(fi[0], fi[1], fi[2], fi[3], tz, fi[4])
    elif code == EXT_TIMEDELTA:
        _fields(d, 3, 3, "timedelta")
        f = [_dec_of(d, depth + 1, int, "a timedelta field") for i in range(3)]
        out = _timedelta(f[0], f[1], f[2])
    elif code == EXT_TIMEZONE:
        m = _fields(d, 1, 2, "timezone")
        offset = _timedelta(microseconds=_dec_of(d, depth + 1, int, "a timezone offset"))
        if m == 2:
            out = _timezone(offset, _dec_of(d, depth + 1, str, "a timezone name"))
        else:
            out = _timezone(offset)
    elif code == EXT_ZONEINFO:
        import zoneinfo
        out = zoneinfo.ZoneInfo(_rd_bin(d, n).decode("utf-8"))
    elif code == EXT_FRACTION:
        _fields(d, 2, 2, "fraction")
        num = _dec_of(d, depth + 1, int, "a fraction numerator")
        den = _dec_of(d, depth + 1, int, "a fraction denominator")
        if den == 0:
            _fail(d, "fraction with denominator 0")
        out = _Fraction(num, den)
    elif code == EXT_ENUM:
        m = _fields(d, 2, 3, "enum member")
        info = _dec_class(d, depth, K_ENUM)
        if m == 2:
            member = info.cls._member_map_.get(_dec_of(d, depth + 1, str, "an enum member name"))
            if member is None:
                _fail(d, f"enum {info.name} has no such member")
            out = member
        else:
            if _dec(d, depth + 1) is not None:
                _fail(d, "malformed enum value")
            out = info.cls(_dec(d, depth + 1))
    elif code == EXT_NAMEDTUPLE:
        m = _rd_array_header(d)
        if m < 1:
            _fail(d, "namedtuple without a class name")
        info = _dec_class(d, depth, K_NAMEDTUPLE)
        if m - 1 != PyTuple_GET_SIZE(info.fields):
            _fail(d, f"namedtuple {info.name} has {len(info.fields)} fields, the stored value {m - 1}")
        items = PyTuple_New(m - 1)
        for i in range(m - 1):
            item = _dec(d, depth + 1)
            Py_INCREF(item)
            PyTuple_SET_ITEM(items, i, item)
        out = tuple.__new__(info.cls, items)
    elif code == EXT_DATACLASS:
        out = _dec_dataclass(d, depth)
    elif code == EXT_OBJECT:
        out = _dec_object(d, depth)
    elif code == EXT_NDARRAY or code == EXT_NPSCALAR:
        out = _dec_numpy(d, code, depth)
    elif code == EXT_REF:
        ref = _dec_of(d, depth + 1, int, "a collection reference")
        if d.ref_resolver is None:
            _fail(d, "the value holds a collection reference but no ref_resolver was given")
        d.hook_failed = True
        out = PyObject_CallOneArg(d.ref_resolver, ref)
        d.hook_failed = False
    elif EXT_USER_MIN <= code <= EXT_USER_MAX:
        payload = _rd_bin(d, n)
        if d.ext_hook is None:
            _fail(d, f"the value holds extension type {code} but no ext_hook was given")
        d.hook_failed = True
        out = d.ext_hook(code, payload)
        d.hook_failed = False
    else:
        d.pos -= 1
        return _fail(d, f"unknown extension type {code}")
    if d.pos != d.end:
        _fail(d, f"extension type {code} has {d.end - d.pos} unread payload bytes")
    d.end = saved_end
    return out


cdef object _untrusted_opaque(_Decoder d, int code, Py_ssize_t start, Py_ssize_t n, int depth):
    """The class payload at [start, start + n) as an Opaque when its class is not trusted
    (None when it is: decode it as usual). References inside are resolved, so that the
    collections they name are reached and can be renumbered when the Opaque is encoded."""
    _rd_array_header(d)
    name = _dec_of(d, depth + 1, str, "a class name")
    try:
        info = _find_trusted(d, name)
    except DecodeError:
        info = None
    d.pos = start
    if info is not None:
        return None
    cdef list ids = []
    while d.pos < d.end:
        _scan(d, depth + 1, ids)
    cdef Opaque out = Opaque.__new__(Opaque)
    out.code = code
    out.name = name
    out.payload = PyBytes_FromStringAndSize(<const char *>d.buf + start, n)
    if ids and d.ref_resolver is None:
        _fail(d, "the value holds a collection reference but no ref_resolver was given")
    d.hook_failed = True
    out.refs = tuple([PyObject_CallOneArg(d.ref_resolver, i) for i in ids])
    d.hook_failed = False
    return out


cdef inline bint _structured(int code) noexcept:
    """Extension codes whose payload is nested values (the others hold raw bytes)."""
    return (code == EXT_TUPLE or code == EXT_SET or code == EXT_FROZENSET
            or (EXT_DATETIME <= code <= EXT_TIMEZONE) or code == EXT_FRACTION
            or (EXT_ENUM <= code <= EXT_REF))


cdef Py_ssize_t _container_items(_Decoder d) except -2:
    """Move past the array or map header at d.pos; the number of values that follow (-1 and
    nothing moved when the next value is not an array or map)."""
    cdef uint8_t b = d.buf[d.pos]
    cdef Py_ssize_t n
    if 0x90 <= b <= 0x9f:
        n = b & 0x0f
    elif 0x80 <= b <= 0x8f:
        n = 2 * (b & 0x0f)
    elif b == 0xdc or b == 0xdd:
        d.pos += 1
        n = <Py_ssize_t>_rd(d, 2 if b == 0xdc else 4)
        d.pos -= 1
    elif b == 0xde or b == 0xdf:
        d.pos += 1
        n = 2 * <Py_ssize_t>_rd(d, 2 if b == 0xde else 4)
        d.pos -= 1
    else:
        return -1
    d.pos += 1
    _need(d, n)                                # every item takes at least one byte
    return n


cdef Py_ssize_t _ext_header(_Decoder d, int *code) except -2:
    """Move past the extension header at d.pos and set `code`; the payload's length (-1 and
    nothing moved when the next value is not an extension)."""
    cdef uint8_t b = d.buf[d.pos]
    cdef Py_ssize_t n
    if 0xd4 <= b <= 0xd8:
        d.pos += 1
        n = 1 << (b - 0xd4)
    elif 0xc7 <= b <= 0xc9:
        d.pos += 1
        n = <Py_ssize_t>_rd(d, 1 << (b - 0xc7))
    else:
        return -1
    code[0] = <signed char>_rd(d, 1)
    _need(d, n)
    return n


cdef int _scan(_Decoder d, int depth, list ids) except -1:
    """Move past one value as _skip does, but into extensions too, appending the id of every
    collection reference met."""
    cdef Py_ssize_t i, n, saved
    cdef int code = 0
    if depth >= DEPTH_LIMIT:
        _fail(d, f"value nested deeper than {DEPTH_LIMIT} levels")
    _need(d, 1)
    n = _container_items(d)
    if n >= 0:
        for i in range(n):
            _scan(d, depth + 1, ids)
        return 0
    n = _ext_header(d, &code)
    if n < 0:
        return _skip(d, depth)
    if not _structured(code):
        d.pos += n
        return 0
    saved = d.end
    d.end = d.pos + n
    if code == EXT_REF:
        ids.append(_dec_of(d, depth + 1, int, "a collection reference"))
    while d.pos < d.end:
        _scan(d, depth + 1, ids)
    d.end = saved
    return 0


cdef object _dec_tz(_Decoder d, int depth):
    tz = _dec(d, depth + 1)
    if tz is not None and not isinstance(tz, _tzinfo):
        _fail(d, "a tzinfo field holds a non-tzinfo value")
    return tz


cdef object _dec_dataclass(_Decoder d, int depth):
    cdef Py_ssize_t i, m = _rd_array_header(d)
    if m < 1:
        _fail(d, "dataclass without a class name")
    cdef _ClassInfo info = _dec_class(d, depth, K_DATACLASS)
    if m - 1 != PyTuple_GET_SIZE(info.fields):
        _fail(d, f"dataclass {info.name} has {len(info.fields)} fields, the stored value {m - 1} "
                 f"(the class changed since the value was written)")
    obj = pb_tp_new(info.cls, _no_args)
    if info.use_dict:
        state = PyObject_GenericGetDict(obj, NULL)
        for i in range(m - 1):
            PyDict_SetItem(state, <object>PyTuple_GET_ITEM(info.fields, i), _dec(d, depth + 1))
    else:
        for i in range(m - 1):
            PyObject_GenericSetAttr(obj, <object>PyTuple_GET_ITEM(info.fields, i), _dec(d, depth + 1))
    return obj


cdef object _dec_object(_Decoder d, int depth):
    _fields(d, 2, 2, "object")
    cdef _ClassInfo info = _dec_class(d, depth, K_OBJECT)
    state = _dec(d, depth + 1)
    obj = pb_tp_new(info.cls, _no_args)
    if info.has_setstate:
        if state:
            obj.__setstate__(state)
        return obj
    slots = None
    if type(state) is tuple and len(state) == 2:
        state, slots = state
    if state is not None:
        if type(state) is not dict:
            _fail(d, f"object state of {info.name} is not a dict")
        target = obj.__dict__
        for k, v in (<dict>state).items():
            if type(k) is not str:
                _fail(d, "an attribute name is not a str")
            target[sys.intern(k)] = v
    if slots is not None:
        if type(slots) is not dict:
            _fail(d, f"slot state of {info.name} is not a dict")
        for k, v in (<dict>slots).items():
            if type(k) is not str:
                _fail(d, "an attribute name is not a str")
            PyObject_GenericSetAttr(obj, k, v)
    return obj


cdef object _dec_dtype(_Decoder d, object np, int depth):
    spec = _dec(d, depth + 1)
    if type(spec) is not str and type(spec) is not list:
        _fail(d, "a numpy dtype must be a str or a list")
    dtype = np.dtype(spec)
    # Only the spelling the encoder writes: no aliases, no object fields.
    if dtype.hasobject or _dtype_spec(dtype) != spec:
        _fail(d, f"invalid numpy dtype {spec!r:.60}")
    return dtype


cdef object _dec_numpy(_Decoder d, int code, int depth):
    import numpy as np
    if code == EXT_NPSCALAR:
        _fields(d, 2, 2, "numpy scalar")
        dtype = _dec_dtype(d, np, depth)
        raw = _dec_of(d, depth + 1, bytes, "numpy scalar data")
        if dtype.hasobject or len(raw) != dtype.itemsize:
            _fail(d, "numpy scalar data does not match its dtype")
        if dtype.itemsize == 0:
            return np.zeros((), dtype)[()]
        return np.frombuffer(raw, dtype)[0]
    _fields(d, 4, 4, "numpy array")
    dtype = _dec_dtype(d, np, depth)
    shape = _dec_of(d, depth + 1, list, "a numpy shape")
    fortran = _dec(d, depth + 1)
    raw = _dec_of(d, depth + 1, bytes, "numpy array data")
    size = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            _fail(d, "bad numpy shape")
        size *= dim
    if dtype.hasobject or type(fortran) is not bool or size * dtype.itemsize != len(raw):
        _fail(d, "numpy array data does not match its dtype and shape")
    order = "F" if fortran else "C"
    if dtype.itemsize == 0:
        return np.zeros(tuple(shape), dtype, order=order)
    flat = np.frombuffer(raw, dtype)
    return np.array(flat.reshape(tuple(shape), order=order), order=order, copy=True)


# A spare decoder state, reused as the encoder's is (see _spare_encoder).
cdef _Decoder _spare_decoder = None


# ---------------------------------------------------------------------------------------
# One field of a map, the rest skipped (index builds read one field of every row)

cdef Py_ssize_t _str_header(_Decoder d) except -2:
    """The length of the str whose header starts at d.pos, moving past the header; -1
    (nothing moved) when the next value is not a plain str."""
    cdef uint8_t b = d.buf[d.pos]
    if 0xa0 <= b <= 0xbf:
        d.pos += 1
        return b & 0x1f
    if b == 0xd9 or b == 0xda or b == 0xdb:
        d.pos += 1
        return <Py_ssize_t>_rd(d, 1 << (b - 0xd9))
    return -1


cdef int _skip(_Decoder d, int depth) except -1:
    """Move past one value without building it; bounds are checked as _dec checks them."""
    cdef uint8_t b
    cdef Py_ssize_t n, i, items = 0
    if depth >= DEPTH_LIMIT:
        _fail(d, f"value nested deeper than {DEPTH_LIMIT} levels")
    _need(d, 1)
    b = d.buf[d.pos]
    d.pos += 1
    if b < 0x80 or b >= 0xe0 or b == 0xc0 or b == 0xc2 or b == 0xc3:
        return 0
    if 0xa0 <= b <= 0xbf:
        n = b & 0x1f
    elif 0x80 <= b <= 0x8f:
        n, items = 0, 2 * (b & 0x0f)
    elif 0x90 <= b <= 0x9f:
        n, items = 0, b & 0x0f
    elif b == 0xcc or b == 0xd0:
        n = 1
    elif b == 0xcd or b == 0xd1:
        n = 2
    elif b == 0xca or b == 0xce or b == 0xd2:
        n = 4
    elif b == 0xcb or b == 0xcf or b == 0xd3:
        n = 8
    elif b == 0xd9 or b == 0xc4:
        n = <Py_ssize_t>_rd(d, 1)
    elif b == 0xda or b == 0xc5:
        n = <Py_ssize_t>_rd(d, 2)
    elif b == 0xdb or b == 0xc6:
        n = <Py_ssize_t>_rd(d, 4)
    elif b == 0xdc or b == 0xdd:
        n, items = 0, <Py_ssize_t>_rd(d, 2 if b == 0xdc else 4)
    elif b == 0xde or b == 0xdf:
        n, items = 0, 2 * <Py_ssize_t>_rd(d, 2 if b == 0xde else 4)
    elif 0xd4 <= b <= 0xd8:
        n = 1 + (1 << (b - 0xd4))              # the type byte, then the payload
    elif b == 0xc7 or b == 0xc8 or b == 0xc9:
        n = 1 + <Py_ssize_t>_rd(d, 1 << (b - 0xc7))
    else:
        d.pos -= 1
        return _fail(d, f"invalid type byte 0x{b:02x}")
    _need(d, n + items)                        # every item takes at least one byte
    d.pos += n
    for i in range(items):
        _skip(d, depth + 1)
    return 0


cdef object _dec_field(_Decoder d, bytes name, object missing, object other):
    # The value under the str key `name` (UTF-8) of the map at d.pos, `missing` when the
    # map has no such key, `other` when the value is not a map at all.
    cdef Py_ssize_t n, i, k, want = PyBytes_GET_SIZE(name)
    _need(d, 1)
    cdef uint8_t b = d.buf[d.pos]
    if 0x80 <= b <= 0x8f:
        d.pos += 1
        n = b & 0x0f
    elif b == 0xde or b == 0xdf:
        d.pos += 1
        n = <Py_ssize_t>_rd(d, 2 if b == 0xde else 4)
    else:
        return other
    _need(d, 2 * n)
    for i in range(n):
        _need(d, 1)
        k = _str_header(d)
        if k < 0:
            _skip(d, 1)
        else:
            _need(d, k)
            if k == want and memcmp(d.buf + d.pos, PyBytes_AS_STRING(name), k) == 0:
                d.pos += k
                return _dec(d, 1)
            d.pos += k
        _skip(d, 1)
    return missing


# ---------------------------------------------------------------------------------------
# The collection references inside a value, nothing built (db.check() walks every value)

cdef inline bint _may_hold_values(int code):
    # Extensions whose payload is an array of nested values that may include a reference;
    # every other code holds bytes, numbers or names only.
    return (code == EXT_TUPLE or code == EXT_SET or code == EXT_FROZENSET
            or code == EXT_NAMEDTUPLE or code == EXT_DATACLASS or code == EXT_OBJECT
            or code == EXT_ENUM)


cdef object _rd_ref_id(_Decoder d):
    # A reference's payload is one non-negative MessagePack int (what the encoder writes
    # for a collection id); read in place, so a forged payload never reaches _dec.
    _need(d, 1)
    cdef uint8_t b = d.buf[d.pos]
    if b < 0x80:
        d.pos += 1
        return b
    if 0xcc <= b <= 0xcf:
        d.pos += 1
        return _rd(d, 1 << (b - 0xcc))
    return _fail(d, "a collection reference must be a non-negative int")


cdef int _refs(_Decoder d, int depth, list out) except -1:
    """Move past one value as _skip does, appending the id of every collection reference
    met on the way; class names are read as plain strs, never resolved."""
    cdef uint8_t b
    cdef Py_ssize_t n, i, items
    cdef Py_ssize_t saved_end
    cdef int code
    if depth >= DEPTH_LIMIT:
        _fail(d, f"value nested deeper than {DEPTH_LIMIT} levels")
    _need(d, 1)
    b = d.buf[d.pos]
    if 0x80 <= b <= 0x8f or b == 0xde or b == 0xdf:
        d.pos += 1
        if b <= 0x8f:
            items = 2 * (b & 0x0f)
        else:
            items = 2 * <Py_ssize_t>_rd(d, 2 if b == 0xde else 4)
    elif 0x90 <= b <= 0x9f or b == 0xdc or b == 0xdd:
        items = _rd_array_header(d)
    elif 0xd4 <= b <= 0xd8 or b == 0xc7 or b == 0xc8 or b == 0xc9:
        d.pos += 1
        n = (1 << (b - 0xd4)) if b >= 0xd4 else <Py_ssize_t>_rd(d, 1 << (b - 0xc7))
        _need(d, n + 1)
        code = <signed char>d.buf[d.pos]
        d.pos += 1
        if code != EXT_REF and not _may_hold_values(code):
            d.pos += n
            return 0
        saved_end = d.end
        d.end = d.pos + n
        if code == EXT_REF:
            out.append(_rd_ref_id(d))
        else:
            items = _rd_array_header(d)
            _need(d, items)
            for i in range(items):
                _refs(d, depth + 1, out)
        if d.pos != d.end:
            _fail(d, f"extension type {code} has {d.end - d.pos} unread payload bytes")
        d.end = saved_end
        return 0
    else:
        return _skip(d, depth)
    _need(d, items)                            # every item takes at least one byte
    for i in range(items):
        _refs(d, depth + 1, out)
    return 0


def refs(data):
    """The ids of the collections `data` (one encoded value) refers to, in the order they
    appear (repeats kept). Nothing is built and no class is resolved or imported, so any
    stored value can be inspected, trusted or not. DecodeError on damaged bytes."""
    cdef _Decoder d = _Decoder.__new__(_Decoder)
    cdef Py_buffer view
    cdef list out = []
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        d.buf = <const unsigned char *>view.buf
        d.pos = 0
        d.end = view.len
        _refs(d, 0, out)
        if d.pos != d.end:
            _fail(d, f"{d.end - d.pos} trailing bytes after the value")
        return out
    finally:
        d.buf = NULL
        PyBuffer_Release(&view)


cdef object _decode(object data, object ref_resolver, object ext_hook, bint strict,
                    frozenset trust, bint opaque, bytes field=None, object missing=None,
                    object other=None):
    global _spare_decoder
    cdef _Decoder d = _spare_decoder
    cdef Py_buffer view
    cdef bint release = False
    if not PyBytes_CheckExact(data) and not PyObject_CheckBuffer(data):
        raise DecodeError(f"expected the bytes of an encoded value, not "
                          f"{type(data).__name__}: the stored value is damaged or forged",
                          offset=0)
    if d is None:
        d = _Decoder.__new__(_Decoder)
    else:
        _spare_decoder = None
    d.pos = 0
    d.hook_failed = False
    if PyBytes_CheckExact(data):
        d.buf = <const unsigned char *>PyBytes_AS_STRING(data)
        d.end = PyBytes_GET_SIZE(data)
    else:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        release = True
        d.buf = <const unsigned char *>view.buf
        d.end = view.len
    d.ref_resolver = ref_resolver
    d.ext_hook = ext_hook
    d.strict = strict
    d.trust = trust
    d.opaque = opaque
    try:
        if field is not None:
            return _dec_field(d, field, missing, other)
        out = _dec(d, 0)
        if d.pos != d.end:
            _fail(d, f"{d.end - d.pos} trailing bytes after the value")
        return out
    except DecodeError:
        raise
    except RecursionError as exc:
        raise DecodeError(f"value nested too deeply to decode ({exc})", offset=d.pos) from None
    except Exception as exc:
        if d.hook_failed:
            raise
        raise DecodeError(f"invalid encoded value: {type(exc).__name__}: {exc} "
                          f"(near byte {d.pos})", offset=d.pos) from exc
    finally:
        if release:
            PyBuffer_Release(&view)
        d.buf = NULL
        d.ref_resolver = None
        d.ext_hook = None
        d.trust = None
        _spare_decoder = d


def loads(data, *, ref_resolver=None, ext_hook=None, strict=False, trust=None, opaque=False):
    """Decode one value from `data` (bytes-like). Damaged, truncated or forged bytes, and
    trailing bytes after the value, raise DecodeError. Instances are built only of trusted
    classes: registered ones, ones this process stored, and those of the modules named in
    `trust` (already imported); any other class is a DecodeError, or with `opaque=True` an
    Opaque holding its payload. `strict=True` admits registered classes only."""
    return _decode(data, ref_resolver, ext_hook, strict, _trust_set(trust, "loads"), opaque)


@cython.final
@cython.auto_pickle(False)
cdef class Decoder:
    """`loads` with its hooks bound once: ``Decoder(ref_resolver=r).decode(b)`` is
    ``loads(b, ref_resolver=r)`` without the keyword handling on every call (the layers
    above decode every value read through one per transaction)."""

    def __init__(self, *, ref_resolver=None, ext_hook=None, strict=False, trust=None,
                 opaque=False):
        self.ref_resolver = ref_resolver
        self.ext_hook = ext_hook
        self.strict = strict
        self.trust = _trust_set(trust, "Decoder")
        self.opaque = opaque

    @cython.binding(False)                 # a plain C method: called without cyfunction dispatch
    @cython.always_allow_keywords(False)   # METH_O: one positional argument, no parsing
    def decode(self, data):
        """Decode `data` exactly as loads() with this decoder's hooks does."""
        return _decode(data, self.ref_resolver, self.ext_hook, self.strict, self.trust,
                       self.opaque)

    def decode_field(self, data, str name, missing, other):
        """``decode(data).get(name, missing)`` for `data` encoding a plain dict, building
        only that one entry's value (the others are skipped, not checked in full);
        `other` when `data` encodes anything but a plain dict (decode it whole then)."""
        try:
            key = name.encode("utf-8")
        except UnicodeEncodeError:     # a lone surrogate: such keys are stored apart
            return other
        return _decode(data, self.ref_resolver, self.ext_hook, self.strict, self.trust,
                       self.opaque, key, missing, other)

    def decode_fields(self, list datas, str name, missing, other):
        """``[decode_field(d, name, missing, other) for d in datas]`` in one C loop."""
        cdef list out = []
        try:
            key = name.encode("utf-8")
        except UnicodeEncodeError:
            return [other] * len(datas)
        for data in datas:
            out.append(_decode(data, self.ref_resolver, self.ext_hook, self.strict, self.trust,
                               self.opaque, key, missing, other))
        return out
