"""The background writer: group commit, durability futures, and failure recovery.

Callers build a commit on their own thread (``begin_commit`` -> ``write_atom``... ->
``finish``) and get a CommitFuture (a light stand-in for concurrent.futures.Future); one
writer thread owns every write to the file::

    caller threads                       writer thread
    --------------                       -------------
    begin  (takes the commit lock)
    write_atom -> ptr (AtomBatch, C)
    finish -> frame, cache, queue,   --> take the whole queue (a "group")
              release
    future.result() ...                  join its bytes + one footer per commit
                                         one pwrite, one fsync (full mode)
                               <-------- resolve every future of the group

Pointers are handed out before anything is written, so the commit lock makes commits
contiguous and ordered: a commit's atoms start where the previous queued commit ends.
While the writer is busy with one group's fsync, the next commits pile up in the queue
and share the next write and fsync: that is the whole of group commit.

Who writes: in "full" mode finish() only queues, so that it returns at once and the
layer above can build the next commit during the fsync (it calls finish() under its own
commit lock); then, outside that lock, the committer's ``future.result()`` writes and
fsyncs the queue itself if no write is in progress, and the background thread writes
whatever nobody waiting took (commits queued during someone's fsync, callers that do not
wait). In "normal" and "none" modes a write to the OS costs a few microseconds, less
than the two thread switches of a hand-off, so the committing thread writes its group
itself inside finish() when no write is in progress. Either way the ``_writing`` flag
names the one thread writing (a caller's flag is its batch), commits that arrive
meanwhile queue up and form the next group. The background thread also does the
once-a-second fsync of "normal" mode, checkpoints and close.

Interrupts: an exception raised into a thread by a signal handler (KeyboardInterrupt,
SystemExit from a SIGTERM handler) interrupts the caller, never the write. CPython runs
those handlers on the main thread at call boundaries, so one can land between any two
calls here. Three rules keep that harmless: the commit lock is an RLock, so the paths
that may leave after acquiring it (begin, finish) can tell whether this thread holds it
and release it; a commit marked ``queued`` (set next to the append, with no call between)
belongs to the writer, and whatever happens to its caller it is written (or fails with
its group on an I/O error), never dropped; a group whose writer was interrupted before
its bookkeeping went back to the front of the queue with its bodies intact and is written
again, at the same offsets, by the background thread (rewriting bytes already accepted
writes the same bytes). Nothing is cut back: only an I/O error does that. Waiters block
on locks they cannot leave held (a C-level ``with`` for untimed waits, a private lock per
timed waiter), so an interrupted waiter never blocks another.

On a failed write or fsync the writer fails the group and everything queued after it
(their pointers assumed the failed bytes), bumps the epoch so a commit being built right
now fails at finish too, rolls the state back to the last *fsynced* commit, and cuts the
file back to it. It never trusts that a failed fsync's data reached the disk. If the cut
itself fails, the next group retries it before writing anything.
"""
import logging
import threading
import time
import zlib
from concurrent.futures import TimeoutError as FutureTimeoutError

from .._core import load as _load_core
from ..errors import (CorruptionError, DatabaseClosedError, StorageError,
                      TransactionClosedError)
from .log import (FLAG_SYNC_MARK, FOOTER_SIZE, HEADER_SIZE,
                  find_last_commit, make_footer, pack_footer)

__all__ = ["Writer", "Commit", "CommitFuture", "NORMAL_SYNC_INTERVAL", "complete"]

_frame = _load_core("frame")
AtomBatch = _frame.AtomBatch
complete = _frame.complete     # fn(*args) finished through interrupts (frame.pyx's essay)

logger = logging.getLogger("protobase")

NORMAL_SYNC_INTERVAL = 1.0   # seconds between background fsyncs in "normal" mode
_ZERO_FOOTER = bytes(FOOTER_SIZE)
_BIG = 1 << 16       # above this a commit is written as body + footer, not concatenated
_crc32 = zlib.crc32
_allocate_lock = threading.Lock
_callbacks_lock = threading.Lock()   # add_done_callback against settling: rare, brief


class CommitFuture:
    """A commit's durability signal: the part of ``concurrent.futures.Future`` that
    callers use (``result``, ``exception``, ``done``, ``add_done_callback``...).

    Why not a Future: a Future builds a Condition on an RLock, and every result(),
    done() and set_result() goes through it: several microseconds per small commit.
    Here a waiter blocks on one plain lock (the gate), made by the first waiter that
    finds the future unsettled and released when it settles, so a waiter blocks in C
    and passes it on at once; a commit that its own thread wrote (normal/none modes)
    is settled before finish() returns, nobody waits and no gate is ever made.
    In "full" mode ``result()`` first offers to write the queue on the calling thread
    (Writer._help): one thread instead of a hand-off to the writer thread and back.
    Instances take attributes like a Future (callers may tag them)."""

    def __init__(self):
        self._done = False
        self._value = None
        self._error = None
        self._callbacks = None
        self._writer = None      # full mode: the writer this commit's waiter may write for
        self._gate = None        # made (held) by the first untimed waiter; released on settling
        self._timed = None       # one private held lock per timed waiter

    def _settle(self, value, error):
        # The writer settles each future exactly once: value first, then _done (under
        # the callbacks lock, so no callback or gate is added after it is set), then the
        # gates, released under that lock too: an interrupt after any of these calls
        # leaves no gate held. Whoever sees _done, or gets through a gate, sees the value.
        if self._done:
            return
        self._value = value
        self._error = error
        with _callbacks_lock:
            self._done = True
            callbacks, self._callbacks = self._callbacks, None
            gate = self._gate
            if gate is not None:
                gate.release()
            timed = self._timed
            while timed:
                timed.pop().release()
        if callbacks:
            for fn in callbacks:
                try:
                    fn(self)
                except Exception:
                    logger.exception("a commit future's done callback raised")

    def set_result(self, value):
        self._settle(value, None)

    def set_exception(self, error):
        self._settle(None, error)

    def _wait(self, timeout):
        if self._done:
            return
        w = self._writer
        if w is not None:
            w._nudge()
        with _callbacks_lock:
            if self._done:
                return
            if timeout is None:
                gate = self._gate
                if gate is None:
                    gate = self._gate = _allocate_lock()
                    gate.acquire()          # held until _settle releases it
            else:
                # A private lock: a waiter that times out, or is interrupted, holds
                # nothing anyone else waits on.
                gate = _allocate_lock()
                gate.acquire()
                if self._timed is None:
                    self._timed = []
                self._timed.append(gate)
        if timeout is None:
            with gate:                  # acquire and pass on in C: no signal point between
                pass
        elif not gate.acquire(True, max(timeout, 0)):
            raise FutureTimeoutError()

    def result(self, timeout=None):
        """(seq, root_ptr) once the commit is as durable as the mode promises; raises
        the commit's error (StorageError, DatabaseClosedError) if it failed."""
        if not self._done:
            w = self._writer
            if w is not None and timeout is None:   # an fsync may outlast any timeout
                w._help()
            self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout=None):
        if not self._done:
            self._wait(timeout)
        return self._error

    def done(self):
        return self._done

    def cancelled(self):
        return False

    def cancel(self):
        return False      # a queued commit cannot be taken back: its pointers are in use

    def add_done_callback(self, fn):
        """Call fn(future) once settled (at once if it already is); on the thread that
        settles it otherwise."""
        with _callbacks_lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                w = self._writer
            else:
                w = False
        if w is False:
            fn(self)
        elif w is not None:
            w._nudge()          # nobody may wait for it: the writer thread must write it

    def __repr__(self):
        if not self._done:
            return "<CommitFuture pending>"
        if self._error is not None:
            return f"<CommitFuture failed: {self._error!r}>"
        return f"<CommitFuture done: {self._value!r}>"


class Commit:
    """One commit being built. Holds the store's commit lock from begin to finish/abort.

    Its atoms live in a ``_core.frame.AtomBatch``: ``write_atom`` is that batch's C-level
    append (the kernels call it once per node, with no Python frame in between), and
    finish frames the whole commit in one pass and inserts its atoms in the cache at once.
    """

    __slots__ = ("_w", "_atoms", "write_atom", "_body", "_start", "_epoch", "seq", "root",
                 "future", "carries", "queued")

    def __init__(self, writer, start, seq, epoch):
        self._w = writer
        self._atoms = AtomBatch(start)
        # write_atom(data) -> ptr: append one atom; the pointer is usable right away (reads
        # are served from this commit until it reaches the cache and the file).
        self.write_atom = self._atoms.append
        self._body = None
        self._start = start
        self._epoch = epoch
        self.seq = seq
        self.root = -1
        self.future = None
        self.carries = 1
        # Handed to the writer: from then on it is written (or fails with its group on an
        # I/O error) whatever happens to the thread that finished it.
        self.queued = False

    @property
    def _pos(self):
        return self._atoms.pos

    def write_atoms(self, datas):
        """Append many atoms at once; returns their pointers (same as calling
        write_atom on each)."""
        return self._atoms.extend(datas)

    def finish(self, root_ptr, carries=1):
        """Queue the commit with ``root_ptr`` as its root; returns a CommitFuture whose
        result is (seq, root_ptr) once the commit is as durable as the store's mode
        promises. ``carries``: how many commits of the layer above this one holds (the
        database writes the transactions that commit together as one): the "commits"
        and group statistics count those."""
        atoms = self._atoms
        if atoms.closed:
            raise TransactionClosedError("this commit was already finished or aborted")
        if root_ptr != -1 and not HEADER_SIZE <= root_ptr < atoms.pos:
            self.abort()
            raise ValueError(f"root pointer {root_ptr} is not an atom written so far")
        self.root = root_ptr
        self.carries = carries
        w = self._w
        try:
            self._body = atoms.frame(w.salt)
            w.cache.put_many(atoms.ptrs, atoms.datas, atoms.payload)
        except BaseException:
            self.abort()
            raise
        fut = self.future = CommitFuture()     # before close: a closed batch without a
        if w._full:                            # future is an aborted one (see
            fut._writer = w                    # lookup_unwritten)
        atoms.close()
        try:
            batch = w._enqueue(self)
            if batch is not None:
                # "normal"/"none": this thread writes its group itself (see _enqueue);
                # the future is settled before we return (unless an interrupt lands in
                # the write: then the background thread writes it).
                w._write_here(batch)
        except BaseException:
            # Interrupted: release what this thread still holds; a commit already
            # queued goes on (see the essay, "Interrupts").
            w._enqueue_interrupted(self)
            raise
        return fut

    def abort(self):
        """Drop this commit: nothing of it reaches the file."""
        if self._atoms.closed:
            return
        self._atoms.close()
        self._w._release(self, queued=False)

    def _find(self, ptr):
        # Rare path: a read of an atom of this commit before it is queued (the batch
        # stays readable through finish, so a concurrent finish is safe).
        data = self._atoms.find(ptr)
        if data is None:
            raise CorruptionError(f"pointer {ptr} is not an atom of the commit being built",
                                  offset=ptr)
        return data


class Writer:
    """Owns the file's writable end: the commit queue and the background thread."""

    def __init__(self, file, salt, durability, cache, head_footer, stats):
        self.file = file
        self.salt = salt
        self.durability = durability
        self.cache = cache
        self.stats = stats
        # Held through the plain lock (a C-level `with`); the condition only waits/notifies.
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        # An RLock only so that an interrupted begin/finish can ask whether this thread
        # holds it (_is_owned); begin refuses to take it twice.
        self._commit_lock = threading.RLock()
        self._queue = []
        self._chained = None         # the group a chaining writer took next (_write_group)
        self._epoch = 0
        self._closing = False
        self._closed = False
        self._checkpoints = []
        self._building = None
        end = head_footer.end
        head = (head_footer.seq, head_footer.root)
        # "tail"/"next_seq": after every queued commit; "written": bytes in the file;
        # "synced": bytes known to be on disk. head/end: the last commit acknowledged.
        self._tail = self._written_end = self._synced_end = self.end = end
        self._next_seq = head[0]
        self.head = self._synced_head = head
        self._marked = bool(head_footer.flags & FLAG_SYNC_MARK) or end == HEADER_SIZE
        self._damaged = False
        self._damage_cause = None
        # Times the head was moved back (a failed write or fsync): the layer above
        # compares it to drop any state built on commits that are gone.
        self.rollbacks = 0
        self._full = durability == "full"
        self._caller_writes = not self._full
        self._writing = False        # a thread (caller or background) is writing the file
        self._timing = False         # the background thread waits for the next normal fsync
        # Only "normal" mode has work after a write (arming the fsync timer); in "none"
        # mode a notify per commit would only cost a useless thread switch.
        self._wake_after_write = durability == "normal"
        self._readers_waiting = 0
        self._close_error = None
        self._last_sync = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="protobase-writer", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------

    def begin(self):
        lock = self._commit_lock
        if lock._is_owned():
            raise TransactionClosedError("this thread is already building a commit of this "
                                         "store; finish or abort it before beginning another")
        try:
            lock.acquire()
            if self._closing:
                raise DatabaseClosedError("the store is closed")
            # No condition lock needed: under the commit lock only _fail changes tail/seq,
            # and it bumps the epoch last, so a stale (tail, seq) always comes with a stale
            # epoch and finish() refuses it.
            epoch = self._epoch
            c = Commit(self, self._tail, self._next_seq + 1, epoch)
            self._building = c
        except BaseException:
            # Also an interrupt right after acquire() returned: never leave it held.
            if lock._is_owned():
                self._building = None
                lock.release()
            raise
        return c

    def abort_own(self):
        """Abort the commit this thread is building, if any, and release the commit lock
        if this thread still holds it: for a caller interrupted right after begin()
        returned, before it could keep the commit (an interrupt lands between a call's
        return and the assignment of its result)."""
        lock = self._commit_lock
        if not lock._is_owned():
            return
        b = self._building
        if b is not None and not b._atoms.closed:
            b.abort()
        elif b is not None and not b.queued:
            self._release(b, queued=False)   # closed in finish, never queued
        if lock._is_owned():
            self._building = None
            lock.release()

    def _enqueue(self, c):
        """Queue a finished commit and release the commit lock. Returns the group to
        write when the calling thread should write it itself, else None: in "normal" and
        "none" modes a write to the OS is cheap, so the committing thread does it instead
        of paying two thread switches; commits that arrive meanwhile queue up for the
        background thread (still one write per group)."""
        lead = None
        with self._mutex:
            ok = c._epoch == self._epoch and not self._closing
            if ok:
                self._tail = c._atoms.pos + FOOTER_SIZE
                self._next_seq = c.seq
                c.queued = True              # no call between this and the append
                self._queue.append(c)
                if not self._writing:
                    if self._caller_writes:
                        lead, self._queue = self._queue, []
                        self._writing = lead      # the owner: see _write_here
                    # else (full mode) the committer writes it itself when it waits
                    # (CommitFuture.result -> _help), or wakes the writer thread when
                    # it cannot (_nudge): no thread switch when nobody else writes.
        if not ok:
            c.future.set_exception(self._not_written_error(c))
            self._release(c, queued=False)
            return None
        if self._building is c:
            self._building = None
        self._commit_lock.release()
        return lead

    def _enqueue_interrupted(self, c):
        """An exception was raised into finish() while it handed ``c`` over (_enqueue):
        release the commit lock if this thread still holds it; a commit that was queued
        stays queued, and a group this thread took to write ("normal"/"none") goes back to
        the queue for the background thread. A commit that was not queued is aborted."""
        lock = self._commit_lock
        with self._mutex:
            w = self._writing
            if type(w) is list and w and w[-1] is c and self._caller_writes:
                # Our lead, not started: in these modes nobody chains, so a group ending
                # with our commit is the one our _enqueue took.
                self._queue[:0] = w
                self._release_writing()
        if not c.queued and not c.future._done:
            c.future._settle(None, self._not_written_error(c))
        if lock._is_owned():
            if not c.queued:
                self._release(c, queued=False)
            else:
                if self._building is c:
                    self._building = None
                lock.release()

    def _help(self):
        """Full mode, from a committer about to wait: if no write is in progress, write
        and fsync the queued group on this thread. The commits queued meanwhile form the
        next group (written by the next waiter that finds the file free, or by the
        writer thread), so group commit is unchanged; what goes is the hand-off to the
        writer thread and back, two thread switches per group."""
        batch = None
        try:
            with self._mutex:
                if self._writing or not self._queue or self._closing:
                    return
                batch, self._queue = self._queue, []
                self._writing = batch
            self._write_here(batch, chain=True)
        except BaseException:
            if batch is not None:          # also an interrupt between taking it and writing
                self._interrupted(batch)
            raise

    def _nudge(self):
        """Full mode: someone waits for (or reads) a queued commit without writing it
        itself; make sure a writer is on the queue."""
        with self._mutex:
            if not self._writing and self._queue:
                self._cond.notify_all()

    def _write_here(self, batch, chain=False):
        """Write a group on the calling thread, which owns the _writing flag (set to the
        batch itself), and settle its futures. ``chain`` (full mode): if commits queued
        during this group's fsync, write them too, as one more group, before returning
        (see _write_group). An exception raised into this thread part way
        (KeyboardInterrupt, SystemExit) interrupts this thread, not the write: see
        _interrupted."""
        while True:
            try:
                ok = self._write_group(batch, chain)
                if ok:
                    self._settle_written(batch)
                else:
                    self._done_writing()
            except BaseException:
                self._interrupted(batch)
                raise
            if not ok or ok is True:
                return
            batch, chain = ok, False

    def _interrupted(self, batch):
        """Called on the thread writing ``batch`` when an exception (a signal) was raised
        into it. A group whose bookkeeping was done (head moved to its last commit) was
        written: settle it. A group that failed (every future settled) needs nothing but
        the flag. Otherwise its bytes may or may not be in the file, in part or whole:
        it goes back to the front of the queue, bodies intact, and the background thread
        writes it again at the same offsets (the same bytes) and settles it. Nothing is
        cut back and no commit fails: the caller was interrupted, not the write. A group a
        chaining writer took next (full mode) is handed back the same way."""
        last = batch[-1]
        with self._mutex:
            w = self._writing
            chained = self._chained
            if chained is not None and w is chained and w is not batch:
                self._chained = None
                self._queue[:0] = w          # taken, not started: write it later
                self._release_writing()
                w = False
            written = self.head == (last.seq, last.root) and self._written_end >= last._pos
            if w is batch:
                if not written and not all(c.future._done for c in batch):
                    self._queue[:0] = batch
                    self._release_writing()
                    return
                self._release_writing()
        if written:      # else: failed (settled), or handed back already, or not ours
            self._settle_written(batch)

    @staticmethod
    def _settle_written(batch):
        for c in batch:
            fut = c.future
            if not fut._done:
                fut._settle((c.seq, c.root), None)

    def _done_writing(self):
        with self._mutex:
            self._release_writing()

    def _release_writing(self):
        # Under the condition lock. Wake the background thread only if it has work or
        # is not already waiting with a timeout for the next fsync.
        self._writing = False
        if (self._queue or self._closing or self._checkpoints or self._readers_waiting
                or (self._wake_after_write and not self._timing)):
            self._cond.notify_all()

    def _not_written_error(self, c):
        if self._closing:
            return DatabaseClosedError("the store was closed before this commit was queued")
        return StorageError(
            f"commit {c.seq} was not written: an earlier write or fsync failed while it "
            f"was being built; the database is at its last durable commit, retry")

    def _release(self, c, *, queued):
        if not queued and (c._body is not None or c.future is not None):
            # Only finish puts a commit's atoms into the cache (after framing the body):
            # drop exactly those.
            self.cache.discard(c._atoms.ptrs)
        if self._building is c:
            self._building = None
        self._commit_lock.release()

    def lookup_unwritten(self, ptr):
        """For a pointer at or past the written end: the atom's bytes when it belongs to
        the commit being built, None once it is in the file; waits while it is queued."""
        with self._mutex:
            while True:
                if ptr < self._written_end:
                    return None
                b = self._building
                # An aborted commit's atoms are gone; a finishing one's stay readable
                # until it is queued (then ptr < _tail and we wait for the write).
                if (b is not None and ptr >= b._start
                        and (b.future is not None or not b._atoms.closed)):
                    return b._find(ptr)
                if ptr >= self._tail or self._closed:
                    raise CorruptionError(
                        f"pointer {ptr} is past the end of the log ({self._tail}); was it "
                        f"written by a commit that failed?", offset=ptr)
                if not self._writing and self._queue:
                    self._cond.notify_all()      # queued in full mode: nobody writing yet
                self._readers_waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._readers_waiting -= 1

    @property
    def written_end(self):
        return self._written_end

    def checkpoint(self):
        """Block until every queued commit is written and fsynced and a sync mark closes
        the log (the next open reads one footer)."""
        with self._commit_lock:
            fut = CommitFuture()
            with self._mutex:
                if self._closing:
                    raise DatabaseClosedError("the store is closed")
                self._checkpoints.append(fut)
                self._cond.notify_all()
            fut.result()

    def close(self):
        """Write what is queued, fsync, write a sync mark, stop the thread. Raises
        StorageError if that final write or fsync failed."""
        with self._mutex:
            if self._closing:
                return
            self._closing = True
            self._epoch += 1   # a commit being built now fails at finish
            self._cond.notify_all()
        self._thread.join()
        if self._close_error is not None:
            raise self._close_error

    # ---- writer thread -----------------------------------------------------------

    def _run(self):
        cond, mutex = self._cond, self._mutex
        normal = self.durability == "normal"
        while True:
            with mutex:
                while True:
                    # _timing: this thread will wake by itself for the next fsync, so
                    # writers need not notify it (a notify per commit would cost a
                    # thread switch per commit). It keeps timing even while a caller
                    # writes: the queue, close and checkpoints still notify it.
                    writing = self._writing
                    if not writing:
                        if self._queue:
                            batch, self._queue = self._queue, []
                            break
                        batch = None
                        if self._closing or self._checkpoints:
                            break
                    if normal and self._written_end > self._synced_end:
                        wait = self._last_sync + NORMAL_SYNC_INTERVAL - time.monotonic()
                        if wait > 0:
                            self._timing = True
                            cond.wait(wait)
                            continue
                        if not writing:
                            break
                    self._timing = False
                    cond.wait()
                self._timing = False
                self._writing = True
                checkpoints, closing = self._checkpoints, self._closing
                if batch is None:
                    self._checkpoints = []
            released = False
            try:
                if batch is not None:
                    released = self._write_group(batch)
                    if released:
                        self._settle_written(batch)
                    continue
                if not (closing or checkpoints):
                    self._sync()
                    continue
                err = self._sync_and_mark()
                for fut in checkpoints:
                    if err is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(err)
                if closing:
                    with mutex:
                        self._closed = True
                    self._close_error = err
                    return
            finally:
                if not released:
                    self._done_writing()

    def _write_group(self, batch, chain=False):
        """Write one group (the caller holds the _writing flag). Returns True on success,
        having released the flag but not yet settled the futures (the caller does:
        _settle_written), so a woken committer finds the file free and writes its next
        commit itself rather than queueing behind this thread. On failure the group's
        futures have failed (_fail) and the caller still holds the flag.

        ``chain``: on success, if commits queued meanwhile, keep the flag and return
        them (the next group, now the caller's to write). In full mode, with several
        committers, commits always queue during an fsync; handing them to the writer
        thread costs a wake-up and a wait for the GIL, which the thread that just
        finished an fsync already holds. One extra group at most (the caller stops
        chaining after it), so no committer is kept writing for others for long."""
        if self._damaged and not self._repair():
            self._fail(batch, self._damage_cause)
            return False
        if batch[0]._start != self._written_end:
            # The repair had to cut below the point these commits were built on.
            self._fail(batch, OSError(5, "the log was cut back below these commits"))
            return False
        salt = self.salt
        synced = self._synced_end
        if len(batch) == 1:
            # The common case, kept short: one join, two checksums, one footer.
            c = batch[0]
            body = c._body     # kept until written: an interrupted group is written again
            footer = make_footer(salt, c.seq, c.root, len(body) + FOOTER_SIZE, synced, 0,
                                 _crc32(body, salt))
            bufs = (body + footer,) if len(body) < _BIG else (body, footer)
        else:
            parts = []
            for c in batch:
                parts.append(c._body)
                parts.append(_ZERO_FOOTER)
            buf = bytearray().join(parts)
            with memoryview(buf) as mv:
                pos = 0
                for c in batch:
                    n = c._pos - c._start
                    pack_footer(buf, pos + n, salt, c.seq, c.root, n + FOOTER_SIZE, synced,
                                0, _crc32(mv[pos:pos + n], salt))
                    pos += n + FOOTER_SIZE
            bufs = (buf,)
        off = batch[0]._start
        full = self._full
        try:
            at = off
            write = self.file.write
            for b in bufs:
                n = write(at, b)
                self.stats["writes"] += 1
                if n != len(b):
                    self._write_rest(at, b, n)
                at += len(b)
            if full:
                self._fsync()
        except OSError as exc:
            self._fail(batch, exc)
            return False
        buf_len = at - off
        last = batch[-1]
        st = self.stats
        with self._mutex:
            self._written_end = self.end = off + buf_len
            self.head = (last.seq, last.root)
            if full:
                self._synced_end = self._written_end
                self._synced_head = self.head
            self._marked = False
            n = 0
            for c in batch:
                n += c.carries
                c._body = None
            st["commits"] += n
            st["groups"] += 1
            if n > st["max_group"]:
                st["max_group"] = n
            st["bytes_written"] += buf_len
            if chain and self._queue and not self._closing:
                nxt, self._queue = self._queue, []
                self._writing = self._chained = nxt
                return nxt
            self._release_writing()
        return True

    def _write_all(self, off, data):
        n = self.file.write(off, data)
        self.stats["writes"] += 1
        if n != len(data):
            self._write_rest(off, data, n)

    def _write_rest(self, off, data, n):
        """After a short write of ``n`` bytes: write the rest (ENOSPC shows up next)."""
        write = self.file.write
        with memoryview(data) as mv:
            done = n
            while done < len(mv):
                if n <= 0:
                    raise OSError(5, "write made no progress")
                n = write(off + done, mv[done:])
                self.stats["writes"] += 1
                done += n

    def _fsync(self):
        self.file.sync()
        self.stats["fsyncs"] += 1
        self._last_sync = time.monotonic()

    def _sync(self):
        """fsync what was written since the last fsync (normal/none modes)."""
        if self._written_end == self._synced_end:
            self._last_sync = time.monotonic()
            return None
        try:
            self._fsync()
        except OSError as exc:
            return self._fail([], exc)
        with self._mutex:
            self._synced_end = self._written_end
            self._synced_head = self.head
        return None

    def _sync_and_mark(self):
        """fsync everything, then append a sync mark (and fsync it) so that the next open
        has nothing to re-verify. Returns the StorageError on failure."""
        if self._damaged and not self._repair():
            return self._storage_error(self._damage_cause)
        err = self._sync()
        seq, root = self.head
        if err is not None or self._marked or seq == 0:
            return err
        start = self._written_end
        buf = bytearray(FOOTER_SIZE)
        pack_footer(buf, 0, self.salt, seq, root, FOOTER_SIZE, start, FLAG_SYNC_MARK,
                    self.salt & 0xFFFFFFFF)
        try:
            self._write_all(start, buf)
            self._fsync()
        except OSError as exc:
            return self._fail([], exc)
        with self._mutex:
            self._written_end = self._synced_end = self.end = start + FOOTER_SIZE
            self._tail = self._written_end
            self._marked = True
        return None

    def _storage_error(self, exc):
        seq = self._synced_head[0]
        err = StorageError(getattr(exc, "errno", None) or 5,
                           f"writing the database failed ({exc}); it is back at its last "
                           f"durable commit (seq {seq}); fix the cause and retry")
        err.__cause__ = exc
        return err

    def _fail(self, batch, exc):
        """A write or fsync failed: fail ``batch`` and everything queued, roll back to the
        last fsynced commit, cut the file back to it."""
        with self._mutex:
            failed = batch + self._queue
            self._queue = []
            good = self._synced_end
            lost = self.head[0] - self._synced_head[0]
            self._tail = self._written_end = self.end = good
            self.head = self._synced_head
            self._next_seq = self.head[0]
            # Before the epoch: whoever begins a commit in the new epoch sees the rollback
            # (the database checks the count before finishing a commit).
            self.rollbacks += 1
            self._epoch += 1     # see begin()
            self._marked = False
            self.cache.discard_from(good)
            self.stats["failed_commits"] += sum(c.carries for c in failed)
            self.stats["lost_commits"] += max(lost, 0)
            self.stats["errors"] += 1
            self._cond.notify_all()
        if lost > 0:
            logger.error("fsync failed (%s): %d commit(s) acknowledged in %r mode since the "
                         "last fsync are rolled back", exc, lost, self.durability)
        else:
            logger.error("write/fsync failed (%s): %d commit(s) failed", exc, len(failed))
        self._damage_cause = exc
        self._damaged = True
        self._repair()
        for c in failed:
            c._body = None
            c.future.set_exception(self._storage_error(exc))
        return self._storage_error(exc)

    def _repair(self):
        """Cut the file back to the last fsynced commit and re-verify it."""
        good = self._synced_end
        try:
            self.file.truncate(good)
            self._fsync()
            ft = find_last_commit(self.file, good, self.salt)
        except OSError as exc:
            self._damage_cause = exc
            return False
        if ft.end != good:
            # The fsynced data itself no longer verifies: fall back to what does.
            logger.error("after a failed write the log verifies only up to offset %d "
                         "(expected %d)", ft.end, good)
            try:
                self.file.truncate(ft.end)
                self._fsync()
            except OSError as exc:
                self._damage_cause = exc
                return False
            with self._mutex:
                self._synced_end = self._tail = self._written_end = self.end = ft.end
                self.head = self._synced_head = (ft.seq, ft.root)
                self._next_seq = ft.seq
                self.rollbacks += 1
                self._epoch += 1     # last: see begin()
        self._damaged = False
        return True
