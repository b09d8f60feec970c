"""The value codec: Python values <-> MessagePack bytes with extension types (docs/format.md)."""
from typing import Any, Callable, Final, Iterable, Optional, Tuple, Union

__all__ = ["dumps", "loads", "Encoder", "Decoder", "ExtDefault", "Opaque", "dumps_key",
           "register_class", "refs", "trust_modules", "MAX_DEPTH"]

__source_digest__: str

MAX_DEPTH: Final[int]
"""Nesting levels accepted by dumps and loads (1000); deeper is SerializationError / DecodeError."""

RefHook = Callable[[Any], Optional[int]]
Default = Callable[[Any], Optional[Tuple[int, bytes]]]
RefResolver = Callable[[int], Any]
ExtHook = Callable[[int, bytes], Any]
Buffer = Union[bytes, bytearray, memoryview]

def dumps(obj: Any, *, ref_hook: Optional[RefHook] = ..., default: Optional[Default] = ...) -> bytes:
    """Encode `obj`. `ref_hook(x)` -> int N stores a reference to collection N; `default(x)` ->
    (code in 64..127, bytes) stores a user extension. Raises SerializationError (a TypeError)
    with `type_name` and `path` for values that cannot be stored."""

def loads(data: Buffer, *, ref_resolver: Optional[RefResolver] = ...,
          ext_hook: Optional[ExtHook] = ..., strict: bool = ...,
          trust: Optional[Iterable[str]] = ..., opaque: bool = ...) -> Any:
    """Decode one value; DecodeError (a ValueError) on damaged, truncated or trailing bytes.
    Instances only of trusted classes: registered, stored by this process, or of a module in
    `trust` (already imported); any other class is a DecodeError, or an Opaque with
    `opaque=True`. `strict=True` admits registered classes only. Never imports."""

class Encoder:
    """dumps() with its hooks bound once (the layers above keep one per transaction)."""

    def __init__(self, *, ref_hook: Optional[RefHook] = ..., default: Optional[Default] = ...,
                 trust: Optional[Iterable[str]] = ...) -> None:
        """`trust`: the modules the encoding database trusts (their classes store without
        the once-per-class UserWarning that unregistered classes give)."""

    def encode(self, obj: Any, /) -> bytes:
        """The same bytes and errors as dumps(obj) with this encoder's hooks."""

class ExtDefault:
    """A `default` hook with one exact type handled in C: values of exactly `cls` become
    extension `code` (64..127) holding `to_bytes(value)` (bytes); every other value goes to
    `fallback` (None: not handled). Calling it answers as the encoder would."""

    cls: type
    code: int
    to_bytes: Callable[[Any], bytes]
    fallback: Optional[Default]

    def __init__(self, cls: type, code: int, to_bytes: Callable[[Any], bytes],
                 fallback: Optional[Default] = ...) -> None: ...
    def __call__(self, obj: Any) -> Optional[Tuple[int, bytes]]: ...

class Decoder:
    """loads() with its hooks bound once (the layers above keep one per transaction)."""

    def __init__(self, *, ref_resolver: Optional[RefResolver] = ...,
                 ext_hook: Optional[ExtHook] = ..., strict: bool = ...,
                 trust: Optional[Iterable[str]] = ..., opaque: bool = ...) -> None: ...

    def decode(self, data: Buffer, /) -> Any:
        """The same value and errors as loads(data) with this decoder's hooks."""

    def decode_field(self, data: Buffer, name: str, missing: Any, other: Any, /) -> Any:
        """decode(data).get(name, missing) for a plain dict, building only that entry;
        `other` when data encodes anything else."""

    def decode_fields(self, datas: list[Buffer], name: str, missing: Any, other: Any, /) -> list[Any]:
        """[decode_field(d, name, missing, other) for d in datas], in one C loop."""

def refs(data: Buffer) -> list[int]:
    """The collection ids `data` refers to, in order (repeats kept), found without building
    anything or resolving any class. DecodeError on damaged bytes."""


class Opaque:
    """An instance of an untrusted class carried undecoded (decoding with opaque=True):
    encoding it writes the same bytes, references renumbered through ref_hook."""

    code: int
    name: str
    payload: bytes
    refs: Tuple[Any, ...]

def dumps_key(key: Any) -> bytes:
    """Canonical bytes of a key: equal keys (as in a dict) give identical bytes. Non-key types
    raise SerializationError (a TypeError)."""

def trust_modules(trust: Optional[Iterable[str]], who: str = ...) -> Optional[frozenset[str]]:
    """`trust` checked as every trust= argument is (TypeError naming `who` otherwise): a
    frozenset of dotted module names, or None."""

def register_class(cls: type, name: str) -> None:
    """Store `cls` under the stable `name` and resolve `name` to `cls` when decoding.
    `name`: dotted identifiers ('app.Point') or 'module:qualname', else InvalidArgumentError.
    ValueError if `name` is already registered for another class."""
