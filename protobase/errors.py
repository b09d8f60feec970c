"""ProtoBase's errors: one base class, each error co-inheriting from the built-in whose
meaning it shares, carrying structured attributes and a hint on what to do."""
from typing import Any, Optional

__all__ = [
    "ProtoBaseError", "TransactionError", "ConflictError", "TransactionClosedError",
    "ReadOnlyError", "SerializationError", "DecodeError", "CorruptionError",
    "NotADatabaseError", "DatabaseLockedError", "QueryError", "MissingDependencyError",
    "StorageError", "DatabaseClosedError", "VectorError", "InvalidArgumentError",
]


class ProtoBaseError(Exception):
    """Base class of every error ProtoBase raises on purpose."""


class TransactionError(ProtoBaseError):
    """A transaction could not do what was asked."""


class ConflictError(TransactionError):
    """A concurrent transaction committed a write this one conflicts with; retry the
    transaction (``db.run(fn, retries=N)`` does that for you).

    ``collection`` is the collection's id (0: the root), ``collection_name`` its root name
    when it sits directly under the root (else None), ``key`` the key (or member, index,
    root name), ``reason`` what conflicted, and ``attempts`` how many times ``db.run`` tried
    before giving up (None for a single commit)."""

    _RETRY_HINT = "; retry the transaction (db.run(fn) retries it for you)"

    def __init__(self, message: str, *, collection: Any = None, key: Any = None,
                 reason: Optional[str] = None, collection_name: Optional[str] = None,
                 attempts: Optional[int] = None) -> None:
        super().__init__(message)
        self.collection = collection
        self.key = key
        self.reason = reason
        self.collection_name = collection_name
        self.attempts = attempts

    def _gave_up(self, attempts, retries):
        """The ConflictError ``db.run`` raises when its last attempt conflicted too."""
        what = str(self).removesuffix(self._RETRY_HINT)
        return ConflictError(
            f"db.run gave up after {attempts} attempts, each beaten by a transaction that "
            f"committed first; the last conflict: {what}; pass a larger retries= (it was "
            f"{retries}), or have fewer concurrent transactions write the same keys",
            collection=self.collection, key=self.key, reason=self.reason,
            collection_name=self.collection_name, attempts=attempts)


class TransactionClosedError(TransactionError):
    """The transaction (or a handle bound to it) was used after commit or abort; open a new one."""


class ReadOnlyError(TransactionError):
    """A write was attempted in a read-only transaction or database."""


class SerializationError(ProtoBaseError, TypeError):
    """A value cannot be stored. ``type_name`` is the offending type, ``path`` where it sits
    inside the value being written (for example ``value['bad'][1]``)."""

    def __init__(self, message: str, *, type_name: Optional[str] = None, path: Any = None) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.path = path


class DecodeError(ProtoBaseError, ValueError):
    """Bytes handed to the decoder are not a valid encoded value (damaged, truncated or forged)."""

    def __init__(self, message: str, *, offset: Optional[int] = None) -> None:
        super().__init__(message)
        self.offset = offset


class CorruptionError(ProtoBaseError):
    """Committed data failed its checksum or structure check. ``offset`` is the byte offset in
    the file; run ``protobase check PATH`` and restore from a backup if needed."""

    def __init__(self, message: str, *, offset: Optional[int] = None, path: Optional[str] = None) -> None:
        super().__init__(message)
        self.offset = offset
        self.path = path


class NotADatabaseError(ProtoBaseError):
    """The path holds something that is not a ProtoBase database; it was left untouched."""


class DatabaseLockedError(ProtoBaseError):
    """Another process holds the database open for writing; open it with readonly=True, or
    close the other writer."""


class DatabaseClosedError(ProtoBaseError):
    """The database was used after close()."""


class StorageError(ProtoBaseError, OSError):
    """A write or fsync failed (disk full, I/O error). The database stays at its last good
    commit; fix the cause and retry."""


class QueryError(ProtoBaseError, ValueError):
    """A query is malformed (unknown operator, bad operand, unknown field in order_by...)."""


class MissingDependencyError(ProtoBaseError, ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


class VectorError(ProtoBaseError, ValueError):
    """A vector is unusable: wrong dimension, not numeric, NaN/inf, or a bad index setting."""


class InvalidArgumentError(ProtoBaseError, ValueError):
    """An argument has the right type but a value outside what it accepts (a negative
    ``retries`` or ``ttl``); the message names the argument and the accepted range. A wrong
    type stays a ``TypeError``."""
