"""`protobase load` refuses a hostile or malformed dump with one clear line and a non-zero
exit: deeply nested JSON, a list (or another unhashable value) used as a key, a value too
deep to store. Never a traceback, and no half-made database is left behind."""
import os
import subprocess
import sys
import tempfile

import pytest

import protobase as pb

HEAD = '{"format":"protobase-dump","version":1,"root":0}\n'
ROOT_DECL = '{"collection":0,"kind":"Dict","indexes":[],"vector_indexes":{}}\n'
SET_DECL = '{"collection":1,"kind":"Set","indexes":[],"vector_indexes":{}}\n'
SET_REF = '{"c":0,"k":"s","v":{"$ref":1}}\n'
_NEUTRAL = tempfile.mkdtemp(prefix="pb-cli-load-")


def _run(tmp_path, body, end='{"end":true,"collections":2,"entries":2}\n'):
    dump = tmp_path / "in.jsonl"
    dump.write_text(HEAD + ROOT_DECL + SET_DECL + SET_REF + body + end)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(pb.__file__))
    target = tmp_path / "out.pb"
    r = subprocess.run([sys.executable, "-m", "protobase", "load", str(target), str(dump)],
                       cwd=_NEUTRAL, env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode != 0
    assert not target.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("protobase: error:"), r.stderr
    return lines[0]


@pytest.mark.parametrize("depth", [3000, 200000])
def test_load_refuses_deeply_nested_json_with_one_line(tmp_path, depth):
    line = _run(tmp_path, '{"c":0,"k":"x","v":' + "[" * depth + "]" * depth + "}\n")
    assert "line 5" in line and "nests" in line and "1000 levels" in line


@pytest.mark.parametrize("record", [
    '{"c":0,"k":[1,2],"v":1}\n',
    '{"c":1,"k":[1,2]}\n',
    '{"c":0,"k":{"$tuple":[[1]]},"v":1}\n',
    '{"c":0,"k":{"a":1},"v":1}\n',
], ids=["dict-key-list", "set-member-list", "tuple-holding-list", "dict-key-map"])
def test_load_refuses_an_unhashable_key_naming_the_line_and_the_allowed_keys(tmp_path, record):
    line = _run(tmp_path, record)
    assert "line 5" in line and "key" in line and "str" in line
