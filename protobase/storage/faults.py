"""A fault-injecting file layer, for testing what the engine does when the disk misbehaves.

It wraps a real OSFile (in the manner of SQLite's crash-test VFS) and can

- fail the Nth mutating operation (write, sync or truncate, counted together from 1)
  with EIO, ENOSPC or any errno, optionally for several operations in a row, optionally
  after writing part of the data first (a torn write before the error);
- make the Nth operation a short write (fewer bytes written and reported);
- simulate a power loss: ``crash()`` returns the bytes that a disk honouring fsync would
  hold (everything fsynced, plus optionally a prefix of what was not) and from then on
  every operation fails, as if the machine had stopped.

It keeps its own record of the durable content: each write or truncate is remembered as
pending until a sync succeeds; a failed sync leaves it pending (a failed fsync proves
nothing about what reached the disk). Reads are counted per kind in ``counts``.

    inj = FaultInjector(fail_at=3, error=errno.EIO)
    store = LogStore.open(path, file_layer=inj)
    ...
    survivors = inj.crash()      # bytes on "disk" after the power cut
"""
import errno as _errno
import os
import threading

from .fileio import OSFile

__all__ = ["FaultInjector", "FaultyFile", "SimulatedCrash"]


class SimulatedCrash(OSError):
    """Raised by every operation after FaultInjector.crash()."""


class FaultInjector:
    """A file layer (``layer(path, readonly=...)``) whose files fail on command.

    fail_at: the 1-based index of the mutating operation (write/sync/truncate) that fails;
    fail_count: how many mutating operations in a row fail from there (0 = all of them);
    error: the errno raised; fail_kinds: which operation kinds may be failed;
    partial: a failing write first writes half its bytes (a torn write);
    short_write_at: the index of a write that writes (and reports) only half its bytes."""

    def __init__(self, *, fail_at=None, fail_count=1, error=_errno.EIO,
                 fail_kinds=("write", "sync", "truncate"), partial=False, short_write_at=None):
        self.fail_at = fail_at
        self.fail_count = fail_count
        self.error = error
        self.fail_kinds = frozenset(fail_kinds)
        self.partial = partial
        self.short_write_at = short_write_at
        self.ops = 0                  # mutating operations attempted so far
        self.failures = 0             # faults injected so far
        self.counts = {"read": 0, "write": 0, "sync": 0, "truncate": 0, "size": 0}
        self.crashed = False
        self.files = []
        self._mutex = threading.RLock()

    def __call__(self, path, *, readonly=False):
        if self.crashed:
            raise SimulatedCrash(_errno.EIO, "simulated crash: the machine is down")
        f = FaultyFile(self, OSFile(path, readonly=readonly))
        self.files.append(f)
        return f

    def _should_fail(self, kind):
        """Count one mutating operation; True if it must fail."""
        self.ops += 1
        if self.fail_at is None or kind not in self.fail_kinds or self.ops < self.fail_at:
            return False
        if self.fail_count and self.ops >= self.fail_at + self.fail_count:
            return False
        self.failures += 1
        return True

    def error_for(self, kind):
        return OSError(self.error, f"injected {os.strerror(self.error)} on {kind} "
                                   f"(operation {self.ops})")

    def heal(self):
        """Stop injecting faults (the disk has been fixed)."""
        self.fail_at = None
        self.short_write_at = None

    def crash(self, keep_unsynced=0):
        """Simulate a power cut now. Returns the bytes a disk honouring fsync would hold for
        the writable file: its durable content plus the first ``keep_unsynced`` bytes
        written since the last successful sync (a torn write). Every later operation
        raises SimulatedCrash."""
        with self._mutex:
            self.crashed = True
            writable = [f for f in self.files if not f.inner.readonly]
            if not writable:
                return b""
            return writable[-1]._surviving(keep_unsynced)


class FaultyFile:
    """An OSFile seen through a FaultInjector; keeps the durable content on the side."""

    def __init__(self, injector, inner):
        self.inj = injector
        self.inner = inner
        self.readonly = inner.readonly
        self.created = inner.created
        self.path = inner.path
        # What is on "disk": the content when opened (assumed durable) ...
        self.durable = bytearray(self._read_all())
        # ... and the mutations since the last successful sync, in order.
        self.pending = []

    def _read_all(self):
        size = self.inner.size()
        return self.inner.read(0, size) if size else b""

    def _alive(self):
        if self.inj.crashed:
            raise SimulatedCrash(_errno.EIO, "simulated crash: the machine is down")

    def read(self, offset, size):
        self._alive()
        self.inj.counts["read"] += 1
        return self.inner.read(offset, size)

    def size(self):
        self._alive()
        self.inj.counts["size"] += 1
        return self.inner.size()

    def write(self, offset, data):
        inj = self.inj
        with inj._mutex:
            self._alive()
            inj.counts["write"] += 1
            data = bytes(data)
            if inj._should_fail("write"):
                if inj.partial and len(data) > 1:
                    half = data[:len(data) // 2]
                    self.inner.write(offset, half)
                    self.pending.append(("write", offset, half))
                raise inj.error_for("write")
            if inj.short_write_at is not None and inj.ops == inj.short_write_at and len(data) > 1:
                data = data[:len(data) // 2]
            n = self.inner.write(offset, data)
            self.pending.append(("write", offset, data[:n]))
            return n

    def truncate(self, size):
        inj = self.inj
        with inj._mutex:
            self._alive()
            inj.counts["truncate"] += 1
            if inj._should_fail("truncate"):
                raise inj.error_for("truncate")
            self.inner.truncate(size)
            self.pending.append(("truncate", size, None))

    def sync(self):
        inj = self.inj
        with inj._mutex:
            self._alive()
            inj.counts["sync"] += 1
            if inj._should_fail("sync"):
                raise inj.error_for("sync")
            self.inner.sync()
            d = self.durable
            for kind, a, b in self.pending:
                if kind == "truncate":
                    del d[a:]
                else:
                    if a > len(d):
                        d.extend(bytes(a - len(d)))
                    d[a:a + len(b)] = b
            self.pending.clear()

    def sync_directory(self):
        self._alive()
        self.inner.sync_directory()

    def lock(self):
        self._alive()
        return self.inner.lock()

    def close(self):
        self.inner.close()

    def _surviving(self, keep_unsynced):
        """durable + a prefix of the unsynced appends (when they extend the durable
        content)."""
        out = bytearray(self.durable)
        if keep_unsynced:
            try:
                current = self._read_all()
            except (OSError, TypeError):
                current = b""
            if current[:len(out)] == out:
                out += current[len(out):len(out) + keep_unsynced]
        return bytes(out)
