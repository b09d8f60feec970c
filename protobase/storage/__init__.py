"""ProtoBase's storage engine: an append-only log of checksummed atoms and commits.

Bytes and pointers only (docs/internals.md "Storage"; the byte format is in
docs/format.md "## File", the durability argument in docs/durability.md)::

    store = LogStore.open("app.pb", durability="full")
    c = store.begin_commit()
    ptr = c.write_atom(b"hello")
    seq, root = c.finish(ptr).result()   # durable once this returns
    store.read_atom(root)                # b"hello"

Modules, one job each: ``log`` (the format and recovery scan), ``writer`` (background
writer thread, group commit, durability futures), ``cache`` (AtomBytesCache), ``lock``
(the one-writer OS lock), ``fileio`` (the small storage interface: real and in-memory
files), ``faults`` (a fault-injecting file layer for crash tests), ``store`` (LogStore).
"""
from .cache import AtomBytesCache
from .faults import FaultInjector, SimulatedCrash
from .fileio import MemoryFS, OSFile, os_file_layer
from .store import DURABILITY_MODES, CheckReport, LogStore, Problem
from .writer import Commit

__all__ = ["LogStore", "Commit", "CheckReport", "Problem", "AtomBytesCache", "OSFile",
           "MemoryFS", "os_file_layer", "FaultInjector", "SimulatedCrash", "DURABILITY_MODES"]
