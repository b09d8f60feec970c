"""Crash and fault tests for the storage engine, in the manner of SQLite's crash tests:
fail the Nth I/O operation, cut the power, reopen what a disk honouring fsync would hold,
and check that the database is consistent and holds every acknowledged commit. Plus
kill -9 loops on real processes and random damage to database files."""
import errno
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from protobase.errors import (CorruptionError, DatabaseClosedError, NotADatabaseError,
                              StorageError)
from protobase.storage import FaultInjector, LogStore, SimulatedCrash

LINK = struct.Struct("<qq")    # a root atom: (previous root, payload pointer)


def chain_commit(store, payload, prev=None):
    """Commit ``payload`` linked to ``prev`` (default: the head's root); returns the
    future, with the new root as ``future.root``."""
    c = store.begin_commit()
    prev = store.head[1] if prev is None else prev
    p = c.write_atom(payload)
    root = c.write_atom(LINK.pack(prev, p))
    fut = c.finish(root)
    fut.root = root
    return fut


def read_chain(store):
    """Every payload reachable from the head, oldest first (raises on any damage)."""
    out = []
    root = store.head[1]
    while root != -1:
        prev, p = LINK.unpack(store.read_atom(root))
        out.append(store.read_atom(p))
        root = prev
    out.reverse()
    return out


def assert_consistent(path, acked, attempted):
    """The file at ``path`` opens, verifies, and its chain is a sequence of attempted
    payloads containing every acknowledged one, in order."""
    with LogStore.open(path) as s:
        chain = read_chain(s)
        assert s.check().ok
        assert s.head[0] == len(chain)
    assert all(p in attempted for p in chain)
    assert [p for p in chain if p in acked] == acked
    return chain


def run_sequence(store, n, tag, acked, attempted, swallow=True, pipeline=1):
    """Commit n payloads, ``pipeline`` at a time (queued before waiting: they share a
    group when the writer is busy). Appends the acknowledged ones to ``acked``."""
    for i in range(0, n, pipeline):
        futs = []
        try:
            for j in range(i, min(n, i + pipeline)):
                payload = f"{tag}-{j}".encode() * 3
                attempted.add(payload)
                futs.append((payload, chain_commit(store, payload,
                                                   futs[-1][1].root if futs else None)))
        except (DatabaseClosedError, SimulatedCrash):
            if not swallow:
                raise
        for payload, fut in futs:
            try:
                fut.result(timeout=30)
            except (StorageError, DatabaseClosedError, SimulatedCrash):
                if not swallow:
                    raise
            else:
                acked.append(payload)


def close_quietly(store):
    try:
        store.close()
    except (StorageError, OSError):
        pass


@pytest.mark.parametrize("error,partial,pipeline,keep", [
    (errno.EIO, False, 1, 0), (errno.ENOSPC, True, 1, 0),
    (errno.EIO, False, 3, 0), (errno.EIO, True, 3, 45), (errno.ENOSPC, False, 2, 500)])
def test_a_fault_at_every_operation_then_a_crash_loses_no_acknowledged_commit(
        tmp_path, error, partial, pipeline, keep):
    # Count the mutating operations of a clean run, then fail each one in turn.
    probe = FaultInjector()
    s = LogStore.open(str(tmp_path / "probe.pb"), file_layer=probe)
    run_sequence(s, 6, "p", [], set(), swallow=False)
    total_ops = probe.ops
    s.close()
    assert total_ops >= 14   # header write + syncs, then a write and an fsync per commit
    outcomes = set()
    for n in range(1, total_ops + 2):
        path = str(tmp_path / f"db{n}.pb")
        inj = FaultInjector(fail_at=n, error=error, partial=partial)
        acked, attempted = [], set()
        try:
            s = LogStore.open(path, file_layer=inj)
        except StorageError:
            s = None
        if s is not None:
            run_sequence(s, 6, f"n{n}", acked, attempted, pipeline=pipeline)
        survivors = inj.crash(keep_unsynced=keep)
        if s is not None:
            close_quietly(s)
        after = str(tmp_path / f"after{n}.pb")
        with open(after, "wb") as f:
            f.write(survivors)
        chain = assert_consistent(after, acked, attempted)
        outcomes.add((len(acked), len(chain)))
    # The faults really bit: some runs lost commits to the failure, the last one none.
    assert any(a < 6 for a, _ in outcomes) and (6, 6) in outcomes


@pytest.mark.parametrize("keep", [1, 7, 30, 60, 100, 250, 1000])
def test_a_crash_tearing_unsynced_writes_keeps_every_acknowledged_commit(tmp_path, keep):
    # "none" mode: nothing is fsynced before close, so a crash may keep any prefix of the
    # unsynced bytes; acknowledged-and-checkpointed commits must all survive.
    path = str(tmp_path / "db.pb")
    inj = FaultInjector()
    s = LogStore.open(path, file_layer=inj, durability="none")
    acked, attempted = [], set()
    run_sequence(s, 3, "a", acked, attempted, swallow=False)
    s.checkpoint()
    durable = list(acked)
    run_sequence(s, 5, "b", acked, attempted, swallow=False)
    survivors = inj.crash(keep_unsynced=keep)
    close_quietly(s)
    with open(path + ".after", "wb") as f:
        f.write(survivors)
    chain = assert_consistent(path + ".after", durable, attempted)
    assert chain == acked[:len(chain)]


def test_after_an_injected_eio_the_same_store_keeps_working(tmp_path):
    path = str(tmp_path / "db.pb")
    inj = FaultInjector()
    with LogStore.open(path, file_layer=inj) as s:
        acked, attempted = [], set()
        run_sequence(s, 3, "before", acked, attempted, swallow=False)
        for kind, nth in (("write", 1), ("sync", 2)):    # a commit is a write, then an fsync
            inj.fail_at, inj.fail_kinds = inj.ops + nth, frozenset([kind])
            with pytest.raises(StorageError) as ei:
                chain_commit(s, b"doomed").result(timeout=30)
            assert isinstance(ei.value, OSError) and ei.value.errno == errno.EIO
            assert isinstance(ei.value.__cause__, OSError)
            assert s.head[0] == len(acked)
        inj.heal()
        run_sequence(s, 3, "after", acked, attempted, swallow=False)
        assert read_chain(s) == acked
        assert s.stats()["failed_commits"] == 2
    assert_consistent(path, acked, attempted)


def test_a_failing_disk_fails_the_group_and_everything_queued_after_it(tmp_path):
    path = str(tmp_path / "db.pb")
    inj = FaultInjector()
    with LogStore.open(path, file_layer=inj) as s:
        chain_commit(s, b"ok").result()
        inj.fail_at, inj.fail_count = inj.ops + 1, 0        # every operation from now on
        futs = [chain_commit(s, b"f%d" % i) for i in range(5)]
        for f in futs:
            with pytest.raises(StorageError):
                f.result(timeout=30)
        assert s.head[0] == 1
        inj.heal()
        futs = []
        for i in range(5):     # pipelined: each links to the previous, still queued, root
            futs.append(chain_commit(s, b"g%d" % i, futs[-1].root if futs else None))
        assert [f.result(timeout=30)[0] for f in futs] == [2, 3, 4, 5, 6]
        assert read_chain(s) == [b"ok"] + [b"g%d" % i for i in range(5)]


def test_short_writes_are_completed(tmp_path):
    path = str(tmp_path / "db.pb")
    for n in range(1, 12):
        inj = FaultInjector(short_write_at=n)
        p = f"{path}{n}"
        with LogStore.open(p, file_layer=inj) as s:
            acked, attempted = [], set()
            run_sequence(s, 4, "s", acked, attempted, swallow=False)
        assert_consistent(p, acked, attempted)
        assert len(acked) == 4


def test_a_failed_fsync_in_normal_mode_rolls_back_to_the_last_fsynced_commit(tmp_path):
    path = str(tmp_path / "db.pb")
    inj = FaultInjector()
    with LogStore.open(path, file_layer=inj, durability="normal") as s:
        chain_commit(s, b"synced").result()
        s.checkpoint()
        chain_commit(s, b"written only").result()
        assert s.head[0] == 2
        inj.fail_at, inj.fail_kinds = inj.ops + 1, frozenset(["sync"])
        with pytest.raises(StorageError):
            s.checkpoint()
        assert s.head[0] == 1 and s.stats()["lost_commits"] == 1
        assert read_chain(s) == [b"synced"]
        inj.heal()
        chain_commit(s, b"again").result()
        assert read_chain(s) == [b"synced", b"again"]


@settings(derandomize=True, max_examples=40, deadline=None)
@given(fail_at=st.integers(1, 30), fail_count=st.integers(0, 4),
       error=st.sampled_from([errno.EIO, errno.ENOSPC]), partial=st.booleans(),
       pipeline=st.integers(1, 4), keep=st.sampled_from([0, 1, 52, 200, 10_000]),
       heal_after=st.integers(0, 8))
def test_random_fault_schedules_keep_every_acknowledged_commit(
        tmp_path_factory, fail_at, fail_count, error, partial, pipeline, keep, heal_after):
    tmp = tmp_path_factory.mktemp("sched")
    path = str(tmp / "db.pb")
    inj = FaultInjector(fail_at=fail_at, fail_count=fail_count, error=error, partial=partial)
    acked, attempted = [], set()
    try:
        s = LogStore.open(path, file_layer=inj)
    except StorageError:
        s = None
    if s is not None:
        run_sequence(s, heal_after, "x", acked, attempted, pipeline=pipeline)
        inj.heal()
        run_sequence(s, 4, "y", acked, attempted, pipeline=pipeline)
        # Once healed, the same store commits again.
        assert acked[-1:] == [b"y-3" * 3]
    survivors = inj.crash(keep_unsynced=keep)
    if s is not None:
        close_quietly(s)
    with open(path + ".after", "wb") as f:
        f.write(survivors)
    assert_consistent(path + ".after", acked, attempted)


def test_a_reader_refreshing_beside_a_busy_writer_sees_only_whole_commits(tmp_path):
    path = str(tmp_path / "db.pb")
    stop = threading.Event()
    errors = []
    with LogStore.open(path) as w:
        chain_commit(w, b"first").result()

        def reader():
            try:
                with LogStore.open(path, readonly=True) as r:
                    last = 0
                    while not stop.is_set():
                        seq, _ = r.refresh()
                        assert seq >= last
                        last = seq
                        chain = read_chain(r)
                        assert len(chain) == seq
                        assert chain == [b"first"] + [b"w%d" % i for i in range(seq - 1)]
            except BaseException as exc:   # reported by the main thread
                errors.append(exc)

        t = threading.Thread(target=reader)
        t.start()
        futs = []
        for i in range(150):
            futs.append(chain_commit(w, b"w%d" % i, futs[-1].root if futs else None))
            if i % 10 == 9:
                futs[-1].result()
        futs[-1].result()
        stop.set()
        t.join()
    assert errors == []


# ---- kill -9 loops on real processes -----------------------------------------------------

CHILD = r"""
import struct, sys
from protobase.storage import LogStore
LINK = struct.Struct("<qq")
s = LogStore.open(sys.argv[1], durability=sys.argv[2])
root = s.head[1]
n = 0
if root != -1:
    prev, p = LINK.unpack(s.read_atom(root))
    n = int(s.read_atom(p)) + 1
while True:
    c = s.begin_commit()
    p = c.write_atom(b"%d" % n)
    root = c.write_atom(LINK.pack(root, p))
    c.finish(root).result()
    sys.stdout.write("%d\n" % n)
    sys.stdout.flush()
    n += 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode,kills", [("full", 60), ("normal", 50)])
def test_kill_9_at_random_moments_loses_no_acknowledged_commit(tmp_path, mode, kills, child_env):
    rng = random.Random(1234)
    path = str(tmp_path / "db.pb")
    script = str(tmp_path / "child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    env = child_env
    acked = -1
    deadline = time.monotonic() + 55   # a budget for loaded CI machines
    done = 0
    while done < kills and time.monotonic() < deadline:
        child = subprocess.Popen([sys.executable, script, path, mode], stdout=subprocess.PIPE,
                                 env=env, cwd=str(tmp_path))
        # Wait until it commits at least once, then kill it at a random moment.
        first = child.stdout.readline()
        time.sleep(rng.uniform(0, 0.03))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        lines = (first + out).split(b"\n")
        complete = [int(x) for x in lines[:-1]]    # the last piece is unterminated
        assert first, "the child committed nothing"
        acked = max([acked] + complete)
        with LogStore.open(path, readonly=True) as r:
            chain = []
            root = r.head[1]
            while root != -1:
                prev, p = LINK.unpack(r.read_atom(root))
                chain.append(int(r.read_atom(p)))
                root = prev
        chain.reverse()
        assert chain == list(range(len(chain)))
        assert len(chain) - 1 >= acked, f"lost acknowledged commit {acked} after kill {done}"
        done += 1
    assert done >= kills * 0.6
    with LogStore.open(path) as s:
        assert s.check().ok


# ---- random damage: never wrong data -----------------------------------------------------

def test_random_bit_flips_and_truncations_never_give_wrong_data(tmp_path):
    rng = random.Random(99)
    path = str(tmp_path / "db.pb")
    expected = {}
    with LogStore.open(path, durability="none") as s:
        for i in range(30):
            c = s.begin_commit()
            ptrs = [c.write_atom(rng.randbytes(rng.randrange(0, 120))) for _ in range(3)]
            for p in ptrs:
                expected[p] = s.read_atom(p)
            c.finish(ptrs[-1]).result()
            if i % 7 == 0:
                s.checkpoint()
    original = open(path, "rb").read()
    damaged = str(tmp_path / "damaged.pb")
    outcomes = {"ok": 0, "corrupt": 0, "foreign": 0}
    for trial in range(300):
        data = bytearray(original)
        if trial % 3 == 0:
            data = data[:rng.randrange(0, len(data))]
        else:
            for _ in range(rng.choice((1, 1, 2, 8))):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        with open(damaged, "wb") as f:
            f.write(data)
        try:
            with LogStore.open(damaged, readonly=True, bytes_cache_size=0) as s:
                end = s.stats()["end"]
                for p, want in expected.items():
                    if p >= end:
                        continue
                    try:
                        got = s.read_atom(p)
                    except CorruptionError:
                        outcomes["corrupt"] += 1
                        continue
                    assert got == want, f"wrong data at {p} (trial {trial})"
                    outcomes["ok"] += 1
                s.check()
        except NotADatabaseError:
            outcomes["foreign"] += 1
        except CorruptionError:
            outcomes["corrupt"] += 1
    assert outcomes["ok"] and outcomes["corrupt"]
