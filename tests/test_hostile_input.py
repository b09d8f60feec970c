"""Bad input never crashes and always gets a typed error: values whose own code mutates the
container being stored, keys that are not keys, arguments out of range, dumps that are not
what they claim, a database path that is a symlink. Anything that could crash the
interpreter runs in a child process, so a segfault fails the test instead of killing pytest."""
import json
import os
import subprocess
import sys
import textwrap
from decimal import Decimal

import pytest

import protobase as pb
from protobase import F
from protobase.cli import main
from protobase.errors import InvalidArgumentError, QueryError, SerializationError


def run_child(code, child_env, child_cwd, timeout=60):
    """Run `code` in a fresh interpreter; returns its stdout lines. A signal exit (a crash)
    or any nonzero status fails the test with the child's stderr."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=child_cwd, env=child_env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"child exited with {r.returncode}:\n{r.stderr[-3000:]}"
    return r.stdout.splitlines()


# Each case builds `value` (its own code mutates a container inside it while it is encoded)
# and `expect`: "error" (a SerializationError naming the change) or bytes that must occur in
# the encoding (what the container held when the encoder took the item).
_PRELUDE = """
import json, sys
from protobase._core import load
from protobase.errors import SerializationError
codec = load("codec")
keep = []
def churn():
    # Reuse freed memory at once: small tuples, lists and dicts come from free lists.
    for _ in range(200):
        keep.append(("x", object()))
        keep.append(["y", object()])
        keep.append({"z": object()})
"""

_REPORT = """
try:
    out = codec.dumps(value)
except SerializationError as exc:
    print(json.dumps(["error", str(exc), exc.path, exc.type_name]))
except BaseException as exc:
    print(json.dumps(["untyped", type(exc).__name__, str(exc)]))
else:
    print(json.dumps(["ok", out.hex(), codec.dumps(expect).hex() if expect is not None else ""]))
"""

HOSTILE_VALUES = {
    "getstate shrinks the list": ("""
        class Evil:
            def __getstate__(self):
                del value[:]
                return {"a": 1}
        value = [Evil(), 1, 2, 3]
        expect = None
    """, "list", "value[0]"),
    "getstate grows the list": ("""
        class Evil:
            def __getstate__(self):
                value.extend(range(1000))
                return {"a": 1}
        value = [Evil(), 1]
        expect = None
    """, "list", "value[0]"),
    "getstate replaces the list being encoded": ("""
        class Evil:
            def __getstate__(self):
                value[0] = None          # the list holding self loses its last reference
                churn()
                return {"a": 1}
        value = [[Evil(), [7] * 40]]
        expect = [7] * 40
    """, None, None),
    "getstate replaces the dict value being encoded": ("""
        class Evil:
            def __getstate__(self):
                value["k"] = None
                churn()
                return {"a": 1}
        value = {"k": [Evil(), [7] * 40]}
        expect = [7] * 40
    """, None, None),
    "getstate deletes the dict entry being encoded": ("""
        class Evil:
            def __getstate__(self):
                del value[next(iter(value))]     # the entry whose key holds self
                churn()
                return {"a": 1}
        value = {(Evil(), "key"): [7] * 40, "other": 1}
        expect = None
    """, "dict", "value.keys()[0]"),
    "getstate grows the dict": ("""
        class Evil:
            def __getstate__(self):
                value.update((i, i) for i in range(1000))
                return {"a": 1}
        value = {"k": Evil(), "j": 2}
        expect = None
    """, "dict", "value['k']"),
    "getstate swaps dict keys at the same size": ("""
        class Evil:
            def __getstate__(self):
                del value["k"]
                value["k"] = 1           # re-inserted at the end: iteration would see it twice
                return {"a": 1}
        value = {"k": 1, "j": Evil()}
        expect = None
    """, "dict", None),
    "getstate changes the set": ("""
        class Evil:
            def __getstate__(self):
                value.update(range(1000))
                return {"a": 1}
        value = {Evil(), "m"}
        expect = None
    """, "set", None),
    "getstate changes the instance dict being encoded": ("""
        class Evil:
            def __getstate__(self):
                holder.__dict__.clear()
                churn()
                return {"a": 1}
        class Holder:
            pass
        holder = Holder()
        holder.first = [Evil(), [7] * 40]
        holder.second = [8] * 40
        value = holder
        expect = None
    """, "dict", "value.first"),
    "metaclass hash clears the list": ("""
        class Meta(type):
            def __hash__(cls):
                del value[:]
                return 1
            def __eq__(cls, other):
                return cls is other
        class Odd(metaclass=Meta):
            pass
        value = [Odd(), 1, 2, 3]
        expect = None
    """, "list", "value[0]"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_VALUES))
def test_a_value_that_mutates_its_container_while_stored_never_crashes(name, child_env, child_cwd):
    body, container, path = HOSTILE_VALUES[name]
    [line] = run_child(_PRELUDE + textwrap.dedent(body) + _REPORT, child_env, child_cwd)
    outcome = json.loads(line)
    assert outcome[0] != "untyped", outcome
    if outcome[0] == "ok":
        # The encoder kept hold of what it had taken: the payload is intact, never a
        # freed-and-reused object's contents.
        assert container is None, outcome
        assert outcome[2] and outcome[2] in outcome[1], outcome
        return
    _, message, got_path, type_name = outcome
    assert container is not None, outcome
    assert f"{container} changed" in message and "while it was being stored" in message
    assert type_name == container
    if path is not None:
        assert got_path == path, outcome
