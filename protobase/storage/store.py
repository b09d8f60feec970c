"""LogStore: the storage engine's face to the layer above (docs/internals.md "Storage").

Bytes and pointers only: ``read_atom(ptr)`` returns the bytes an earlier commit wrote at
``ptr``; a commit is a batch of new atoms plus a root pointer. What the bytes mean is the
layer above's business.

Opening is careful with files that are not ours: the header is read through a read-only
handle first, so a text file or an SQLite database raises NotADatabaseError and is left
byte-for-byte untouched; only then is the file opened for writing and locked.
"""
import logging
import os
import struct
import weakref
import zlib

from .._core import load as _load_core
from ..errors import CorruptionError, DatabaseClosedError, ReadOnlyError, StorageError
from .cache import AtomBytesCache
from .fileio import OSFile, os_file_layer
from .log import (EMPTY, ATOM_PREFIX, ATOM_PREFIX_SIZE, FOOTER_SIZE, HEADER_SIZE, build_header,
                  find_last_commit, parse_header, walk_commits)
from .writer import Writer

__all__ = ["LogStore", "CheckReport", "Problem", "DURABILITY_MODES"]

logger = logging.getLogger("protobase")

DURABILITY_MODES = ("full", "normal", "none")
DEFAULT_CACHE_BYTES = 64 << 20
_FIRST_READ = 4096   # one pread usually brings the whole (small) atom with its prefix
_unpack_prefix = ATOM_PREFIX.unpack_from
_crc32 = zlib.crc32
AtomReader = _load_core("frame").AtomReader


def _fallback(store_ref):
    """The reader's way back to ``_read_from_file``, through a weak reference so that the
    store and its reader form no cycle (an unclosed store is freed, and its file closed,
    by reference counting alone)."""
    def fallback(ptr):
        store = store_ref()
        if store is None:
            raise DatabaseClosedError("the store is closed")
        return store._read_from_file(ptr)
    return fallback


class Problem:
    """One finding of check(): where, and what is wrong."""

    __slots__ = ("offset", "message")

    def __init__(self, offset, message):
        self.offset, self.message = offset, message

    def __repr__(self):
        return f"Problem(offset={self.offset}, message={self.message!r})"


class CheckReport:
    """What check() found. ``problems`` is empty when every atom and footer verified."""

    def __init__(self, problems, commits, atoms, atom_bytes, file_size, end):
        self.problems = problems
        self.commits = commits
        self.atoms = atoms
        self.atom_bytes = atom_bytes
        self.file_size = file_size
        self.end = end

    @property
    def ok(self):
        return not self.problems

    def __repr__(self):
        return (f"CheckReport(ok={self.ok}, commits={self.commits}, atoms={self.atoms}, "
                f"problems={self.problems[:5]!r}{'...' if len(self.problems) > 5 else ''})")


class LogStore:
    """An append-only log of atoms and commits in one file. Use LogStore.open()."""

    def __init__(self, path, file, salt, head_footer, *, durability, readonly, cache, lock):
        self.path = path
        self.durability = durability
        self.readonly = readonly
        self._file = file
        self._salt = salt
        self._cache = cache
        self._lock = lock
        self._closed = False
        self._stats = {"commits": 0, "groups": 0, "max_group": 0, "writes": 0, "fsyncs": 0,
                       "bytes_written": 0, "reads": 0, "failed_commits": 0,
                       "lost_commits": 0, "errors": 0}
        self._head = (head_footer.seq, head_footer.root)
        self._end = head_footer.end
        self._writer = None
        if not readonly:
            self._writer = Writer(file, salt, durability, cache, head_footer, self._stats)
        # read_atom is the C reader's method, so the kernels reach it with no Python frame;
        # anything but a clean read of a real file falls back to _read_from_file. The
        # reader maps the part of the file a footer says was fsynced (never cut back).
        self._reader = AtomReader(cache, file._fd if type(file) is OSFile else -1, salt,
                                  _fallback(weakref.ref(self)), self._stats, self._writer,
                                  self._end, head_footer.synced)
        self.read_atom = self._reader.read

    @classmethod
    def open(cls, path, durability="full", readonly=False, bytes_cache_size=DEFAULT_CACHE_BYTES,
             file_layer=None):
        """Open (or create, unless readonly) the log at ``path``.

        durability: "full" (fsync before a commit's future resolves), "normal" (written to
        the OS before it resolves, fsync at most once a second), "none" (fsync at close or
        checkpoint only). ``file_layer(path, readonly=...)`` supplies the file (default: a
        real OS file; see fileio.MemoryFS and faults.FaultInjector)."""
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
        layer = file_layer or os_file_layer
        path = os.fspath(path)
        cache = AtomBytesCache(bytes_cache_size)
        try:
            probe = layer(path, readonly=True)
        except FileNotFoundError:
            if readonly:
                raise
            probe = None
        if probe is not None:
            try:
                salt = parse_header(probe.read(0, HEADER_SIZE), path)
            except BaseException:
                probe.close()
                raise
            if readonly:
                head = (find_last_commit(probe, probe.size(), salt, strict=True)
                        if salt is not None else None)
                return cls(path, probe, salt, head or EMPTY, durability=durability,
                           readonly=True, cache=cache, lock=None)
            probe.close()
        f = layer(path, readonly=False)
        lock = None
        try:
            lock = f.lock()
            head = _prepare_for_writing(f, path)
            salt = head.salt
        except BaseException:
            if lock is not None:
                lock.release()
            f.close()
            raise
        return cls(path, f, salt, head.footer, durability=durability, readonly=False,
                   cache=cache, lock=lock)

    # ---- reading -----------------------------------------------------------------

    @property
    def head(self):
        """(sequence, root_ptr) of the last durable commit; root_ptr is -1 when empty."""
        w = self._writer
        return w.head if w is not None else self._head

    @property
    def rollbacks(self):
        """How many times a failed write or fsync moved the head back (0 when read-only)."""
        w = self._writer
        return w.rollbacks if w is not None else 0

    # read_atom(ptr) (set per instance in __init__): the bytes of the atom at ``ptr``;
    # CorruptionError(offset=ptr) if they fail their checksum or ``ptr`` is not inside the
    # committed log. The cache and clean reads of real files are served in C (frame.pyx,
    # AtomReader); every other case comes here.

    def _read_from_file(self, ptr):
        if self._closed:
            raise DatabaseClosedError("the store is closed")
        if type(ptr) is not int:
            raise TypeError(f"an atom pointer is an int, not {type(ptr).__name__}")
        w = self._writer
        limit = w.written_end if w is not None else self._end
        if ptr >= limit and w is not None:
            data = w.lookup_unwritten(ptr)
            if data is not None:
                return data
            limit = w.written_end
        if ptr < HEADER_SIZE or ptr + ATOM_PREFIX_SIZE > limit:
            raise CorruptionError(f"pointer {ptr} is outside the committed log "
                                  f"[{HEADER_SIZE}, {limit})", offset=ptr, path=self.path)
        try:
            raw = self._file.read(ptr, min(_FIRST_READ, limit - ptr))
        except OSError as exc:
            raise StorageError(exc.errno, f"reading {self.path!r} at {ptr} failed: "
                               f"{exc.strerror}") from exc
        self._stats["reads"] += 1
        n, crc = _unpack_prefix(raw)
        end = ATOM_PREFIX_SIZE + n
        if ptr + end > limit:
            raise CorruptionError(f"atom at {ptr} runs past the end of the log (length {n})",
                                  offset=ptr, path=self.path)
        if end <= len(raw):
            data = raw[ATOM_PREFIX_SIZE:end]
        else:
            data = raw[ATOM_PREFIX_SIZE:] + self._file.read(ptr + len(raw), end - len(raw))
            self._stats["reads"] += 1
        if len(data) != n or _crc32(data, self._salt) != crc:
            raise CorruptionError(f"atom at offset {ptr} fails its checksum", offset=ptr,
                                  path=self.path)
        self._cache.put(ptr, data)
        return data

    # ---- writing -----------------------------------------------------------------

    def begin_commit(self):
        """Start a commit (takes the commit order; blocks while another is being built)."""
        if self._writer is None:
            if self._closed:
                raise DatabaseClosedError("the store is closed")
            raise ReadOnlyError(f"{self.path!r} is open read-only")
        return self._writer.begin()

    def abort_own_commit(self):
        """Abort the commit the calling thread is building, if any (also one begun by a
        begin_commit() whose result an interrupt kept from its caller); nothing if none."""
        if self._writer is not None:
            self._writer.abort_own()

    def checkpoint(self):
        """Write and fsync everything queued (any durability mode), closing the log with a
        sync mark so the next open reads a single footer."""
        if self._writer is None:
            raise ReadOnlyError(f"{self.path!r} is open read-only")
        self._writer.checkpoint()

    def refresh(self):
        """Read-only stores: pick up commits written since open (or the last refresh).
        Returns the new head."""
        if self._closed:
            raise DatabaseClosedError("the store is closed")
        if self._writer is not None:
            return self._writer.head
        if self._salt is None:
            salt = parse_header(self._file.read(0, HEADER_SIZE), self.path)
            if salt is None:
                return self._head
            self._salt = self._reader.salt = salt
        ft = find_last_commit(self._file, self._file.size(), self._salt, strict=True)
        if ft.end < self._end:
            # The writer cut back an unsynced tail (its fsync failed): forget those atoms.
            self._cache.discard_from(ft.end)
        self._head, self._end = (ft.seq, ft.root), ft.end
        r = self._reader
        if ft.synced < r.mapped:       # only a damaged log is ever cut below a synced point
            r.unmap()
        r.limit, r.durable = ft.end, ft.synced
        return self._head

    # ---- maintenance -------------------------------------------------------------

    def stats(self):
        w = self._writer
        out = dict(self._stats)
        out["avg_group"] = out["commits"] / out["groups"] if out["groups"] else 0.0
        out.update(self._cache.stats())
        seq, root = self.head
        try:
            size = self._file.size() if not self._closed else None
        except OSError:
            size = None
        out.update(path=self.path, file_size=size, sequence=seq, root=root,
                   durability=self.durability, readonly=self.readonly,
                   end=w.end if w is not None else self._end)
        return out

    def check(self):
        """Verify the header, every footer, every commit checksum and every atom checksum
        up to the head. Returns a CheckReport (``problems`` empty when all is well)."""
        if self._closed:
            raise DatabaseClosedError("the store is closed")
        f = self._file
        w = self._writer
        end = w.end if w is not None else self._end
        problems = []
        commits = atoms = atom_bytes = 0
        try:
            parse_header(f.read(0, HEADER_SIZE), self.path)
        except Exception as exc:   # NotADatabaseError / CorruptionError
            problems.append(Problem(0, str(exc)))
        salt = self._salt
        try:
            footers = walk_commits(f, end, salt) if salt is not None else []
        except CorruptionError as exc:
            problems.append(Problem(exc.offset, str(exc)))
            footers = []
        prev_seq = 0
        for ft in footers:
            commits += not ft.flags      # sync marks are not commits
            if ft.seq not in (prev_seq, prev_seq + 1) or (ft.seq == prev_seq and not ft.flags):
                problems.append(Problem(ft.end - FOOTER_SIZE,
                                        f"commit sequence {ft.seq} follows {prev_seq}"))
            prev_seq = ft.seq
            body = f.read(ft.start, ft.length - FOOTER_SIZE)
            if _crc32(body, salt) != ft.commit_crc:
                problems.append(Problem(ft.start, f"commit {ft.seq} fails its checksum"))
            pos = 0
            while pos < len(body):
                if pos + ATOM_PREFIX_SIZE > len(body):
                    problems.append(Problem(ft.start + pos, "truncated atom prefix"))
                    break
                n, crc = _unpack_prefix(body, pos)
                data = body[pos + ATOM_PREFIX_SIZE:pos + ATOM_PREFIX_SIZE + n]
                if len(data) != n:
                    problems.append(Problem(ft.start + pos, f"atom length {n} overruns its commit"))
                    break
                if _crc32(data, salt) != crc:
                    problems.append(Problem(ft.start + pos, "atom fails its checksum"))
                atoms += 1
                atom_bytes += n
                pos += ATOM_PREFIX_SIZE + n
        return CheckReport(problems, commits, atoms, atom_bytes, f.size(), end)

    def close(self):
        """Flush and fsync what is queued, append a sync mark, release the lock. Raises
        StorageError if that final write or fsync failed (the store is closed anyway)."""
        if self._closed:
            return
        self._closed = self._reader.closed = True
        self._reader.unmap()
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self._cache.clear()
            try:
                self._file.close()
            finally:
                if self._lock is not None:
                    self._lock.release()

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        mode = "readonly" if self.readonly else self.durability
        closed = " closed" if self._closed else ""
        return f"<LogStore {self.path!r} {mode} head={self.head}{closed}>"


class _Prepared:
    __slots__ = ("salt", "footer")

    def __init__(self, salt, footer):
        self.salt, self.footer = salt, footer


def _prepare_for_writing(f, path):
    """Under the write lock: create the header of a new database, or recover an existing
    one (cut a torn tail back to the last valid commit) and fsync, so that everything up
    to the head is known durable before new footers say so."""
    try:
        salt = parse_header(f.read(0, HEADER_SIZE), path)
        if salt is None:
            salt = struct.unpack("<I", os.urandom(4))[0]
            f.truncate(0)
            header = build_header(salt)
            done = 0
            while done < len(header):    # pwrite may write less than asked
                n = f.write(done, header[done:])
                if n <= 0:
                    raise OSError(28, "the database header could not be written")
                done += n
            f.sync()
            f.sync_directory()
            return _Prepared(salt, EMPTY)
        size = f.size()
        ft = find_last_commit(f, size, salt, strict=True)
        if ft.end < size:
            logger.warning("%s: the log ended in a torn or corrupt tail; dropped %d bytes "
                           "after the last valid commit (seq %d)", path, size - ft.end, ft.seq)
            f.truncate(ft.end)
        f.sync()
        return _Prepared(salt, ft)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(exc.errno or 5, f"preparing {path!r} for writing failed: {exc}") from exc
