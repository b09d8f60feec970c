"""The one-writer rule: an exclusive, non-blocking OS lock on the database file.

flock(2) locks belong to an open file description, so the lock is taken on a descriptor
of its own: a second writer, in another process or in this one, fails at once instead of
waiting, and the kernel drops the lock when the holder dies (even by SIGKILL). Readers
take no lock at all: they never write, so they may run beside the writer.

A forked child shares the lock's open file description, and the lock lasts while any
descriptor of it is open: a child that kept its copy would hold the parent's lock after
the parent closed or died. So a child abandons the copy (``abandon``: closed, never
``LOCK_UN``, which would unlock the parent too).
"""
import fcntl
import os

from ..errors import DatabaseLockedError

__all__ = ["FileLock"]


class FileLock:
    """An exclusive lock on ``path`` held until release()."""

    __slots__ = ("path", "_fd")

    def __init__(self, path):
        self.path = path
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseLockedError(
                f"{path!r} is open for writing in another process (or elsewhere in this "
                f"one); open it with readonly=True, or close the other writer") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @property
    def held(self):
        return self._fd is not None

    def abandon(self):
        """In a forked child: close this process's descriptor only. The parent's
        descriptor keeps the lock for the parent; once the parent closes it, nobody holds it."""
        self.release()

    def release(self):
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor of the description drops the lock
