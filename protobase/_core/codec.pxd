# C-level interface of the value codec (see the essay at the top of codec.pyx).

# Extension type codes 0..63 are the codec's own; 64..127 belong to `default`/`ext_hook`.
cdef enum ExtCode:
    EXT_BIGINT = 0
    EXT_TUPLE = 1
    EXT_SET = 2
    EXT_FROZENSET = 3
    EXT_BYTEARRAY = 4
    EXT_COMPLEX = 5
    EXT_DATETIME = 6
    EXT_DATE = 7
    EXT_TIME = 8
    EXT_TIMEDELTA = 9
    EXT_TIMEZONE = 10
    EXT_ZONEINFO = 11
    EXT_DECIMAL = 12
    EXT_FRACTION = 13
    EXT_UUID = 14
    EXT_ENUM = 15
    EXT_NAMEDTUPLE = 16
    EXT_DATACLASS = 17
    EXT_OBJECT = 18
    EXT_NDARRAY = 19
    EXT_NPSCALAR = 20
    EXT_REF = 21
    EXT_SURROGATE_STR = 22
    EXT_USER_MIN = 64
    EXT_USER_MAX = 127


cdef class _ClassInfo:
    cdef int kind
    cdef object cls
    cdef str name
    cdef bytes name_packed       # the name already encoded as a MessagePack str
    cdef tuple fields            # dataclass / namedtuple field names, interned
    cdef bint use_dict           # dataclass: fields live in the instance __dict__
    cdef bint custom_state       # the class overrides __getstate__
    cdef bint has_setstate
    cdef str refusal             # kind == refused: why
    cdef bint registered         # `name` is registered for this class (strict mode accepts it)
    cdef bint unshared           # encoding: not registered, so other processes need trust= for it
    cdef bint trusted            # decoding: registered or stored by this process (every decoder)
    cdef str trust_module        # decoding: admitted as a class of this module (decoders trusting it)


cdef class _Encoder:
    cdef char *buf
    cdef Py_ssize_t length
    cdef Py_ssize_t cap
    cdef object ref_hook
    cdef object default
    cdef frozenset trust         # modules the encoding database trusts (None: none)
    cdef list steps              # filled only while an error unwinds: (container, kind, key)

    cdef bytes take(self)


cdef class _Decoder:
    cdef const unsigned char *buf
    cdef Py_ssize_t pos
    cdef Py_ssize_t end
    cdef object ref_resolver
    cdef object ext_hook
    cdef bint strict
    cdef frozenset trust         # modules whose classes this decode admits (None: none)
    cdef bint opaque             # an untrusted class payload becomes an Opaque, not an error
    cdef bint hook_failed        # the pending exception came from a user hook: pass it on


cdef class Encoder:
    cdef object ref_hook
    cdef object default
    cdef frozenset trust


cdef class Decoder:
    cdef object ref_resolver
    cdef object ext_hook
    cdef bint strict
    cdef frozenset trust
    cdef bint opaque


cdef class Opaque:
    cdef readonly int code
    cdef readonly str name
    cdef readonly bytes payload
    cdef readonly tuple refs


cpdef bytes dumps_key(object key)
