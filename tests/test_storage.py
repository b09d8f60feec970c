"""LogStore: round trips, reopen, recovery from torn tails, corruption, foreign files, the
writer lock, group commit, durability modes and the byte-bounded atom cache."""
import logging
import os
import sqlite3
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from protobase.errors import (CorruptionError, DatabaseClosedError, DatabaseLockedError,
                              NotADatabaseError,
                              ReadOnlyError, TransactionClosedError)
from protobase.storage import AtomBytesCache, FaultInjector, LogStore, MemoryFS
from protobase.storage.cache import ENTRY_OVERHEAD
from protobase.storage.log import FOOTER_SIZE, HEADER_SIZE



def commit(store, *atoms, root_index=-1):
    """Write atoms in one commit, root at atoms[root_index]; returns (ptrs, (seq, root))."""
    c = store.begin_commit()
    ptrs = [c.write_atom(a) for a in atoms]
    root = ptrs[root_index] if ptrs else -1
    return ptrs, c.finish(root).result(timeout=30)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "db.pb")


def test_a_new_store_is_empty_and_a_missing_file_is_created(path):
    assert not os.path.exists(path)
    with LogStore.open(path) as s:
        assert s.head == (0, -1)
    assert os.path.getsize(path) == HEADER_SIZE
    with LogStore.open(path) as s:
        assert s.head == (0, -1)


def test_round_trip_and_reopen_keep_every_atom_and_the_sequence(path):
    written = {}
    with LogStore.open(path) as s:
        for i in range(20):
            atoms = [f"commit {i} atom {j}".encode() * (j + 1) for j in range(i % 4 + 1)]
            ptrs, head = commit(s, *atoms)
            assert head == (i + 1, ptrs[-1]) == s.head
            written.update(zip(ptrs, atoms))
        assert all(s.read_atom(p) == a for p, a in written.items())
    with LogStore.open(path) as s:
        assert s.head[0] == 20
        assert all(s.read_atom(p) == a for p, a in written.items())
        ptrs, head = commit(s, b"after reopen")
        assert head[0] == 21
    with LogStore.open(path, readonly=True) as s:
        assert s.head == head
        assert s.read_atom(ptrs[0]) == b"after reopen"
        report = s.check()
        assert report.problems == [] and report.atoms == len(written) + 1


def test_empty_atoms_and_empty_commits_round_trip(path):
    with LogStore.open(path) as s:
        ptrs, _ = commit(s, b"", b"x", b"")
        head = s.begin_commit().finish(ptrs[1]).result()   # no atoms, an older root
        assert head == (2, ptrs[1])
    with LogStore.open(path) as s:
        assert s.head == (2, ptrs[1])
        assert [s.read_atom(p) for p in ptrs] == [b"", b"x", b""]


def test_write_atoms_matches_write_atom_one_by_one(tmp_path):
    atoms = [bytes([i % 251]) * (i % 300) for i in range(500)]
    with LogStore.open(str(tmp_path / "a")) as a, LogStore.open(str(tmp_path / "b")) as b:
        ca, cb = a.begin_commit(), b.begin_commit()
        pa = [ca.write_atom(x) for x in atoms]
        pb = cb.write_atoms(atoms)
        assert pa == pb
        ca.finish(pa[-1]).result()
        cb.finish(pb[-1]).result()
    with open(tmp_path / "a", "rb") as fa, open(tmp_path / "b", "rb") as fb:
        # Same layout; only the per-file salt (and the checksums it seeds) differ.
        assert len(fa.read()) == len(fb.read())
    with LogStore.open(str(tmp_path / "b"), bytes_cache_size=0) as b:
        assert [b.read_atom(p) for p in pb] == atoms


def test_reading_what_was_just_written_never_touches_the_file(path):
    counter = FaultInjector()
    with LogStore.open(path, file_layer=counter) as s:
        ptrs, _ = commit(s, *[b"a%d" % i * 50 for i in range(100)])
        reads = counter.counts["read"]
        for p in ptrs:
            s.read_atom(p)
        assert counter.counts["read"] == reads
        st_ = s.stats()
        assert st_["cache_hits"] == 100 and st_["cache_misses"] == 0 and st_["reads"] == 0
    with LogStore.open(path, file_layer=FaultInjector()) as s:
        s.read_atom(ptrs[0])
        assert s.stats()["reads"] == 1 and s.stats()["cache_misses"] == 1
        s.read_atom(ptrs[0])
        assert s.stats()["reads"] == 1 and s.stats()["cache_hits"] == 1


def test_large_atoms_are_read_back_across_the_first_read(path):
    big = os.urandom(100_000)
    with LogStore.open(path) as s:
        ptrs, _ = commit(s, b"small", big, b"tail")
    with LogStore.open(path, bytes_cache_size=0) as s:
        assert s.read_atom(ptrs[1]) == big
        assert s.read_atom(ptrs[2]) == b"tail"


def _two_commit_file(path):
    with LogStore.open(path, durability="none") as s:
        first, h1 = commit(s, b"one" * 10, b"two" * 5)
        s.checkpoint()
        size1 = os.path.getsize(path)
        second, h2 = commit(s, b"three" * 7, b"four" * 3)
    with open(path, "rb") as f:
        return f.read(), size1, first, h1, second, h2


def test_a_torn_tail_is_cut_back_to_the_previous_commit_at_every_offset(path, tmp_path, caplog):
    data, size1, first, h1, second, h2 = _two_commit_file(path)
    # The file ends: [... commit 1][mark][commit 2][mark]. Cut inside commit 2 or its mark.
    caplog.set_level(logging.WARNING, logger="protobase")
    cut_path = str(tmp_path / "cut.pb")
    end2 = len(data) - FOOTER_SIZE      # end of commit 2 (before its sync mark)
    for cut in range(size1 + 1, len(data)):
        with open(cut_path, "wb") as f:
            f.write(data[:cut])
        with LogStore.open(cut_path, readonly=True) as r:
            expect = h2 if cut >= end2 else h1
            assert r.head == expect
        assert os.path.getsize(cut_path) == cut          # readonly never truncates
        caplog.clear()
        with LogStore.open(cut_path) as s:
            assert s.head == expect
            assert s.read_atom(first[0]) == b"one" * 10
            if expect == h1:
                with pytest.raises(CorruptionError):
                    s.read_atom(second[0])
            else:
                assert s.read_atom(second[1]) == b"four" * 3
        if cut not in (size1, end2):
            dropped = cut - (end2 if cut >= end2 else size1)
            assert f"dropped {dropped} bytes" in caplog.text


def test_a_commit_with_a_damaged_middle_is_not_accepted_on_open(path):
    # Group commit writes several commits at once: if a crash tears the middle of an
    # unsynced commit, open must not accept it (its footer may be intact).
    with LogStore.open(path, durability="none") as s:
        base, h1 = commit(s, b"base")
        s.checkpoint()
        p2, _ = commit(s, b"x" * 300)
        p3, h3 = commit(s, b"y" * 300)
    raw = bytearray(open(path, "rb").read())
    raw[p2[0] + 100] ^= 0x40                   # inside commit 2 (unsynced span)
    raw = raw[:-FOOTER_SIZE]                   # drop the closing sync mark
    open(path, "wb").write(raw)
    with LogStore.open(path) as s:
        assert s.head == h1
        assert s.read_atom(base[0]) == b"base"


def test_a_bad_checksum_in_committed_data_raises_corruption_error_with_the_offset(path):
    with LogStore.open(path) as s:
        ptrs, _ = commit(s, b"alpha" * 20, b"beta" * 20)
    with open(path, "r+b") as f:
        f.seek(ptrs[0] + 8 + 10)
        b = f.read(1)
        f.seek(ptrs[0] + 8 + 10)
        f.write(bytes([b[0] ^ 1]))
    with LogStore.open(path) as s:
        with pytest.raises(CorruptionError) as ei:
            s.read_atom(ptrs[0])
        assert ei.value.offset == ptrs[0]
        assert s.read_atom(ptrs[1]) == b"beta" * 20
        report = s.check()
        assert [p.offset for p in report.problems] == [ptrs[0], ptrs[0]]  # commit + atom
        assert not report.ok


def test_pointers_outside_the_committed_log_raise_corruption_error(path):
    with LogStore.open(path) as s:
        ptrs, _ = commit(s, b"abc")
        for bad in (-5, 0, HEADER_SIZE - 1, 10 ** 9):
            with pytest.raises(CorruptionError):
                s.read_atom(bad)
        with pytest.raises(CorruptionError):
            s.read_atom(ptrs[0] + 1)   # mid-atom: the checksum cannot match


@pytest.mark.parametrize("content", [
    b"hello, this is a text file\n" * 10,
    b"x",
    b"\x89ProtoBase\r\nBUT NOT REALLY" + bytes(40),   # our magic, damaged header
    "sqlite",
])
def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(tmp_path, content):
    path = str(tmp_path / "foreign")
    if content == "sqlite":
        con = sqlite3.connect(path)
        con.execute("create table t(x)")
        con.execute("insert into t values (1)")
        con.commit()
        con.close()
    else:
        with open(path, "wb") as f:
            f.write(content)
    before = open(path, "rb").read()
    mtime = os.stat(path).st_mtime_ns
    for readonly in (False, True):
        with pytest.raises((NotADatabaseError, CorruptionError)) as ei:
            LogStore.open(path, readonly=readonly)
        if content != b"\x89ProtoBase\r\nBUT NOT REALLY" + bytes(40):
            assert isinstance(ei.value, NotADatabaseError)
    assert open(path, "rb").read() == before
    assert os.stat(path).st_mtime_ns == mtime
    assert not os.path.exists(path + ".lock")


def test_an_empty_file_and_a_torn_header_are_new_empty_databases(tmp_path):
    for prefix in (b"", b"\x89Proto"):
        path = str(tmp_path / f"f{len(prefix)}")
        open(path, "wb").write(prefix)
        with LogStore.open(path, readonly=True) as r:
            assert r.head == (0, -1)
        assert open(path, "rb").read() == prefix
        with LogStore.open(path) as s:
            assert s.head == (0, -1)
            ptrs, head = commit(s, b"first")
        with LogStore.open(path) as s:
            assert s.head == head and s.read_atom(ptrs[0]) == b"first"


def test_a_second_writer_is_refused_at_once_in_this_process_and_another(path, child_env, child_cwd):
    with LogStore.open(path) as s:
        commit(s, b"x")
        with pytest.raises(DatabaseLockedError):
            LogStore.open(path)
        script = ("import sys\nfrom protobase.storage import LogStore\n"
                  "from protobase.errors import DatabaseLockedError\n"
                  "try:\n    LogStore.open(sys.argv[1])\nexcept DatabaseLockedError:\n"
                  "    print('locked')\nelse:\n    print('opened')\n")
        out = subprocess.run([sys.executable, "-c", script, path], capture_output=True,
                             text=True, timeout=60, cwd=child_cwd, env=child_env)
        assert out.stdout.strip() == "locked", out.stderr
    with LogStore.open(path) as s:   # the lock is released on close
        assert s.head[0] == 1


def test_a_reader_works_beside_the_writer_and_refresh_sees_new_commits(path):
    with LogStore.open(path) as w:
        p1, h1 = commit(w, b"one")
        with LogStore.open(path, readonly=True) as r:
            assert r.head == h1
            p2, h2 = commit(w, b"two")
            assert r.head == h1
            assert r.refresh() == h2 == r.head
            assert r.read_atom(p2[0]) == b"two"
            with pytest.raises(ReadOnlyError):
                r.begin_commit()
            w.checkpoint()            # a sync mark: same head
            assert r.refresh() == h2


@pytest.mark.parametrize("mode", ["full", "normal", "none"])
def test_eight_threads_committing_concurrently_share_writes_and_fsyncs(path, mode):
    n_threads, per_thread = 8, 25
    results = {}
    barrier = threading.Barrier(n_threads)

    def worker(t):
        barrier.wait()
        out = []
        for i in range(per_thread):
            payload = f"thread {t} commit {i}".encode()
            c = s.begin_commit()
            ptr = c.write_atom(payload)
            fut = c.finish(ptr)
            out.append((payload, fut.result(timeout=60)))
        results[t] = out

    with LogStore.open(path, durability=mode) as s:
        fsyncs0 = s.stats()["fsyncs"]
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = s.stats()
        total = n_threads * per_thread
        assert stats["commits"] == total
        if mode == "full":
            assert stats["fsyncs"] - fsyncs0 < total
            assert stats["max_group"] > 1
        assert stats["groups"] <= total
    seqs = sorted(seq for out in results.values() for _, (seq, _) in out)
    assert seqs == list(range(1, total + 1))
    with LogStore.open(path) as s:
        assert s.head[0] == total
        for out in results.values():
            for payload, (_, ptr) in out:
                assert s.read_atom(ptr) == payload
        assert s.check().ok


@pytest.mark.parametrize("mode", ["normal", "none"])
def test_relaxed_modes_resolve_without_fsync_and_close_makes_them_durable(path, mode):
    with LogStore.open(path, durability=mode) as s:
        f0 = s.stats()["fsyncs"]
        heads = [commit(s, b"r%d" % i)[1] for i in range(50)]
        assert s.stats()["fsyncs"] - f0 <= 1   # "normal" may fsync once per second
        assert s.head == heads[-1]
    with LogStore.open(path) as s:
        assert s.head == heads[-1]
        assert s.read_atom(heads[10][1]) == b"r10"


def test_abort_drops_the_commit_and_its_space_is_reused(path):
    with LogStore.open(path) as s:
        keep, h1 = commit(s, b"keep")
        c = s.begin_commit()
        gone = c.write_atom(b"gone" * 10)
        c.abort()
        with pytest.raises(TransactionClosedError):
            c.write_atom(b"late")
        with pytest.raises(CorruptionError):
            s.read_atom(gone)
        again, h2 = commit(s, b"next")
        assert again[0] == gone and h2[0] == h1[0] + 1
        assert s.read_atom(gone) == b"next"


def test_a_finished_commit_cannot_be_used_again(path):
    with LogStore.open(path) as s:
        c = s.begin_commit()
        p = c.write_atom(b"a")
        c.finish(p).result()
        with pytest.raises(TransactionClosedError):
            c.write_atom(b"b")
        with pytest.raises(TransactionClosedError):
            c.finish(p)
        with pytest.raises(ValueError):
            s.begin_commit().finish(10 ** 9)


def test_the_memory_file_layer_behaves_like_a_file():
    fs = MemoryFS()
    with LogStore.open("mem.pb", file_layer=fs) as s:
        ptrs, head = commit(s, b"in memory", b"too")
        with pytest.raises(DatabaseLockedError):
            LogStore.open("mem.pb", file_layer=fs)
    with LogStore.open("mem.pb", file_layer=fs) as s:
        assert s.head == head and s.read_atom(ptrs[0]) == b"in memory"
        assert s.check().ok


def test_open_reads_a_constant_number_of_bytes_however_long_the_log(path):
    with LogStore.open(path, durability="none") as s:
        for i in range(300):
            commit(s, b"z" * 200)
    counter = FaultInjector()
    with LogStore.open(path, file_layer=counter) as s:
        assert s.head[0] == 300
        # header twice (probe + under the lock) and the closing sync mark's footer
        assert counter.counts["read"] <= 4


def test_atoms_not_yet_in_the_file_read_back_even_with_no_cache(path):
    with LogStore.open(path, bytes_cache_size=0) as s:
        c = s.begin_commit()
        p1 = c.write_atom(b"being built")
        p2 = c.write_atom(b"second")
        assert s.read_atom(p1) == b"being built"      # from the unfinished commit
        assert s.read_atom(p2) == b"second"
        fut = c.finish(p2)
        assert s.read_atom(p1) == b"being built"      # queued or written: same bytes
        fut.result()
        assert s.read_atom(p2) == b"second"
        assert s.stats()["cache_entries"] == 0


def test_closed_and_misused_stores_raise_clear_errors(path, tmp_path):
    with pytest.raises(ValueError):
        LogStore.open(path, durability="sometimes")
    with pytest.raises(FileNotFoundError):
        LogStore.open(str(tmp_path / "missing.pb"), readonly=True)
    assert not os.path.exists(tmp_path / "missing.pb")
    s = LogStore.open(path)
    ptrs, _ = commit(s, b"x")
    c = s.begin_commit()
    c.write_atom(b"unfinished")
    s.close()                  # does not wait for the commit being built: that one fails
    fut = c.finish(-1)
    assert isinstance(fut.exception(timeout=30), DatabaseClosedError)
    with pytest.raises(DatabaseClosedError):
        s.begin_commit()
    with pytest.raises(DatabaseClosedError):
        s.read_atom(ptrs[0])
    s.close()                                      # closing twice is harmless
    with LogStore.open(path) as s:
        assert s.head[0] == 1


def test_stats_report_the_figures_the_layer_above_shows(path):
    with LogStore.open(path, durability="normal", bytes_cache_size=1 << 20) as s:
        commit(s, b"a", b"b")
        st_ = s.stats()
    for key in ("file_size", "commits", "sequence", "durability", "cache_hits",
                "cache_misses", "cache_bytes", "writes", "fsyncs", "avg_group", "max_group"):
        assert key in st_
    assert st_["sequence"] == 1 and st_["commits"] == 1 and st_["durability"] == "normal"
    assert st_["cache_max_bytes"] == 1 << 20
    assert st_["file_size"] == st_["end"]


# ---- AtomBytesCache: differential against a list-and-set model of second chance -----------

class ClockModel:
    """The cache's policy written the slow, obvious way: a list of pointers oldest first, a
    set of reference bits, and a hand that takes the front entry, spares it (clears its
    bit, sends it to the back) if referenced, else evicts it, until the low water mark."""

    def __init__(self, max_bytes):
        self.max = max_bytes
        self.order, self.vals, self.ref = [], {}, set()
        self.hits = self.misses = 0

    def cost(self):
        return sum(len(v) + ENTRY_OVERHEAD for v in self.vals.values())

    def drop(self, p):
        if p in self.vals:
            self.order.remove(p)
            del self.vals[p]
            self.ref.discard(p)

    def evict(self):
        if self.cost() <= self.max:
            return
        while self.cost() > self.max - self.max // 8:
            p = self.order.pop(0)
            if p in self.ref:
                self.ref.remove(p)
                self.order.append(p)
            else:
                del self.vals[p]

    def put(self, p, data):
        self.drop(p)
        if len(data) + ENTRY_OVERHEAD <= self.max:
            self.order.append(p)
            self.vals[p] = data
            self.evict()

    def get(self, p):
        if p in self.vals:
            self.hits += 1
            self.ref.add(p)
            return self.vals[p]
        self.misses += 1
        return None

    def items(self):
        return [(p, self.vals[p]) for p in self.order]


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache = AtomBytesCache(1000)
        self.model = ClockModel(1000)
        self.next_ptr = 100

    @rule(ptr=st.integers(0, 30), n=st.integers(0, 1100))
    def put(self, ptr, n):
        data = bytes([ptr % 256]) * n
        self.cache.put(ptr, data)
        self.model.put(ptr, data)

    @rule(sizes=st.lists(st.integers(0, 200), max_size=6))
    def put_many(self, sizes):
        # a fresh commit's atoms: pointers never cached before
        ptrs = list(range(self.next_ptr, self.next_ptr + len(sizes)))
        self.next_ptr += len(sizes)
        datas = [bytes([p % 256]) * n for p, n in zip(ptrs, sizes)]
        self.cache.put_many(ptrs, datas, sum(sizes))
        m = self.model
        if sum(sizes) + ENTRY_OVERHEAD * len(sizes) > m.max:
            # the batch alone overflows: only its newest atoms that fit stay
            m.order, m.vals, m.ref = [], {}, set()
            while sum(n + ENTRY_OVERHEAD for n in sizes) > m.max:
                sizes, ptrs, datas = sizes[1:], ptrs[1:], datas[1:]
        m.order += ptrs
        m.vals.update(zip(ptrs, datas))
        m.evict()

    @rule(ptr=st.integers(0, 130))
    def get(self, ptr):
        assert self.cache.get(ptr) == self.model.get(ptr)

    @rule(lo=st.integers(0, 130))
    def discard_from(self, lo):
        self.cache.discard_from(lo)
        for p in [p for p in self.model.order if p >= lo]:
            self.model.drop(p)

    @rule(ptrs=st.lists(st.integers(0, 130), max_size=4))
    def discard(self, ptrs):
        self.cache.discard(ptrs)
        for p in ptrs:
            self.model.drop(p)

    @invariant()
    def same_state(self):
        assert list(self.cache._d.items()) == self.model.items()
        assert self.cache._ref == self.model.ref
        assert self.cache.bytes == self.model.cost() <= self.model.max
        assert (self.cache.hits, self.cache.misses) == (self.model.hits, self.model.misses)
        assert len(self.cache) == len(self.model.vals)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(derandomize=True, max_examples=100, deadline=None)


@settings(derandomize=True, max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=40), st.integers(0, 3000))
def test_put_many_keeps_the_newest_atoms_within_the_budget(datas, max_bytes):
    cache = AtomBytesCache(max_bytes)
    cache.put(-1, b"stale")
    ptrs = list(range(len(datas)))
    cache.put_many(ptrs, datas, sum(map(len, datas)))
    batch = sum(len(v) + ENTRY_OVERHEAD for v in datas)
    if batch > max_bytes:
        # the batch alone overflows: the newest atoms that fit, within max_bytes itself
        want = list(zip(ptrs, datas))
        while sum(len(v) + ENTRY_OVERHEAD for _, v in want) > max_bytes:
            want.pop(0)
    else:
        model = ClockModel(max_bytes)
        model.put(-1, b"stale")
        model.order += ptrs
        model.vals.update(zip(ptrs, datas))
        model.evict()
        want = model.items()
    assert list(cache._d.items()) == want
    assert cache.bytes == sum(len(v) + ENTRY_OVERHEAD for _, v in want) <= max_bytes


def test_an_entry_hit_since_the_last_sweep_outlives_older_and_newer_unhit_ones():
    cache = AtomBytesCache(10 * (100 + ENTRY_OVERHEAD))
    for p in range(10):
        cache.put(p, bytes(100))
    assert cache.get(0) == bytes(100) and cache.get(2) == bytes(100)
    cache.put(10, bytes(100))           # over budget: sweep down to the low water mark
    assert list(cache._d) == [5, 6, 7, 8, 9, 10, 0, 2] and not cache._ref
    assert cache.bytes == 8 * (100 + ENTRY_OVERHEAD) <= cache.max_bytes * 7 // 8
    for p in range(11, 40):             # never hit again: their second chance is spent
        cache.put(p, bytes(100))
    assert 0 not in cache and 2 not in cache


def test_a_sweep_over_entries_all_hit_ends_and_then_evicts_in_age_order():
    cache = AtomBytesCache(4 * (10 + ENTRY_OVERHEAD))
    for p in range(4):
        cache.put(p, bytes(10))
        cache.get(p)
    cache.put(4, bytes(10))             # the only unhit entry goes first, then the oldest
    assert list(cache._d) == [1, 2, 3] and not cache._ref
    assert cache.bytes == 3 * (10 + ENTRY_OVERHEAD)


def test_hits_racing_inserts_and_sweeps_keep_the_byte_count_exact():
    cache = AtomBytesCache(50 * (40 + ENTRY_OVERHEAD))
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            for p in range(0, 400, 7):
                got = cache.get(p)
                assert got is None or got == bytes([p % 256]) * 40

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for rnd in range(20):
            for p in range(400):
                cache.put(p, bytes([p % 256]) * 40)
            cache.put_many(list(range(1000 + rnd * 10, 1010 + rnd * 10)), [bytes(40)] * 10, 400)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert cache.bytes == sum(len(v) + ENTRY_OVERHEAD for v in cache._d.values())
    assert cache.bytes <= cache.max_bytes
    assert cache.hits + cache.misses > 0


# ---- the store against a model: random commits, aborts, reopens -------------------------

class StoreMachine(RuleBasedStateMachine):
    """Every pointer handed out by a successful commit keeps reading back its bytes, across
    reopens and aborts; the head is the last finished commit."""

    def __init__(self):
        super().__init__()
        self.fs = MemoryFS()
        self.store = LogStore.open("m.pb", file_layer=self.fs, bytes_cache_size=2000)
        self.atoms = {}
        self.head = (0, -1)

    @rule(atoms=st.lists(st.binary(max_size=300), max_size=6), root_last=st.booleans())
    def commit(self, atoms, root_last):
        c = self.store.begin_commit()
        ptrs = [c.write_atom(a) for a in atoms]
        root = ptrs[-1] if ptrs and root_last else self.head[1]
        self.head = c.finish(root).result()
        self.atoms.update(zip(ptrs, atoms))

    @rule(atoms=st.lists(st.binary(max_size=50), min_size=1, max_size=3))
    def abort(self, atoms):
        c = self.store.begin_commit()
        for a in atoms:
            c.write_atom(a)
        c.abort()

    @rule()
    def reopen(self):
        self.store.close()
        self.store = LogStore.open("m.pb", file_layer=self.fs, bytes_cache_size=2000)

    @invariant()
    def everything_reads_back(self):
        assert self.store.head == self.head
        for p, a in self.atoms.items():
            assert self.store.read_atom(p) == a

    def teardown(self):
        report = self.store.check()
        self.store.close()
        assert report.ok, report


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(derandomize=True, max_examples=40, deadline=None,
                                     stateful_step_count=20)


# ---- the C read path (frame.AtomReader): mapping, pread, fallback ------------------------

def _spread_atoms(seed):
    """Atoms of many sizes: empty, tiny, around the 4 KiB first read, and large."""
    rnd = __import__("random").Random(seed)
    sizes = [0, 1, 7, 4087, 4088, 4089, 4096, 10_000, 70_000] + [rnd.randrange(2000)
                                                                  for _ in range(200)]
    rnd.shuffle(sizes)
    return [rnd.randbytes(n) for n in sizes]


def test_real_files_read_through_the_mapping_give_the_written_bytes(path):
    atoms = _spread_atoms(1)
    with LogStore.open(path) as s:
        ptrs = []
        for i in range(0, len(atoms), 50):
            ptrs += commit(s, *atoms[i:i + 50])[0]
    for readonly in (True, False):
        with LogStore.open(path, readonly=readonly) as s:
            assert [s.read_atom(p) for p in ptrs] == atoms
            assert s._reader.mapped > max(ptrs)          # a closed log is all durable
            # Mapped atoms are copies out of the page cache: they stay out of the LRU.
            assert s.stats()["cache_entries"] == 0
            assert s.stats()["reads"] == len(atoms)
            assert [s._read_from_file(p) for p in ptrs[:20]] == atoms[:20]


def test_atoms_past_the_durable_part_are_read_with_pread_and_cached(path):
    atoms = _spread_atoms(2)
    with LogStore.open(path, durability="none") as s:
        ptrs, _ = commit(s, *atoms)
        s._cache.clear()
        assert all(p + 8 > s._reader.mapped for p in ptrs)   # nothing fsynced yet
        assert [s.read_atom(p) for p in ptrs] == atoms
        assert s.stats()["cache_entries"] == len(atoms)
        assert [s.read_atom(p) for p in ptrs] == atoms      # now from the cache
        # One pread per atom, two for those that outgrow the first 4 KiB read.
        assert s.stats()["reads"] == len(atoms) + sum(len(a) > 4088 for a in atoms)


def test_a_reader_follows_the_writer_and_maps_what_became_durable(path):
    with LogStore.open(path) as w:
        first, _ = commit(w, b"first")
        with LogStore.open(path, readonly=True) as r:
            assert r.read_atom(first[0]) == b"first"
            mapped = r._reader.mapped
            big = [os.urandom(100_000) for _ in range(15)]     # 1.5 MB: past REMAP_STEP
            ptrs, head = commit(w, *big)
            assert r.refresh() == head
            # The newest footer vouches only for what was fsynced before it was written:
            # the new atoms come through pread for now.
            assert [r.read_atom(p) for p in ptrs] == big
            assert r._reader.mapped == mapped
            commit(w, b"later")      # its footer says everything before it is on disk
            r.refresh()
            r._cache.clear()
            assert [r.read_atom(p) for p in ptrs] == big
            assert r._reader.mapped > max(ptrs) > mapped
            # The writer's own store maps its fsynced part as it grows.
            w._cache.clear()
            assert [w.read_atom(p) for p in ptrs] == big


def test_damage_inside_the_mapping_is_corruption_with_the_offset(path):
    with LogStore.open(path) as s:
        ptrs, _ = commit(s, b"alpha" * 20, b"beta" * 20, os.urandom(9000))
    with open(path, "r+b") as f:
        for p in (ptrs[0] + 8 + 3, ptrs[2] + 8 + 8500):     # one small, one past 4 KiB
            f.seek(p)
            b = f.read(1)
            f.seek(p)
            f.write(bytes([b[0] ^ 0x40]))
    with LogStore.open(path, readonly=True) as s:
        for bad in (ptrs[0], ptrs[2]):
            with pytest.raises(CorruptionError) as ei:
                s.read_atom(bad)
            assert ei.value.offset == bad
        assert s.read_atom(ptrs[1]) == b"beta" * 20
        with pytest.raises(CorruptionError):
            s.read_atom(ptrs[1] + 1)          # mid-atom: its "prefix" cannot check out
        for bad in (-1, 10 ** 30):
            with pytest.raises(CorruptionError):
                s.read_atom(bad)
        with pytest.raises(TypeError):
            s.read_atom(str(ptrs[1]))


def test_an_unclosed_store_is_freed_by_reference_counting(path):
    import gc
    import weakref
    with LogStore.open(path) as s:
        ptrs, _ = commit(s, b"x")
    s = LogStore.open(path, readonly=True)
    assert s.read_atom(ptrs[0]) == b"x"
    ref = weakref.ref(s)
    gc.disable()
    try:
        del s
        assert ref() is None       # no cycle through its reader keeps it alive
    finally:
        gc.enable()


def test_a_closed_store_drops_its_mapping_and_refuses_reads(path):
    with LogStore.open(path) as s:
        ptrs, _ = commit(s, b"x" * 100)
    s = LogStore.open(path, readonly=True)
    assert s.read_atom(ptrs[0]) == b"x" * 100
    assert s._reader.mapped > 0
    s.close()
    assert s._reader.mapped == 0
    with pytest.raises(DatabaseClosedError):
        s.read_atom(ptrs[0])
