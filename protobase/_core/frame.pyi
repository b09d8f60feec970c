"""Atom framing for the storage log (see frame.pyx's essay)."""
from typing import Any, Callable, Final, Iterable

__all__ = ["AtomBatch", "AtomReader", "frame_atoms", "complete", "PREFIX_SIZE", "MAX_ATOM",
           "COMPLETE_TRIES"]

__source_digest__: str
PREFIX_SIZE: Final[int]    # 8: u32 length + u32 crc32 before each atom
MAX_ATOM: Final[int]       # 2**32 - 1

COMPLETE_TRIES: Final[int]

def complete(fn: Callable[..., Any], *args: Any) -> Any: ...
def frame_atoms(datas: Iterable[bytes | bytearray | memoryview], salt: int) -> bytes: ...

class AtomBatch:
    """The atoms of one commit being built, with the pointers handed out for them."""

    datas: list[bytes]
    ptrs: list[int]
    start: int
    pos: int
    payload: int
    closed: bool

    def __init__(self, start: int) -> None: ...
    def append(self, data: bytes | bytearray | memoryview) -> int: ...
    def extend(self, datas: Iterable[bytes | bytearray | memoryview]) -> list[int]: ...
    def find(self, ptr: int) -> bytes | None: ...
    def close(self) -> None: ...
    def frame(self, salt: int) -> bytes: ...
    def __len__(self) -> int: ...


class AtomReader:
    """The read path of a log store in C: the cache, then the mapping of the fsynced part
    of the file or one pread, then the checksum; anything else goes to ``fallback``."""

    salt: int | None   # the file's checksum salt; None (no header yet): every miss falls back
    limit: int         # end of the committed log (read-only stores; a writer's is read live)
    durable: int       # below this a footer says every byte was fsynced (read-only stores)
    closed: bool       # once set, every miss takes the fallback (which raises)
    @property
    def mapped(self) -> int: ...   # bytes [0, mapped) of the file are mapped

    def __init__(self, cache: Any, fd: int, salt: int | None,
                 fallback: Callable[[int], bytes], stats: dict[str, int], writer: Any,
                 limit: int, durable: int = 0) -> None: ...
    def read(self, ptr: int) -> bytes: ...
    def unmap(self) -> None: ...
