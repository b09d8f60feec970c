"""Collection handle fields as C slots, and a map's subscripts in C (see handle.pyx)."""
from typing import Any

__source_digest__: str


class HandleCore:
    _tx: Any
    _cid: Any
    _base: Any
    _mut: Any
    _writes: Any
    _reads: Any
    _initial: Any
    _ix: Any
    _schema: Any


class MapCore(HandleCore):
    def __getitem__(self, key: Any) -> Any: ...
    def __setitem__(self, key: Any, value: Any) -> None: ...
    def __delitem__(self, key: Any) -> None: ...
    def get(self, key: Any, default: Any = ...) -> Any: ...
    def __contains__(self, key: Any) -> bool: ...
