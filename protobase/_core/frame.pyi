"""Atom framing for the storage log (see frame.pyx's essay)."""
from typing import Final, Iterable

__all__ = ["AtomBatch", "frame_atoms", "PREFIX_SIZE", "MAX_ATOM"]

__source_digest__: str
PREFIX_SIZE: Final[int]    # 8: u32 length + u32 crc32 before each atom
MAX_ATOM: Final[int]       # 2**32 - 1

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
