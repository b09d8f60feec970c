"""LogStore: the storage engine's face to the layer above (docs/internals.md "Storage").

Bytes and pointers only: ``read_atom(ptr)`` returns the bytes an earlier commit wrote at
``ptr``; a commit is a batch of new atoms plus a root pointer. What the bytes mean is the
layer above's business.

Opening is careful with files that are not ours: the header is read through a read-only
handle first, so a text file or an SQLite database raises NotADatabaseError and is left
byte-for-byte untouched; only then is the file opened for writing and locked.

Every file carries its database's identity (``database_id``, a UUID made when the file is
created). A new file gets a fresh one unless the caller names the identity it continues
(compaction and backup: the same database in a new file).

A file of an older format version (1: no identity, a 32-byte header) is read as it is by a
read-only open. A writable open never writes it: with ``upgrade=`` it rewrites the file in
this build's format (a fresh identity; the layer above copies the newest state across,
storage swaps the new file in atomically under the write lock), without it refuses.

A store belongs to the process that opened it. In a forked child every open store is
abandoned (`_abandon_inherited`, run by os.register_at_fork): its descriptors and mapping
are dropped without writing, syncing or unlocking anything, since the writer thread did not
survive the fork and the file, its lock and its unwritten commits are the parent's.
"""
import logging
import os
import struct
import uuid
import weakref
import zlib

from .._core import load as _load_core
from ..errors import (CorruptionError, DatabaseClosedError, InvalidArgumentError,
                      NotADatabaseError, ReadOnlyError, StorageError)
from .cache import AtomBytesCache
from .fileio import OSFile, os_file_layer
from .log import (EMPTY, ATOM_PREFIX, ATOM_PREFIX_SIZE, FOOTER_SIZE, FORMAT_VERSION, HEADER_SIZE,
                  build_header, find_last_commit, parse_header, walk_commits)
from .writer import Writer

__all__ = ["LogStore", "CheckReport", "Problem", "DURABILITY_MODES"]

logger = logging.getLogger("protobase")

DURABILITY_MODES = ("full", "normal", "none")
DEFAULT_CACHE_BYTES = 64 << 20
_FIRST_READ = 4096   # one pread usually brings the whole (small) atom with its prefix
_unpack_prefix = ATOM_PREFIX.unpack_from
_crc32 = zlib.crc32
AtomReader = _load_core("frame").AtomReader

_open_stores = weakref.WeakSet()   # every LogStore not closed yet, for _abandon_inherited
FORK_MESSAGE = ("it was opened in process {pid} before fork(), and a forked child abandons "
                "what it inherits (nothing written, nothing unlocked): open after fork, "
                "calling pb.open(path) in the child")


def _abandon_inherited():
    """os.register_at_fork(after_in_child=...): abandon every store the parent had open."""
    for store in list(_open_stores):
        store._abandon()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_abandon_inherited)


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

    def __init__(self, offset: "int | None", message: str) -> None:
        self.offset, self.message = offset, message

    def __repr__(self):
        return f"Problem(offset={self.offset}, message={self.message!r})"


class CheckReport:
    """What check() found. ``problems`` is empty when every atom and footer verified."""

    def __init__(self, problems: "list[Problem]", commits: int, atoms: int, atom_bytes: int,
                 file_size: "int | None", end: int) -> None:
        self.problems = problems
        self.commits = commits
        self.atoms = atoms
        self.atom_bytes = atom_bytes
        self.file_size = file_size
        self.end = end

    @property
    def ok(self) -> bool:
        return not self.problems

    def __repr__(self):
        return (f"CheckReport(ok={self.ok}, commits={self.commits}, atoms={self.atoms}, "
                f"problems={self.problems[:5]!r}{'...' if len(self.problems) > 5 else ''})")


class LogStore:
    """An append-only log of atoms and commits in one file. Use LogStore.open()."""

    def __init__(self, path, file, header, head_footer, *, durability, readonly, cache, lock):
        self.path = path
        self.durability = durability
        self.readonly = readonly
        self._file = file
        self._header = header        # log.Header; None while a read-only file has none yet
        salt = header.salt if header is not None else None
        self._salt = salt
        self._base = header.size if header is not None else HEADER_SIZE
        self._cache = cache
        self._lock = lock
        self._closed = False
        self._opened_by = os.getpid()
        self._abandoned = False
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
                                  self._end, head_footer.synced, self._base)
        self.read_atom = self._reader.read
        _open_stores.add(self)

    @classmethod
    def open(cls, path, durability="full", readonly=False, bytes_cache_size=DEFAULT_CACHE_BYTES,
             file_layer=None, database_id=None, upgrade=None):
        """Open (or create, unless readonly) the log at ``path``.

        durability: "full" (fsync before a commit's future resolves), "normal" (written to
        the OS before it resolves, fsync at most once a second), "none" (fsync at close or
        checkpoint only). ``file_layer(path, readonly=...)`` supplies the file (default: a
        real OS file; see fileio.MemoryFS and faults.FaultInjector).

        database_id: the identity (uuid.UUID) a new file gets (default: a fresh random
        one); an existing file must already carry it (InvalidArgumentError otherwise).
        upgrade: for a writable open of a file of an older format version,
        ``upgrade(old, new)`` copies the newest state of the store ``old`` (read-only, of
        the old format) into ``new`` (a new, empty file of this build's format, with a
        fresh identity) as one commit; the new file then replaces the old one atomically
        and is returned. Without it such an open raises NotADatabaseError."""
        if database_id is not None and not isinstance(database_id, uuid.UUID):
            raise TypeError(f"database_id must be a uuid.UUID, not {type(database_id).__name__}")
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
                header = parse_header(probe.read(0, HEADER_SIZE), path)
                _check_identity(header, database_id, path)
                if readonly:
                    head = (find_last_commit(probe, probe.size(), header.salt, strict=True,
                                             base=header.size)
                            if header is not None else None)
            except BaseException:
                probe.close()
                raise
            if readonly:
                return cls(path, probe, header, head or EMPTY, durability=durability,
                           readonly=True, cache=cache, lock=None)
            probe.close()
        f = layer(path, readonly=False)
        lock = None
        try:
            lock = f.lock()
            try:
                raw = f.read(0, HEADER_SIZE)
            except OSError as exc:
                if isinstance(exc, StorageError):
                    raise
                raise StorageError(exc.errno or 5, f"reading the header of {path!r} failed: "
                                   f"{exc}") from exc
            header = parse_header(raw, path)
            _check_identity(header, database_id, path)
            if header is not None and header.version != FORMAT_VERSION:
                head = find_last_commit(f, f.size(), header.salt, strict=True, base=header.size)
                old = cls(path, f, header, head, durability=durability, readonly=True,
                          cache=cache, lock=lock)
        except BaseException:
            if lock is not None:
                lock.release()
            f.close()
            raise
        if header is not None and header.version != FORMAT_VERSION:
            return _upgraded(old, upgrade, layer, durability, bytes_cache_size)
        try:
            head = _prepare_for_writing(f, path, header, database_id)
        except BaseException:
            lock.release()
            f.close()
            raise
        return cls(path, f, head.header, head.footer, durability=durability, readonly=False,
                   cache=cache, lock=lock)

    # ---- reading -----------------------------------------------------------------

    @property
    def database_id(self):
        """The database's identity (uuid.UUID) from the file header: made when the database
        was created, kept by compaction and backup. None for a file of format version 1 (or
        a read-only store of a file that has no header yet)."""
        return self._header.database_id if self._header is not None else None

    @property
    def format_version(self):
        """The file's format version (None while a read-only file has no header yet)."""
        return self._header.version if self._header is not None else None

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
            self._check_open()
        if type(ptr) is not int:
            raise TypeError(f"an atom pointer is an int, not {type(ptr).__name__}")
        w = self._writer
        limit = w.written_end if w is not None else self._end
        if ptr >= limit and w is not None:
            data = w.lookup_unwritten(ptr)
            if data is not None:
                return data
            limit = w.written_end
        if ptr < self._base or ptr + ATOM_PREFIX_SIZE > limit:
            raise CorruptionError(f"pointer {ptr} is outside the committed log "
                                  f"[{self._base}, {limit})", offset=ptr, path=self.path)
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
            self._check_open()
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
        self._check_open()
        if self._writer is not None:
            return self._writer.head
        if self._salt is None:
            header = parse_header(self._file.read(0, HEADER_SIZE), self.path)
            if header is None:
                return self._head
            self._header, self._base = header, header.size
            self._reader.start = header.size
            self._salt = self._reader.salt = header.salt
        ft = find_last_commit(self._file, self._file.size(), self._salt, strict=True,
                              base=self._base)
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
        ident = self.database_id
        out.update(path=self.path, file_size=size, sequence=seq, root=root,
                   database_id=str(ident) if ident is not None else None,
                   format_version=self.format_version,
                   durability=self.durability, readonly=self.readonly,
                   end=w.end if w is not None else self._end)
        return out

    def check(self):
        """Verify the header, every footer, every commit checksum and every atom checksum
        up to the head. Returns a CheckReport (``problems`` empty when all is well)."""
        if self._closed:
            self._check_open()
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
            footers = walk_commits(f, end, salt, self._base) if salt is not None else []
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

    def _check_open(self):
        if self._abandoned:
            raise DatabaseClosedError(f"{self.path!r} cannot be used in this process: "
                                      + FORK_MESSAGE.format(pid=self._opened_by))
        if self._closed:
            raise DatabaseClosedError("the store is closed")

    def _abandon(self):
        """In a forked child: drop this store without touching the file (see the module
        docstring). Closing the child's descriptors does not unlock or affect the parent's."""
        if self._closed:
            return
        self._closed = self._reader.closed = True
        self._abandoned = True
        self._writer = None            # its thread exists only in the parent
        _open_stores.discard(self)
        self._reader.unmap()
        try:
            self._file.close()
        finally:
            abandon = getattr(self._lock, "abandon", None)
            if abandon is not None:
                abandon()
            self._lock = None

    def close(self):
        """Flush and fsync what is queued, append a sync mark, release the lock. Raises
        StorageError if that final write or fsync failed (the store is closed anyway)."""
        if self._closed:
            return
        _open_stores.discard(self)
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
        closed = " abandoned after fork" if self._abandoned else " closed" if self._closed else ""
        return f"<LogStore {self.path!r} {mode} head={self.head}{closed}>"


class _Prepared:
    __slots__ = ("header", "footer")

    def __init__(self, header, footer):
        self.header, self.footer = header, footer


def _check_identity(header, database_id, path):
    """An existing file opened to continue a given database must be that database."""
    if database_id is not None and header is not None and header.database_id != database_id:
        raise InvalidArgumentError(
            f"{path!r} belongs to database {header.database_id}, not {database_id}: "
            f"remove it or choose another path")


def _upgraded(old, upgrade, layer, durability, bytes_cache_size):
    """Rewrite the older-format store ``old`` (read-only view, holding the write lock) as
    a file of this build's format: written beside it, fsynced, renamed over it while
    still locked (the new file is locked before the rename), so every moment leaves one
    valid database at the path and no other writer in between. Returns the new store."""
    path = old.path
    version = old.format_version
    if upgrade is None:
        old.close()
        raise NotADatabaseError(
            f"{path!r} uses ProtoBase file format version {version}; this build writes "
            f"version {FORMAT_VERSION}: open it with protobase.open() to upgrade it in place, "
            f"or read-only")
    tmp = path + ".upgrade"
    new = None
    try:
        if os.path.exists(tmp):
            os.remove(tmp)              # an upgrade interrupted before its rename
        new = LogStore.open(tmp, durability=durability, bytes_cache_size=bytes_cache_size,
                            file_layer=layer)
        upgrade(old, new)
        new.checkpoint()
        os.replace(tmp, path)
        new.path = path
    except BaseException:
        if new is not None:
            new.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        old.close()
        raise
    old.close()                         # unlocks the old, now unlinked, file
    try:
        new._file.sync_directory()
    except OSError as exc:
        new.close()
        raise StorageError(exc.errno or 5, f"upgrading {path!r}: syncing the directory after "
                           f"the rename failed: {exc}") from exc
    logger.warning("%s: upgraded from ProtoBase file format %d to %d (database identity %s)",
                   path, version, FORMAT_VERSION, new.database_id)
    return new


def _prepare_for_writing(f, path, header, database_id=None):
    """Under the write lock: create the header of a new database (identity
    ``database_id``, else a fresh one) when ``header`` (the file's, read under the lock)
    is None, or recover an existing one of this build's format (cut a torn tail back to
    the last valid commit) and fsync, so that everything up to the head is known durable
    before new footers say so."""
    try:
        if header is None:
            salt = struct.unpack("<I", os.urandom(4))[0]
            ident = database_id if database_id is not None else uuid.uuid4()
            f.truncate(0)
            raw = build_header(salt, ident)
            done = 0
            while done < len(raw):       # pwrite may write less than asked
                n = f.write(done, raw[done:])
                if n <= 0:
                    raise OSError(28, "the database header could not be written")
                done += n
            f.sync()
            f.sync_directory()
            return _Prepared(parse_header(raw, path), EMPTY)
        size = f.size()
        ft = find_last_commit(f, size, header.salt, strict=True)
        if ft.end < size:
            logger.warning("%s: the log ended in a torn or corrupt tail; dropped %d bytes "
                           "after the last valid commit (seq %d)", path, size - ft.end, ft.seq)
            f.truncate(ft.end)
        f.sync()
        return _Prepared(header, ft)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(exc.errno or 5, f"preparing {path!r} for writing failed: {exc}") from exc
