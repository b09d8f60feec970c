"""The `protobase` command: every subcommand, the dump format's round trip, and clean
one-line failures (never a traceback) for every mistake a user can make."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import protobase as pb
from protobase import cli
from protobase.cli import main

ROOT = Path(__file__).resolve().parent.parent
HEAD = '{"format":"protobase-dump","version":1,"root":0}\n'
ROOT_DECL = '{"collection":0,"kind":"Dict","indexes":[],"vector_indexes":{}}\n'


def _env():
    """Subprocesses import the same protobase as this test process (installed or built)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(pb.__file__))
    return env


_NEUTRAL = tempfile.mkdtemp(prefix="pb-cli-")   # `python -m` puts the cwd first on sys.path


def run_cli(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "protobase", *args], cwd=cwd or _NEUTRAL, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def make_db(path):
    with pb.open(path) as db, db.transaction() as tx:
        tx["products"] = pb.Dict({i: {"name": f"p{i}", "price": i % 7} for i in range(50)})
        tx["products"].create_index("price")
        tx["log"] = pb.List([1, 2, 3])
    return path


def odd_values():
    """Values JSON cannot hold as such: each must come back equal and of the same type."""
    return {
        "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "float": 0.1,
        "big": 2 ** 100, "neg": -(2 ** 70), "huge": -(3 ** 20000), "bytes": b"\x00\xff", "ba": bytearray(b"xy"),
        "tuple": (1, (2, "3")), "set": {1, 2}, "fset": frozenset({"a"}), "complex": 1 + 2j,
        "intkeys": {1: "a", (2, 3): "b"}, "dollar": {"$ref": 5, "$tuple": [1]},
        "aware": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=-5))),
        "naive": datetime(2026, 1, 2), "date": date(2020, 2, 29), "time": time(23, 59, 1),
        "td": timedelta(days=-1, seconds=5, microseconds=7), "dec": Decimal("1.10"),
        "frac": Fraction(1, 3), "uuid": uuid.UUID(int=12345), "none": None, "bool": True,
        "nested": [{"k": [b"", ()]}], "str": "ünïcode \n \"quoted\"",
    }


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def make_graph_db(path):
    with pb.open(path) as db, db.transaction() as tx:
        shared = pb.Set({"x", "y"})
        a, b = pb.Dict(), pb.Dict()
        tx["a"], tx["b"] = a, b
        a["peer"], b["peer"] = b, a                      # a cycle through two collections
        a["tags"] = shared
        b["tags"] = [shared, {"again": shared}]          # shared, also inside plain values
        tx["self"] = pb.List()
        tx["self"].append(tx["self"])                    # a collection holding itself
        tx["ranks"] = pb.SortedDict({(2, "b"): 1, (1, "a"): 2})
        tx["odd"] = odd_values()
        tx["products"] = pb.Dict({i: {"price": i % 5} for i in range(20)})
        tx["products"].create_index("price")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "msgpack"])
def test_dump_and_load_round_trip_identity_cycles_and_odd_values(tmp_path, fmt, capsys):
    src = make_graph_db(str(tmp_path / "src.pb"))
    dump = str(tmp_path / f"dump.{fmt}")
    assert main(["dump", src, "--format", fmt, "-o", dump]) == 0
    dst = str(tmp_path / "dst.pb")
    assert main(["load", dst, dump]) == 0
    with pb.open(dst) as db, db.transaction(readonly=True) as tx:
        a, b = tx["a"], tx["b"]
        assert a["peer"] is b and b["peer"] is a
        assert a["tags"] is b["tags"][0] is b["tags"][1]["again"]
        assert set(a["tags"]) == {"x", "y"}
        assert tx["self"][0] is tx["self"]
        assert type(tx["ranks"]) is pb.SortedDict and list(tx["ranks"]) == [(1, "a"), (2, "b")]
        assert_same(tx["odd"], odd_values())
        assert tx["products"].indexes == ["price"]
        q = tx["products"].where(pb.F.price == 3)
        assert sorted(q.keys()) == [3, 8, 13, 18] and "IndexedSearchPlan" in q.explain()
        assert db.stats()["collections"] == 7     # root, a, b, the shared set, self, ranks, products
    again = str(tmp_path / f"again.{fmt}")
    assert main(["dump", dst, "--format", fmt, "-o", again]) == 0
    assert Path(again).read_bytes() == Path(dump).read_bytes()
    capsys.readouterr()


def test_dump_and_load_keep_vector_indexes_and_arrays(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    pytest.importorskip("hnswlib")
    src = str(tmp_path / "src.pb")
    vecs = np.random.default_rng(5).normal(size=(60, 8)).astype(np.float32)
    with pb.open(src) as db, db.transaction() as tx:
        tx["docs"] = pb.Dict({i: {"tag": i % 2, "emb": vecs[i]} for i in range(60)})
        tx["docs"].create_vector_index("emb", dim=8, metric="cosine")
    dump, dst = str(tmp_path / "d.jsonl"), str(tmp_path / "dst.pb")
    assert main(["dump", src, "-o", dump]) == 0 and main(["load", dst, dump]) == 0
    with pb.open(dst) as db, db.transaction(readonly=True) as tx:
        docs = tx["docs"]
        assert docs.vector_indexes["emb"]["metric"] == "cosine"
        emb = docs[7]["emb"]
        assert emb.dtype == np.float32 and np.array_equal(emb, vecs[7])
        hits = docs.where(pb.F.tag == 1).nearest("emb", vecs[7], k=1)
        assert [k for k, _, _ in hits.scored()] == [7]
    capsys.readouterr()


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2 ** 70), st.floats(),
    st.text(max_size=5), st.binary(max_size=5), st.decimals(allow_nan=False),
    st.fractions(), st.uuids(), st.dates(), st.times(), st.timedeltas(),
    st.datetimes(timezones=st.sampled_from([None, timezone.utc, timezone(timedelta(hours=3))])),
    st.complex_numbers(allow_nan=False))
_keys = st.one_of(st.none(), st.integers(), st.text(max_size=4), st.binary(max_size=3),
                  st.tuples(st.integers(), st.text(max_size=2)))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner),
    st.dictionaries(st.text(max_size=3), inner, max_size=3),
    st.dictionaries(_keys, inner, max_size=3),
    st.frozensets(st.integers(), max_size=3)), max_leaves=8)


@settings(derandomize=True, max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(entries=st.dictionaries(_keys, _values, max_size=6), fmt=st.sampled_from(["jsonl", "msgpack"]))
def test_any_storable_value_survives_a_dump_and_load(tmp_path_factory, entries, fmt):
    d = tmp_path_factory.mktemp("rt")
    with pb.open(str(d / "src.pb"), durability="none") as db, db.transaction() as tx:
        tx["data"] = pb.Dict(entries)
        tx["sorted"] = pb.SortedDict({k: v for k, v in entries.items() if isinstance(k, int)})
    out = d / "dump"
    with pb.open(str(d / "src.pb"), readonly=True) as db, open(out, "wb") as f:
        cli.dump(db, f, fmt)
    with pb.open(str(d / "dst.pb"), durability="none") as db:
        with open(out, "rb") as f:
            cli.load(db, f)
        with db.transaction(readonly=True) as tx:
            got = tx["data"].copy()
            assert list(tx["sorted"]) == sorted(k for k in entries if isinstance(k, int))
    assert len(got) == len(entries)        # a pb.Dict is a hash trie: no insertion order
    for k in entries:
        assert_same(got[k], entries[k])


BAD_DUMPS = {
    "empty file": "",
    "not a dump": '{"hello": 1}\n',
    "future version": '{"format":"protobase-dump","version":99,"root":0}\n',
    "record not a map": HEAD + "[1]\n",
    "entry without value": HEAD + ROOT_DECL + '{"c":0,"k":"a"}\n',
    "undeclared reference": HEAD + ROOT_DECL + '{"c":0,"k":"a","v":{"$ref":7}}\n',
    "bad base64": HEAD + ROOT_DECL + '{"c":0,"k":"a","v":{"$bytes":"!!"}}\n',
    "bad codec bytes": HEAD + ROOT_DECL + '{"c":0,"k":"a","v":{"$codec":"wcHB"}}\n',
    "unknown tag": HEAD + ROOT_DECL + '{"c":0,"k":"a","v":{"$nope":1}}\n',
    "short timedelta": HEAD + ROOT_DECL + '{"c":0,"k":"a","v":{"$timedelta":[1]}}\n',
    "unknown kind": HEAD + '{"collection":0,"kind":"Bag"}\n',
    "wrong end count": HEAD + ROOT_DECL + '{"end":true,"collections":1,"entries":5}\n',
    "after the end": HEAD + ROOT_DECL + '{"end":true,"collections":1,"entries":0}\n{"c":0}\n',
    "not json": HEAD + "{oops\n",
}


@pytest.mark.parametrize("name", sorted(BAD_DUMPS))
def test_a_malformed_dump_is_refused_cleanly_and_leaves_no_database(tmp_path, capsys, name):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_DUMPS[name])
    dst = tmp_path / "dst.pb"
    assert main(["load", str(dst), str(bad), "--format", "jsonl"]) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("protobase: error:")
    assert not dst.exists()


def test_jsonl_dump_is_plain_json_lines_with_declarations_before_use(tmp_path, capsys):
    src = make_graph_db(str(tmp_path / "src.pb"))
    assert main(["dump", src]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"format": "protobase-dump", "version": 1, "root": 0}
    assert lines[-1]["end"] is True and lines[-1]["entries"] == sum("c" in r for r in lines)
    declared = set()
    for rec in lines:
        if "collection" in rec:
            declared.add(rec["collection"])
        refs = []

        def walk(v):
            if isinstance(v, dict):
                if "$ref" in v and len(v) == 1:
                    refs.append(v["$ref"])
                for x in v.values():
                    walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)
        walk({k: v for k, v in rec.items() if k in ("k", "v")})
        assert set(refs) <= declared and ("c" not in rec or rec["c"] in declared)
    odd = next(r["v"] for r in lines if r.get("k") == "odd")
    assert odd["nan"] == {"$float": "nan"} and odd["bytes"] == {"$bytes": "AP8="}
    assert odd["dollar"] == {"$dict": [["$ref", 5], ["$tuple", [1]]]}


def test_msgpack_dump_is_a_standard_messagepack_stream(tmp_path):
    msgpack = pytest.importorskip("msgpack")
    src = make_db(str(tmp_path / "src.pb"))
    out = str(tmp_path / "d.msgpack")
    assert main(["dump", src, "--format", "msgpack", "-o", out]) == 0
    with open(out, "rb") as f:
        records = list(msgpack.Unpacker(f, raw=False, strict_map_key=False))
    assert records[0]["format"] == "protobase-dump" and records[-1]["entries"] == 55


def test_load_refuses_a_truncated_dump_and_leaves_no_database(tmp_path, capsys):
    src = make_db(str(tmp_path / "src.pb"))
    dump = tmp_path / "d.jsonl"
    assert main(["dump", src, "-o", str(dump)]) == 0
    lines = dump.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:-1]))
    dst = tmp_path / "dst.pb"
    capsys.readouterr()
    assert main(["load", str(dst), str(cut)]) == 2
    assert "cut short" in capsys.readouterr().err
    assert not dst.exists()


def test_load_refuses_a_database_that_holds_data(tmp_path, capsys):
    src = make_db(str(tmp_path / "src.pb"))
    dump = str(tmp_path / "d.jsonl")
    assert main(["dump", src, "-o", dump]) == 0
    assert main(["load", src, dump]) == 2
    assert "already holds data" in capsys.readouterr().err
    with pb.open(src, readonly=True) as db, db.transaction() as tx:
        assert len(tx["products"]) == 50


def test_info_stats_check_compact_on_a_healthy_database(tmp_path, capsys):
    path = make_db(str(tmp_path / "db.pb"))
    for _ in range(5):
        with pb.open(path) as db, db.transaction() as tx:
            tx["products"][0] = {"name": "p0", "price": 1}
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "ProtoBase file format" in out and "'products': Dict of 50" in out
    assert "'log': List of 3" in out and "commits:     7" in out
    assert main(["stats", path]) == 0
    assert "file_size" in capsys.readouterr().out
    assert main(["check", path]) == 0
    assert ": ok" in capsys.readouterr().out
    before = os.path.getsize(path)
    assert main(["compact", path]) == 0
    assert os.path.getsize(path) < before
    with pb.open(path, readonly=True) as db, db.transaction() as tx:
        assert tx["products"][0] == {"name": "p0", "price": 1} and len(tx["products"]) == 50
    assert main(["check", path]) == 0


def _one_clean_error_line(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("protobase: error:"), r.stderr
    return lines[0]


def test_failures_are_one_line_and_nonzero_never_a_traceback(tmp_path):
    missing = str(tmp_path / "missing.pb")
    assert "no such file" in _one_clean_error_line(run_cli("info", missing))
    text = tmp_path / "notes.pb"
    text.write_text("not a database\n")
    assert "NotADatabaseError" in _one_clean_error_line(run_cli("check", str(text)))
    assert text.read_text() == "not a database\n"
    assert "no such file" in _one_clean_error_line(run_cli("load", str(tmp_path / "n.pb"), missing))
    r = run_cli("dump", str(text), "--format", "xml")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "invalid choice" in r.stderr
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is a directory" in _one_clean_error_line(run_cli("info", str(tmp_path)))


def test_a_locked_database_is_a_clean_error(tmp_path):
    path = make_db(str(tmp_path / "db.pb"))
    with pb.open(path):
        line = _one_clean_error_line(run_cli("compact", path))
        assert "DatabaseLockedError" in line
        r = run_cli("info", path)                      # read-only commands still work
        assert r.returncode == 0 and "'products'" in r.stdout


def test_check_exits_1_listing_the_problems_of_a_damaged_file(tmp_path):
    path = make_db(str(tmp_path / "db.pb"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:                       # damage committed data mid-file
        f.seek(size // 2)
        f.write(b"\xa5" * 64)
    r = run_cli("check", path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "problem" in r.stderr and "checksum" in r.stderr
    assert r.stdout == ""


def test_demo_runs_end_to_end_in_the_current_folder(tmp_path):
    r = run_cli("demo", cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "ConflictError" in out and "none lost" in out
    assert "AndMerge" in out and "IndexedSearchPlan" in out
    assert "every acknowledged commit is there" in out and "COMMITS LOST" not in out
    assert "5. check: ok" in out
    if importlib.util.find_spec("hnswlib") is not None:      # the vector step runs, exactly right
        assert "same as an exact numpy search" in out and "doc 5 (lang=en)" in out
    else:
        assert "3. hybrid vector search: skipped" in out
    assert (tmp_path / "protobase-demo.pb").exists()
    r = run_cli("check", "protobase-demo.pb", cwd=str(tmp_path))
    assert r.returncode == 0
    r = run_cli("demo", cwd=str(tmp_path), timeout=300)      # a rerun starts afresh
    assert r.returncode == 0 and "400 items in the carts (none lost)" in r.stdout, r.stderr


def test_demo_refuses_to_overwrite_a_database_it_did_not_make(tmp_path):
    path = make_db(str(tmp_path / "mine.pb"))
    line = _one_clean_error_line(run_cli("demo", path))
    assert "not the demo's" in line
    with pb.open(path, readonly=True) as db, db.transaction() as tx:
        assert len(tx["products"]) == 50


def test_mypy_passes_on_the_examples_and_the_typing_check(tmp_path):
    """Imports are followed into protobase (its annotations are what a user's mypy sees);
    pyproject.toml's [tool.mypy] makes the typing check strict, the package checked."""
    pytest.importorskip("mypy")
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                        "examples", "tests/typing_check.py", "protobase/cli.py"],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_reveals_the_documented_types_of_the_public_api(tmp_path):
    """Every `reveal_type(...)` line of tests/typing_reveal.py names the type mypy must
    reveal after `# revealed:` (no Any where the API knows better), with no error. Imports
    are followed (no --follow-imports=silent): the package's own annotations are checked."""
    pytest.importorskip("mypy")
    target = "tests/typing_reveal.py"
    expected = {}
    for n, line in enumerate((ROOT / target).read_text().splitlines(), 1):
        if line.lstrip().startswith("reveal_type("):
            expected[n] = line.split("# revealed: ", 1)[1].strip()
    assert len(expected) >= 35
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                        "--strict", target],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    revealed, errors = {}, []
    for line in r.stdout.splitlines():
        m = re.match(r'tests/typing_reveal\.py:(\d+): note: Revealed type is "(.*)"$', line)
        if m:
            revealed[int(m.group(1))] = m.group(2).replace("builtins.", "")   # mypy < 2 spells it
        elif ": error:" in line:
            errors.append(line)
    assert errors == [], r.stdout + r.stderr
    wrong = {n: (want, revealed.get(n)) for n, want in expected.items() if revealed.get(n) != want}
    assert wrong == {}, "line: (expected, revealed)"


# -- application classes: opaque unless trusted (API.md "Values" -> Trust) -----------------

APP_MODELS = '''
import dataclasses, enum, os
if os.environ.get("PB_IMPORT_MARK"):
    open(os.environ["PB_IMPORT_MARK"], "a").close()

@dataclasses.dataclass
class Point:
    x: int
    tags: set

class Color(enum.Enum):
    RED = "red"

@dataclasses.dataclass
class Basket:
    owner: str
    items: object          # a pb.List: a collection referenced from inside the instance
'''

APP_WRITER = """
import sys, protobase as pb, pbcli_models as m
with pb.open(sys.argv[1]) as db, db.transaction() as tx:
    tx["plain"] = {"n": 1}
    tx["point"] = m.Point(1, {"a", "b", "c", "d"})
    tx["color"] = m.Color.RED
    tx["rows"] = pb.Dict({i: {"at": m.Point(i, {str(i)}), "c": [m.Color.RED]} for i in range(20)})
    tx["basket"] = m.Basket("ana", pb.List(["tea", m.Point(9, set())]))
"""


@pytest.fixture
def app_db(tmp_path):
    """A database holding application classes; their module is importable only by the
    process that wrote it (and by the commands given its folder)."""
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "pbcli_models.py").write_text(APP_MODELS)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env["PYTHONPATH"]])
    path = str(tmp_path / "app.pb")
    r = subprocess.run([sys.executable, "-c", APP_WRITER, path], cwd=_NEUTRAL, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return path, folder


@pytest.mark.parametrize("fmt", ["jsonl", "msgpack"])
def test_dump_and_load_carry_application_class_payloads_byte_for_byte(app_db, tmp_path, fmt):
    src, _ = app_db
    dump_file, dst = str(tmp_path / f"d.{fmt}"), str(tmp_path / "copy.pb")
    r = run_cli("dump", src, "--format", fmt, "-o", dump_file)       # the classes are not importable
    assert r.returncode == 0, r.stderr
    r = run_cli("load", dst, dump_file)
    assert r.returncode == 0, r.stderr
    with pb.open(src, readonly=True) as a, pb.open(dst, readonly=True) as b, \
            a.transaction(readonly=True) as ta, b.transaction(readonly=True) as tb:
        for name in ("plain", "point", "color"):
            assert bytes(tb.root._struct()[name]) == bytes(ta.root._struct()[name])
        rows_a, rows_b = ta["rows"]._struct(), tb["rows"]._struct()
        assert sorted(rows_b.keys()) == list(range(20))
        for k in range(20):
            assert bytes(rows_b[k]) == bytes(rows_a[k])
    # The instance that refers to a collection: the reference now names the copy's list.
    script = """
import sys, protobase as pb, pbcli_models as m
with pb.open(sys.argv[1], readonly=True, trust=["pbcli_models"]) as db, db.transaction() as tx:
    b = tx["basket"]
    assert type(b) is m.Basket and b.owner == "ana"
    assert list(b.items) == ["tea", m.Point(9, set())], list(b.items)
    assert tx["point"] == m.Point(1, {"a", "b", "c", "d"})
print("ok")
"""
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(app_db[1]), env["PYTHONPATH"]])
    r = subprocess.run([sys.executable, "-c", script, dst], cwd=_NEUTRAL, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_info_and_dump_work_without_the_application_classes_importable(app_db):
    src, _ = app_db
    r = run_cli("info", src)
    assert r.returncode == 0, r.stderr
    assert "'point': Opaque" in r.stdout and "'basket': Opaque" in r.stdout
    r = run_cli("dump", src)
    assert r.returncode == 0, r.stderr
    assert '"$codec"' in r.stdout and "dumped 3 collections" in r.stderr


def test_trust_decodes_the_modules_classes_and_only_then_imports_it(app_db, tmp_path):
    src, folder = app_db
    mark = tmp_path / "imported.mark"
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env["PYTHONPATH"]])
    env["PB_IMPORT_MARK"] = str(mark)

    def cli_run(*args):
        return subprocess.run([sys.executable, "-m", "protobase", *args], cwd=_NEUTRAL, env=env,
                              capture_output=True, text=True, timeout=120)

    plain = cli_run("dump", src)
    assert plain.returncode == 0 and not mark.exists()       # importable, yet never imported
    info = cli_run("info", src, "--trust", "pbcli_models")
    assert info.returncode == 0, info.stderr
    assert "'point': Point" in info.stdout and "'basket': Basket" in info.stdout
    assert mark.exists()
    trusted = cli_run("dump", src, "--trust", "pbcli_models")
    assert trusted.returncode == 0 and "Warning" not in trusted.stderr, trusted.stderr
    # The same records, but for the order of a decoded set's members (str hashes differ by
    # process): only the 4-member set of "point" may be written in another order.
    a, b = plain.stdout.splitlines(), trusted.stdout.splitlines()
    assert len(a) == len(b)
    assert [x for x, y in zip(a, b) if x != y] in ([], [x for x in a if '"k":"point"' in x])
    missing = cli_run("dump", src, "--trust", "pbcli_no_such_module")
    assert missing.returncode != 0 and "pbcli_no_such_module" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_loading_a_codec_record_naming_a_stdlib_class_runs_no_code(tmp_path):
    import base64
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    name = b"tempfile:_TemporaryFileCloser"
    # {"file": <a closer with no file>, "name": target, "delete": True}: its __del__ unlinks.
    def obj(state: bytes) -> bytes:
        body = bytes([0x92, 0xd9, len(name)]) + name + state
        return bytes([0xc7, len(body), 18]) + body

    def s(text: str) -> bytes:
        b = text.encode()
        return bytes([0xd9, len(b)]) + b

    inner = obj(bytes([0x83]) + s("file") + b"\xc0" + s("name") + s("x") + s("delete") + b"\xc2")
    state = bytes([0x83]) + s("file") + inner + s("name") + s(str(target)) + s("delete") + b"\xc3"
    bomb = obj(state)
    assert len(bomb) < 256
    dump_text = (HEAD + ROOT_DECL + json.dumps({"c": 0, "k": "note", "v": {
        "$codec": base64.b64encode(bomb).decode()}}) + "\n"
        + '{"end":true,"collections":1,"entries":1}\n')
    dump_file = tmp_path / "crafted.jsonl"
    dump_file.write_text(dump_text)
    dst = str(tmp_path / "loaded.pb")
    r = run_cli("load", dst, str(dump_file))
    assert r.returncode == 0, r.stderr
    assert target.read_text() == "keep me"
    with pb.open(dst, readonly=True) as db, db.transaction(readonly=True) as tx:
        assert bytes(tx.root._struct()["note"]) == bomb        # carried, not decoded
    r = run_cli("info", dst)
    assert r.returncode == 0 and "'note': Opaque" in r.stdout
    assert target.read_text() == "keep me"
