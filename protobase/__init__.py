"""ProtoBase: an in-process, transactional object database for Python — a supercharged dict.

    import protobase as pb
    with pb.open("shop.pb") as db:
        with db.transaction() as tx:
            tx.root["carts"] = pb.Dict()
"""
from . import build_info, errors
from .errors import (ConflictError, CorruptionError, DatabaseClosedError, DatabaseLockedError,
                     DecodeError, InvalidArgumentError, MissingDependencyError, NotADatabaseError, ProtoBaseError,
                     QueryError, ReadOnlyError, SerializationError, StorageError,
                     TransactionClosedError, TransactionError, VectorError)
from .state import codec as _codec
from .collections import Dict, List, Set, SortedDict
from .query import F, Query
from .transaction import Transaction
from .database import Database, open

register_class = _codec.register_class

__version__ = "0.1.0"

__all__ = [
    "open", "Database", "Transaction", "Dict", "List", "Set", "SortedDict", "register_class",
    "F", "Query",
    "build_info", "errors", "ProtoBaseError", "TransactionError", "ConflictError", "TransactionClosedError",
    "ReadOnlyError", "SerializationError", "DecodeError", "CorruptionError", "NotADatabaseError",
    "DatabaseLockedError", "DatabaseClosedError", "StorageError", "QueryError",
    "MissingDependencyError", "VectorError", "InvalidArgumentError",
]
