"""Signals that land in a commit: the caller is interrupted, the
write is not (DESIGN.md "Interrupts").

CPython runs a Python signal handler (the one raising KeyboardInterrupt, or a SIGTERM
handler calling sys.exit) on the main thread only, and only at its "signal points": on
entering a Python function, right after a call returns, and on a backward jump.
``SignalPoint`` finds those points with an opcode trace of the main thread's frames inside
protobase and raises KeyboardInterrupt at the k-th one, so a test can land a signal at
every point of a commit in turn: a deterministic sweep of the windows a real signal can
hit."""
import dis
import os
import sys
import threading

import pytest

import protobase as pb

_PKG = os.path.dirname(os.path.abspath(pb.__file__))
_AFTER = {dis.opmap[n] for n in ("CALL", "CALL_FUNCTION_EX", "JUMP_BACKWARD") if n in dis.opmap}
TIMEOUT = 20


class SignalPoint:
    """``with SignalPoint(k):`` raises KeyboardInterrupt at the k-th signal point of the
    main thread inside protobase (k=None: only count them, in ``n``)."""

    def __init__(self, at=None):
        self.at = at
        self.n = 0
        self.hit = None

    def __enter__(self):
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)
        return False

    def _call(self, frame, event, arg):
        if not frame.f_code.co_filename.startswith(_PKG):
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        prev = [None]

        def local(frame, event, arg):
            if event != "opcode":
                return local
            before, prev[0] = prev[0], frame.f_code.co_code[frame.f_lasti]
            if before is None or before in _AFTER:
                self.n += 1
                if self.n == self.at:
                    self.hit = f"{frame.f_code.co_qualname} line {frame.f_lineno}"
                    raise KeyboardInterrupt(self.hit)
            return local
        return local


def _in_thread(fn, what):
    """Run fn on another thread (where no signal lands) and fail, rather than hang, if it
    does not return within TIMEOUT."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:       # reported below
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(TIMEOUT)
    assert not t.is_alive(), f"{what} hung"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _put(db, key):
    with db.transaction() as tx:
        tx["d"][key] = len(key)


def _keys(db):
    with db.transaction(readonly=True) as tx:
        return set(tx["d"])


def _reopened_keys(path):
    with pb.open(path) as db:
        assert db.check().problems == []
        return _keys(db)


def _count(fn):
    with SignalPoint() as sp:
        fn()
    assert sp.n > 20, sp.n
    return sp.n


@pytest.mark.parametrize("mode", ["normal", "none", "full"])
def test_a_signal_at_any_point_of_a_commit_loses_nothing_acknowledged_and_holds_nothing(
        tmp_path, mode):
    path = str(tmp_path / f"sweep-{mode}.pb")
    db = pb.open(path, durability=mode)
    with db.transaction() as tx:
        tx["d"] = pb.Dict()
    acked = set()
    n = _count(lambda: _put(db, "probe"))
    acked.add("probe")
    interrupted = []
    for k in range(1, n + 1):
        key = f"k{k}"
        sp = SignalPoint(k)
        try:
            with sp:
                _put(db, key)
            acked.add(key)
        except KeyboardInterrupt:
            interrupted.append(sp.hit)
        # Nothing is left held: another thread commits, and sees every acknowledged key.
        _in_thread(lambda: _put(db, f"after{k}"), f"a commit after a signal at {sp.hit}")
        acked.add(f"after{k}")
        seen = _in_thread(lambda: _keys(db), "a read")
        assert acked <= seen, (sp.hit, acked - seen)
    assert len(interrupted) > n // 2
    _in_thread(db.close, "close")
    assert acked <= _reopened_keys(path)


def test_an_interrupted_write_in_normal_mode_keeps_the_commits_acknowledged_before_it(tmp_path):
    """Item 2 of issue 14: the file used to be cut back to the last fsync."""
    path = str(tmp_path / "cut.pb")
    db = pb.open(path, durability="normal")
    with db.transaction() as tx:
        tx["d"] = pb.Dict()
    db._store.checkpoint()
    for i in range(50):
        _put(db, f"acked{i}")
    writer = db._store._writer
    target = writer._write_group.__code__
    hit = []

    def tracer(frame, event, arg):
        if frame.f_code is not target:
            return None
        frame.f_trace_opcodes = True

        def local(frame, event, arg):
            # Land the signal right after the bytes went to the OS (file.write returned).
            if event == "opcode" and not hit and "write" in frame.f_locals and "n" in frame.f_locals:
                hit.append(frame.f_lineno)
                raise KeyboardInterrupt
            return local
        return local
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            _put(db, "interrupted")
    finally:
        sys.settrace(None)
    assert hit
    keys = _keys(db)
    assert {f"acked{i}" for i in range(50)} <= keys
    _put(db, "later")
    db.close()
    assert {f"acked{i}" for i in range(50)} | {"later"} <= _reopened_keys(path)
