"""fork(): a database is opened after fork, never shared across it.

A forked child inherits the parent's descriptors (the data file, the writer lock's open
file description, the read mapping) but not its writer thread. An inherited Database is
abandoned in the child: its descriptors are closed without unlocking and without writing
anything, and every use raises DatabaseClosedError naming "open after fork". So a child
can neither write beside the parent (one side's acknowledged commits would vanish) nor
keep the parent's lock alive once the parent closed. Real os.fork() and multiprocessing's
fork start method; every wait has a timeout.
"""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

import protobase as pb

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _in_child(body):
    """Fork; the child runs body() and reports its return value (JSON) or its exception
    through a pipe, then leaves with os._exit (no atexit, no pytest teardown). Returns
    (pid, read end of the pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            try:
                out = {"ok": body()}
            except BaseException as exc:          # reported to the parent, which asserts
                out = {"error": type(exc).__name__, "message": str(exc)}
            os.write(w, json.dumps(out).encode())
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _result(pid, r, timeout=20):
    """The child's report; fails (killing the child) if it does not finish in time."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    return json.loads(b"".join(chunks))


def _is_fork_error(report):
    return (report.get("error") == "DatabaseClosedError"
            and "open after fork" in report["message"])


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "fork.pb")


def test_a_database_inherited_by_a_forked_child_refuses_every_use_there(path):
    db = pb.open(path)
    with db.transaction() as tx:
        tx["n"] = 1
    open_tx = db.transaction()
    open_tx["n"] = 2                      # written before the fork, committed by nobody
    size = os.path.getsize(path)

    def new_transaction():
        return db.transaction()["n"]

    def commit_inherited():
        open_tx.commit()

    def compact():
        return db.compact()

    def close_then_check():
        db.close()                        # abandoned: returns at once, writes nothing
        db.close()
        return repr(db)

    reports = []
    for body in (new_transaction, commit_inherited, compact):
        reports.append(_result(*_in_child(body)))
    closing = _result(*_in_child(close_then_check))
    for report in reports:
        assert _is_fork_error(report), report
    assert "abandoned" in closing["ok"], closing
    assert os.path.getsize(path) == size          # no child wrote a byte
    open_tx.commit()                              # the parent's own state is untouched
    with db.transaction() as tx:
        assert tx["n"] == 2
    assert db.check().problems == []
    db.close()


def test_an_idle_forked_child_does_not_keep_the_lock_after_the_parent_closes(path, child_env, child_cwd):
    db = pb.open(path)
    with db.transaction() as tx:
        tx["n"] = 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # idles until the parent says so
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    try:
        db.close()
        # Another process opens the path for writing while the child still lives.
        code = ("import protobase as pb, sys\n"
                "with pb.open(sys.argv[1]) as db, db.transaction() as tx:\n"
                "    tx['n'] += 1\n"
                "print('opened')\n")
        out = subprocess.run([sys.executable, "-c", code, path], env=child_env, cwd=child_cwd,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "opened"
        with pb.open(path) as again:                # and so does the parent itself
            with again.transaction() as tx:
                assert tx["n"] == 2
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)


def test_a_child_that_tries_to_commit_loses_none_of_the_parents_acknowledged_commits(path):
    db = pb.open(path, durability="normal")
    with db.transaction() as tx:
        tx["log"] = pb.List()

    def child_commits():
        refused = 0
        for i in range(50):
            try:
                with db.transaction() as tx:
                    tx["log"].append(("child", i))
            except pb.DatabaseClosedError as exc:
                assert "open after fork" in str(exc)
                refused += 1
        return refused

    pid, r = _in_child(child_commits)
    for i in range(200):
        with db.transaction() as tx:
            tx["log"].append(("parent", i))
    report = _result(pid, r)
    assert report == {"ok": 50}
    db.close()
    with pb.open(path) as again:
        with again.transaction() as tx:
            assert list(tx["log"]) == [("parent", i) for i in range(200)]
        assert again.check().problems == []


def test_a_child_opens_the_path_itself_after_fork(path):
    db = pb.open(path)
    with db.transaction() as tx:
        tx["n"] = 41

    def reopen():
        with pb.open(path, readonly=True) as mine, mine.transaction() as tx:
            return tx["n"]

    assert _result(*_in_child(reopen)) == {"ok": 41}
    with db.transaction() as tx:
        tx["n"] += 1
    db.close()


def test_read_only_and_in_memory_databases_are_abandoned_in_a_forked_child_too(path):
    with pb.open(path) as db, db.transaction() as tx:
        tx["n"] = 1
    ro = pb.open(path, readonly=True)
    mem = pb.open()
    reports = [_result(*_in_child(lambda d=d: d.transaction()["n"] if d is ro else
                                  d.transaction().get("n"))) for d in (ro, mem)]
    for report in reports:
        assert _is_fork_error(report), report
    with ro.transaction() as tx:
        assert tx["n"] == 1
    ro.close()
    mem.close()


_INHERITED = None


def _worker(queue):
    try:
        with _INHERITED.transaction() as tx:
            tx["n"] = -1
        queue.put(("committed", ""))
    except pb.DatabaseClosedError as exc:
        queue.put(("DatabaseClosedError", str(exc)))
    except BaseException as exc:
        queue.put((type(exc).__name__, str(exc)))


def test_multiprocessing_fork_workers_cannot_use_an_inherited_database(path):
    global _INHERITED
    ctx = multiprocessing.get_context("fork")
    _INHERITED = db = pb.open(path)
    try:
        with db.transaction() as tx:
            tx["n"] = 5
        queue = ctx.Queue()
        workers = [ctx.Process(target=_worker, args=(queue,)) for _ in range(2)]
        for p in workers:
            p.start()
        got = [queue.get(timeout=30) for _ in workers]
        for p in workers:
            p.join(timeout=30)
            assert p.exitcode == 0
        for kind, message in got:
            assert kind == "DatabaseClosedError" and "open after fork" in message, (kind, message)
        with db.transaction() as tx:
            tx["n"] += 1
        with db.transaction() as tx:
            assert tx["n"] == 6
    finally:
        _INHERITED = None
        db.close()


def test_reads_an_inherited_transaction_would_take_from_the_file_refuse_in_the_child(path):
    with pb.open(path) as db, db.transaction() as tx:
        tx["big"] = pb.Dict({i: f"value {i}" for i in range(5000)})
    db = pb.open(path)                     # fresh: nothing of "big" loaded yet
    tx = db.transaction()
    big = tx["big"]

    def read_unloaded():
        return [big[i] for i in range(0, 5000, 7)]

    report = _result(*_in_child(read_unloaded))
    assert _is_fork_error(report), report
    assert big[4999] == "value 4999"       # the parent reads on
    tx.abort()
    db.close()
