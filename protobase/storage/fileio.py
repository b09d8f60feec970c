"""The small storage interface the log is written through, and its two implementations.

A storage file is six operations: ``read(offset, size)``, ``write(offset, data)`` (may
write fewer bytes than asked and says how many, like pwrite(2)), ``sync()``,
``truncate(size)``, ``size()``, ``close()``, plus ``lock()`` for the one-writer rule and
``sync_directory()`` after creating the file. A *file layer* is a callable
``layer(path, readonly=...)`` returning one; writers get a file created if missing.
Keeping the engine to this interface keeps it independent of where bytes live (the
in-memory file here, the fault-injecting wrapper in faults.py, an object store later).
"""
import os
import stat
import sys
import threading

from ..errors import DatabaseLockedError, NotADatabaseError
from .lock import FileLock

__all__ = ["OSFile", "MemoryFile", "MemoryFS", "os_file_layer"]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

_NOT_FILES = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISSOCK, "a socket")]


def _not_a_file(path, mode):
    what = next((name for test, name in _NOT_FILES if test(mode)), "not a regular file")
    return NotADatabaseError(f"{path!r} is {what}, not a database file: a ProtoBase database "
                             f"is a regular file; give the path of one, or a new path to "
                             f"create one (it was left untouched)")


def _open_regular(path, flags, mode=0o644):
    """os.open for a regular file only. O_NONBLOCK keeps the open of a FIFO from waiting
    for a writer; fstat on the descriptor (not a stat before it) judges the very file
    opened. A directory, FIFO or device is NotADatabaseError, never read or written."""
    try:
        fd = os.open(path, flags | _O_NONBLOCK | _O_CLOEXEC, mode)
    except IsADirectoryError:
        raise _not_a_file(path, stat.S_IFDIR) from None
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise _not_a_file(path, st_mode)
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd

try:
    import fcntl
    _F_FULLFSYNC = getattr(fcntl, "F_FULLFSYNC", None)
except ImportError:  # pragma: no cover - not a POSIX system
    _F_FULLFSYNC = None


def _sync_fd(fd):
    # macOS fsync() stops at the drive's volatile cache; F_FULLFSYNC flushes it.
    if _F_FULLFSYNC is not None:
        fcntl.fcntl(fd, _F_FULLFSYNC)
    elif sys.platform.startswith("linux"):
        os.fdatasync(fd)  # flushes the data and the size (needed to read it back)
    else:
        os.fsync(fd)


class OSFile:
    """A real file, read with os.pread (thread-safe: no shared file position) and written
    with os.pwrite at explicit offsets."""

    __slots__ = ("path", "readonly", "created", "_fd")

    def __init__(self, path, *, readonly=False):
        self.path = os.fspath(path)
        self.readonly = readonly
        self.created = False
        if readonly:
            self._fd = _open_regular(self.path, os.O_RDONLY)
            return
        try:
            self._fd = _open_regular(self.path, os.O_RDWR)
        except FileNotFoundError:
            self._fd = _open_regular(self.path, os.O_RDWR | os.O_CREAT)
            self.created = True

    def read(self, offset, size):
        return os.pread(self._fd, size, offset)

    def write(self, offset, data):
        return os.pwrite(self._fd, data, offset)

    def sync(self):
        _sync_fd(self._fd)

    def truncate(self, size):
        os.ftruncate(self._fd, size)

    def size(self):
        return os.fstat(self._fd).st_size

    def lock(self):
        return FileLock(self.path)

    def sync_directory(self):
        # A new file's directory entry is durable only once the directory is synced.
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self):
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def os_file_layer(path, *, readonly=False):
    """The default file layer: OSFile."""
    return OSFile(path, readonly=readonly)


class MemoryFile:
    """A storage file held in a bytearray (shared by every handle on the same name in one
    MemoryFS). ``sync`` does nothing: memory is as durable as it gets."""

    __slots__ = ("_fs", "_name", "_data", "readonly", "created")

    def __init__(self, fs, name, data, *, readonly, created):
        self._fs, self._name, self._data = fs, name, data
        self.readonly, self.created = readonly, created

    def read(self, offset, size):
        return bytes(self._data[offset:offset + size])

    def write(self, offset, data):
        d = self._data
        if offset > len(d):
            d.extend(bytes(offset - len(d)))
        d[offset:offset + len(data)] = data
        return len(data)

    def sync(self):
        pass

    def truncate(self, size):
        d = self._data
        if size < len(d):
            del d[size:]
        else:
            d.extend(bytes(size - len(d)))

    def size(self):
        return len(self._data)

    def lock(self):
        return self._fs._lock(self._name)

    def sync_directory(self):
        pass

    def close(self):
        pass


class _MemoryLock:
    __slots__ = ("_fs", "_name")

    def __init__(self, fs, name):
        self._fs, self._name = fs, name

    def abandon(self):
        # A forked child's copy of the file system is its own; the lock is the parent's.
        self._fs = None

    def release(self):
        if self._fs is not None:
            with self._fs._mutex:
                self._fs._locked.discard(self._name)
            self._fs = None


class MemoryFS:
    """A file layer whose files live in memory: ``LogStore.open("db", file_layer=MemoryFS())``.
    ``fs.files[name]`` is the bytearray behind each file."""

    def __init__(self):
        self.files = {}
        self._locked = set()
        self._mutex = threading.Lock()

    def __call__(self, path, *, readonly=False):
        name = os.fspath(path)
        with self._mutex:
            data = self.files.get(name)
            created = data is None
            if created:
                if readonly:
                    raise FileNotFoundError(2, "No such file", name)
                data = self.files[name] = bytearray()
        return MemoryFile(self, name, data, readonly=readonly, created=created)

    def _lock(self, name):
        with self._mutex:
            if name in self._locked:
                raise DatabaseLockedError(f"{name!r} is already open for writing")
            self._locked.add(name)
        return _MemoryLock(self, name)
