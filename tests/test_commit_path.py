"""The small-commit path: the durability future, transactions freed without the cyclic
collector, group commit under threads, and the database following a storage rollback.

Speed is measured in benchmarks/txn_benchmark.py; these tests pin what the fast path must
keep: a commit's future resolves exactly once with its (seq, root) or its error, waiters
and callbacks see it, a closed transaction holds no cycle, many committers share fsyncs,
and after a failed background fsync ("normal" mode) nothing is read from or built on the
commits that were rolled back.
"""
import errno
import gc
import random
import threading
import time
import weakref

import pytest

import protobase as pb
from protobase.errors import StorageError, TransactionClosedError
from protobase.storage import FaultInjector
from protobase.storage import writer as writer_mod
from protobase.storage.fileio import OSFile
from protobase.storage.writer import CommitFuture


# ---- CommitFuture ---------------------------------------------------------------------

def test_future_result_reaches_a_waiting_thread_and_every_later_call():
    fut = CommitFuture()
    assert not fut.done() and not fut.cancelled()
    got = []
    waiters = [threading.Thread(target=lambda: got.append(fut.result(timeout=30)))
               for _ in range(3)]
    for t in waiters:
        t.start()
    time.sleep(0.05)
    assert got == []                       # nobody gets through before it settles
    fut.set_result((7, 123))
    for t in waiters:
        t.join(30)
    assert got == [(7, 123)] * 3
    assert fut.done() and fut.result() == (7, 123) and fut.exception() is None
    assert fut.result(timeout=0) == (7, 123)


def test_future_error_is_raised_by_result_and_returned_by_exception():
    fut = CommitFuture()
    err = StorageError(errno.EIO, "disk on fire")
    fut.set_exception(err)
    with pytest.raises(StorageError) as info:
        fut.result()
    assert info.value is err
    assert fut.exception(timeout=1) is err
    assert fut.done() and not fut.cancel()


def test_future_timeout_on_a_pending_commit():
    fut = CommitFuture()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.05)
    with pytest.raises(TimeoutError):
        fut.exception(timeout=0)
    assert time.monotonic() - t0 >= 0.04
    assert not fut.done()


def test_future_callbacks_run_once_before_or_after_settling_and_tags_stick():
    fut = CommitFuture()
    fut.root = 99                          # callers may tag a future, as a Future allows
    seen = []
    fut.add_done_callback(lambda f: seen.append(("early", f.result())))
    fut.add_done_callback(lambda f: 1 / 0)  # a failing callback does not stop the others
    fut.add_done_callback(lambda f: seen.append(("early2", f.result())))
    assert seen == []
    fut.set_result((1, 2))
    assert seen == [("early", (1, 2)), ("early2", (1, 2))]
    fut.add_done_callback(lambda f: seen.append(("late", f.result())))
    assert seen[-1] == ("late", (1, 2)) and len(seen) == 3
    assert fut.root == 99


def test_store_commits_return_settled_futures_in_inline_modes(tmp_path):
    from protobase.storage import LogStore
    for mode in ("normal", "none", "full"):
        with LogStore.open(str(tmp_path / f"{mode}.pb"), durability=mode) as s:
            c = s.begin_commit()
            p = c.write_atom(b"payload")
            fut = c.finish(p)
            if mode != "full":
                assert fut.done()          # the committing thread wrote it itself
            seq, root = fut.result(timeout=30)
            assert (seq, root) == s.head and root == p
            assert s.read_atom(p) == b"payload"


# ---- transactions are freed by reference counting ---------------------------------------

@pytest.mark.parametrize("how", ["commit", "abort", "readonly"])
def test_a_closed_transaction_is_freed_without_the_cyclic_collector(tmp_path, how):
    db = pb.open(str(tmp_path / "t.pb"), durability="none")
    with db.transaction() as tx:
        tx["c"] = pb.Dict()
    enabled = gc.isenabled()
    gc.disable()
    try:
        tx = db.transaction(readonly=how == "readonly")
        h = tx["c"]
        if how != "readonly":
            h["k"] = {"v": [1, 2]}
        if how == "abort":
            tx.abort()
        else:
            tx.commit()
        ref, href = weakref.ref(tx), weakref.ref(h)
        with pytest.raises(TransactionClosedError):
            h["k"]                         # the handle still knows its transaction ended
        with pytest.raises(TransactionClosedError):
            tx["c"]
        del tx, h
        assert ref() is None and href() is None
    finally:
        if enabled:
            gc.enable()
    with db.transaction(readonly=True) as tx:
        assert dict(tx["c"]) == ({} if how != "commit" else {"k": {"v": [1, 2]}})
    db.close()


# ---- group commit -----------------------------------------------------------------------

class _SlowSyncFile(OSFile):
    """A real file whose fsync takes a few milliseconds, like a busy disk."""

    __slots__ = ()

    def sync(self):
        time.sleep(0.004)
        super().sync()


def _slow_sync_layer(path, *, readonly=False):
    return _SlowSyncFile(path, readonly=readonly)


def test_full_mode_committers_share_fsyncs_and_lose_nothing(tmp_path):
    path = str(tmp_path / "g.pb")
    threads, per_thread = 8, 25
    db = pb.open(path, durability="full", file_layer=_slow_sync_layer)
    with db.transaction() as tx:
        tx["c"] = pb.Dict()
    before = db.stats()
    barrier = threading.Barrier(threads)

    def worker(t):
        barrier.wait()
        for i in range(per_thread):
            with db.transaction() as tx:
                tx["c"][(t, i)] = i

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    after = db.stats()
    commits = after["commits"] - before["commits"]
    fsyncs = after["fsyncs"] - before["fsyncs"]
    assert commits == threads * per_thread
    assert fsyncs * 2 <= commits, (fsyncs, commits)      # groups of two or more on average
    assert after["max_group"] >= 3
    db.close()
    with pb.open(path) as db:
        with db.transaction(readonly=True) as tx:
            assert dict(tx["c"]) == {(t, i): i for t in range(threads) for i in range(per_thread)}
        assert db.check().problems == []


class _SlowFaultyLayer(FaultInjector):
    """A FaultInjector whose fsyncs also take a few milliseconds (commits pile up)."""

    def __call__(self, path, *, readonly=False):
        f = super().__call__(path, readonly=readonly)
        inner_sync = f.sync

        def slow_sync():
            time.sleep(0.003)
            inner_sync()
        f.sync = slow_sync
        return f


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_combined_commits_survive_failing_fsyncs_and_lose_nothing_acknowledged(tmp_path, seed):
    """Full mode, 6 committers: commits that arrive together are written as one storage
    commit. An fsync fails part way: every transaction of the failed group (and any
    built on it) fails with StorageError, every acknowledged one survives a power cut,
    and no failed one shows up, not even inside a later combined commit."""
    rng = random.Random(seed)
    path = str(tmp_path / "k.pb")
    inj = _SlowFaultyLayer(fail_kinds=("sync",))
    db = pb.open(path, durability="full", file_layer=inj)
    with db.transaction() as tx:
        tx["c"] = pb.Dict()
    before = db.stats()
    inj.fail_at, inj.fail_count = inj.ops + rng.randrange(4, 14), 2   # one fsync of the two
    threads, per_thread = 6, 15
    acked, failed = set(), set()
    lock = threading.Lock()

    def worker(t):
        for i in range(per_thread):
            try:
                with db.transaction() as tx:
                    tx["c"][(t, i)] = i
            except StorageError:
                with lock:
                    failed.add((t, i))
            else:
                with lock:
                    acked.add((t, i))

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stats = db.stats()
    assert len(acked) + len(failed) == threads * per_thread
    assert failed and inj.failures == 1
    commits = stats["commits"] - before["commits"]   # transactions made durable
    assert commits == len(acked)
    assert stats["groups"] - before["groups"] < commits      # commits did share writes
    with db.transaction(readonly=True) as tx:
        assert set(tx["c"].keys()) == acked
    disk = inj.crash()                               # power cut: only fsynced bytes remain
    try:
        db.close()
    except OSError:                                  # the machine is "down"
        pass
    copy = str(tmp_path / "after-crash.pb")
    with open(copy, "wb") as f:
        f.write(disk)
    with pb.open(copy) as db2:
        with db2.transaction(readonly=True) as tx:
            assert set(tx["c"].keys()) == acked
            assert {k: tx["c"][k] for k in acked} == {k: k[1] for k in acked}
        assert db2.check().problems == []


# ---- a failed background fsync in "normal" mode -------------------------------------------

def _wait_for(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_normal_mode_rollback_is_followed_by_the_database(tmp_path, monkeypatch):
    """The background fsync fails after a commit was acknowledged: storage rolls back to
    the last fsynced commit. The database must not keep serving the lost commit, and must
    never build a later commit on it (whose atoms were cut off the file)."""
    monkeypatch.setattr(writer_mod, "NORMAL_SYNC_INTERVAL", 0.01)
    path = str(tmp_path / "n.pb")
    inj = FaultInjector(fail_kinds=("sync",))
    db = pb.open(path, durability="normal", file_layer=inj)
    with db.transaction() as tx:
        tx["c"] = pb.Dict()
        tx["c"]["a"] = 1
    f = inj.files[-1]                                # the writable file
    _wait_for(lambda: not f.pending, "the first commits' background fsync")
    inj.fail_at, inj.fail_count = inj.ops + 2, 1    # its write passes, the next fsync fails
    with db.transaction() as tx:
        tx["c"]["b"] = 2                             # acknowledged: written to the OS
    _wait_for(lambda: db.stats()["lost_commits"] == 1, "the failed background fsync")
    with db.transaction(readonly=True) as tx:
        assert dict(tx["c"]) == {"a": 1}             # the head moved back at once
    with db.transaction() as tx:
        tx["c"]["d"] = 4
    with db.transaction(readonly=True) as tx:
        assert dict(tx["c"]) == {"a": 1, "d": 4}
    db.close()
    with pb.open(path) as db:
        with db.transaction(readonly=True) as tx:
            assert dict(tx["c"]) == {"a": 1, "d": 4}
        assert db.check().problems == []


def test_normal_mode_rollback_seen_by_a_commit_built_on_the_lost_state(tmp_path, monkeypatch):
    """Same failure, but the next thing the program does is commit (no transaction started
    in between): that commit must start from what storage holds."""
    monkeypatch.setattr(writer_mod, "NORMAL_SYNC_INTERVAL", 0.01)
    path = str(tmp_path / "m.pb")
    inj = FaultInjector(fail_kinds=("sync",))
    db = pb.open(path, durability="normal", file_layer=inj)
    with db.transaction() as tx:
        tx["c"] = pb.Dict()
        tx["c"]["a"] = 1
    f = inj.files[-1]
    _wait_for(lambda: not f.pending, "the first commits' background fsync")
    tx2 = db.transaction()                   # a snapshot from before the lost commit
    inj.fail_at, inj.fail_count = inj.ops + 2, 1
    with db.transaction() as tx:
        tx["c"]["b"] = 2
    _wait_for(lambda: db.stats()["lost_commits"] == 1, "the failed background fsync")
    tx2["c"]["e"] = 5                        # started before "b": merges onto the storage head
    tx2.commit()
    db.close()
    with pb.open(path) as db:
        with db.transaction(readonly=True) as tx:
            assert dict(tx["c"]) == {"a": 1, "e": 5}
        assert db.check().problems == []


# ---- the committing thread writes (and is interrupted) ----------------------------------

_SYNC_THREADS = []
_INTERRUPT = []          # armed: the next write on the main thread raises KeyboardInterrupt


class _WatchedFile(OSFile):
    """A real file that records which thread fsyncs and can be interrupted mid-write."""

    __slots__ = ()

    def write(self, offset, data):
        if _INTERRUPT and threading.current_thread() is threading.main_thread():
            when = _INTERRUPT.pop()
            _INTERRUPT.clear()
            if when == "after":          # the OS accepted the bytes, then the signal landed
                super().write(offset, data)
            raise KeyboardInterrupt
        return super().write(offset, data)

    def sync(self):
        _SYNC_THREADS.append(threading.current_thread().name)
        super().sync()


def _watched_layer(path, *, readonly=False):
    return _WatchedFile(path, readonly=readonly)


def test_full_mode_waiter_writes_its_own_commit(tmp_path):
    from protobase.storage import LogStore
    _SYNC_THREADS.clear()
    with LogStore.open(str(tmp_path / "w.pb"), durability="full", file_layer=_watched_layer) as s:
        heads = []
        for i in range(30):
            c = s.begin_commit()
            p = c.write_atom(b"commit %d" % i)
            heads.append(c.finish(p).result())
            assert s.head == heads[-1]
        assert [seq for seq, _ in heads] == list(range(heads[0][0], heads[0][0] + 30))
        st = s.stats()
        assert st["fsyncs"] >= 30            # full mode: every acknowledged commit fsynced
    me = threading.current_thread().name
    # The waiter takes the queue before the writer thread gets the GIL, nearly always.
    assert _SYNC_THREADS.count(me) >= 15, _SYNC_THREADS


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("mode", ["normal", "none", "full"])
def test_an_interrupted_caller_write_is_still_written_and_loses_nothing_acknowledged(tmp_path,
                                                                                  mode, when):
    """Issue 14 item 2: an interrupt in the caller's write used to be taken for a failed
    write, failing the commit and cutting the file back to the last fsync (losing every
    commit acknowledged since, in normal/none modes). The caller is interrupted, not the
    write: the commit is written by the writer thread and nothing is cut."""
    from protobase.storage import LogStore
    path = str(tmp_path / f"i-{mode}-{when}.pb")
    interrupted = 0
    acked = []
    with LogStore.open(path, durability=mode, file_layer=_watched_layer) as s:
        c = s.begin_commit()
        acked.append((c.finish(c.write_atom(b"first")).result(), b"first"))
        s.checkpoint()           # the last fsync: everything below is acknowledged after it
        for attempt in range(20):
            c = s.begin_commit()
            p = c.write_atom(b"interrupted %d" % attempt)
            _INTERRUPT.append(when)
            try:
                c.finish(p).result()         # normal/none: the write happens in finish
            except KeyboardInterrupt:
                interrupted += 1
            _INTERRUPT.clear()
            # Written anyway (by the writer thread), not failed, not left hanging.
            assert c.future.result(timeout=30)[1] == p
            assert s.read_atom(p) == b"interrupted %d" % attempt
            acked.append((c.future.result(), b"interrupted %d" % attempt))
            c = s.begin_commit()
            after = c.finish(c.write_atom(b"after %d" % attempt)).result(timeout=30)
            assert s.head == after and s.read_atom(after[1]) == b"after %d" % attempt
            acked.append((after, b"after %d" % attempt))
        assert interrupted >= 1
        assert s.stats()["failed_commits"] == 0 and s.stats()["lost_commits"] == 0
        final = s.head
    with LogStore.open(path) as s:
        assert s.head == final
        for (seq, ptr), data in acked:
            assert s.read_atom(ptr) == data, seq
        assert s.check().problems == []
