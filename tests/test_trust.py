"""The trust model for stored classes (API.md "Values" -> Trust): a reader builds instances
only of classes registered with pb.register_class, classes its own process stored, and
classes of the modules it names with pb.open(trust=[...]). Nothing in a file makes it import
a module. Writers and readers here are separate processes, as they are in the field: a
class stored by the test process itself would be trusted for that reason alone."""
import dataclasses
import enum
import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest

import protobase as pb
from protobase.errors import DecodeError, InvalidArgumentError

# A module of application classes, written into a folder the children put on sys.path.
# Importing it leaves a mark file, so a test can tell whether a reader imported it.
MODELS = '''
import collections, dataclasses, enum, os
if os.environ.get("PB_IMPORT_MARK"):
    open(os.environ["PB_IMPORT_MARK"], "a").close()

@dataclasses.dataclass
class Point:
    x: int
    y: int

class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"

Pair = collections.namedtuple("Pair", "a b")

class Plain:
    def __init__(self, v):
        self.v = v
    def __eq__(self, other):
        return type(other) is Plain and other.v == self.v
'''


def _run(code, env, cwd, *args, check=True):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def models(tmp_path, child_env):
    """A folder holding pbtrust_models.py, on the children's sys.path."""
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "pbtrust_models.py").write_text(MODELS)
    child_env["PYTHONPATH"] = os.pathsep.join([str(folder), child_env["PYTHONPATH"]])
    return folder


def _store_models(path, env, cwd):
    _run("""
        import sys, protobase as pb, pbtrust_models as m
        with pb.open(sys.argv[1]) as db, db.transaction() as tx:
            tx["point"] = m.Point(1, 2)
            tx["color"] = m.Color.BLUE
            tx["pair"] = m.Pair(3, [4])
            tx["plain"] = m.Plain({"k": 5})
            tx["rows"] = pb.Dict({i: {"n": i, "at": m.Point(i, -i)} for i in range(5)})
    """, env, cwd, path)


# ------------------------------------------------------------------ a crafted file runs nothing

# The writer stores a tempfile._TemporaryFileCloser whose __del__ would delete `target`
# (its `file` is a second closer with nothing to close), then disarms its own copy.
CRAFT = """
import sys, tempfile, protobase as pb
inner = tempfile._TemporaryFileCloser(None, "unused", delete=False)
bomb = tempfile._TemporaryFileCloser(inner, sys.argv[2], delete=True)
with pb.open(sys.argv[1]) as db, db.transaction() as tx:
    tx["note"] = pb.Dict({"text": "hello", "attachment": bomb})
    tx["title"] = "harmless"
bomb.close_called = True       # the stored bytes are taken: do not fire in the writer
"""

READ_CRAFTED = """
import gc, sys, protobase as pb
with pb.open(sys.argv[1], readonly=True) as db, db.transaction(readonly=True) as tx:
    assert tx["title"] == "harmless"
    note = tx["note"]
    assert note["text"] == "hello"
    try:
        note["attachment"]
    except pb.DecodeError as exc:
        print("DecodeError:", exc)
    else:
        print("decoded")
gc.collect()
print("tempfile imported:", "tempfile" in sys.modules)
"""


def test_a_crafted_file_naming_a_stdlib_class_is_a_decode_error_and_deletes_nothing(
        tmp_path, child_env, child_cwd):
    db_path, target = tmp_path / "crafted.pb", tmp_path / "precious.txt"
    target.write_text("keep me")
    _run(CRAFT, child_env, child_cwd, db_path, target)
    assert target.exists(), "the writer itself must not have fired the closer"
    out = _run(READ_CRAFTED, child_env, child_cwd, db_path).stdout
    assert "DecodeError:" in out and "tempfile:_TemporaryFileCloser" in out
    assert "register_class" in out and "trust=" in out
    assert "tempfile imported: False" in out          # the name in the file imported nothing
    assert target.read_text() == "keep me"


def test_reading_a_class_of_an_importable_module_never_imports_it(tmp_path, models, child_env,
                                                                  child_cwd):
    db_path, mark = tmp_path / "app.pb", tmp_path / "imported.mark"
    _store_models(db_path, child_env, child_cwd)
    child_env["PB_IMPORT_MARK"] = str(mark)
    out = _run("""
        import sys, protobase as pb
        with pb.open(sys.argv[1], readonly=True) as db, db.transaction(readonly=True) as tx:
            for name in ("point", "color", "pair", "plain"):
                try:
                    tx[name]
                    print(name, "decoded")
                except pb.DecodeError as exc:
                    print(name, "DecodeError", exc)
        with pb.open(sys.argv[1]) as db, db.transaction() as tx:
            try:
                tx["rows"].create_index("at")    # an index build decodes a field of each row
                print("index built")
            except pb.DecodeError:
                print("index DecodeError")
        print("module imported:", "pbtrust_models" in sys.modules)
    """, child_env, child_cwd, db_path).stdout
    for name in ("point", "color", "pair", "plain"):
        assert f"{name} DecodeError" in out, out
    assert "pbtrust_models:Point" in out and "trust=['pbtrust_models']" in out
    assert "index DecodeError" in out
    assert "module imported: False" in out
    assert not mark.exists()


# ------------------------------------------------------------------ what a reader can trust

def test_trust_admits_the_named_modules_classes_of_every_kind(tmp_path, models, child_env,
                                                              child_cwd):
    db_path = tmp_path / "app.pb"
    _store_models(db_path, child_env, child_cwd)
    out = _run("""
        import sys, protobase as pb
        with pb.open(sys.argv[1], readonly=True, trust=["pbtrust_models"]) as db:
            import pbtrust_models as m
            with db.transaction(readonly=True) as tx:
                assert tx["point"] == m.Point(1, 2)
                assert tx["color"] is m.Color.BLUE
                assert tx["pair"] == m.Pair(3, [4]) and type(tx["pair"]) is m.Pair
                assert tx["plain"] == m.Plain({"k": 5})
                assert [r["at"] for r in tx["rows"].values()] == [m.Point(i, -i) for i in range(5)]
        print("ok")
    """, child_env, child_cwd, db_path).stdout
    assert out.strip() == "ok"


def test_trust_is_per_database_not_for_the_whole_process(tmp_path, models, child_env, child_cwd):
    db_path = tmp_path / "app.pb"
    _store_models(db_path, child_env, child_cwd)
    out = _run("""
        import sys, protobase as pb
        trusting = pb.open(sys.argv[1], readonly=True, trust=["pbtrust_models"])
        other = pb.open(sys.argv[1], readonly=True)
        with trusting.transaction(readonly=True) as tx:
            assert tx["point"].x == 1
        with other.transaction(readonly=True) as tx:
            try:
                tx["point"]
                print("decoded")
            except pb.DecodeError:
                print("refused")
    """, child_env, child_cwd, db_path).stdout
    assert out.strip() == "refused"


def test_a_missing_trusted_module_is_an_error_at_open_and_creates_nothing(tmp_path):
    path = tmp_path / "never.pb"
    with pytest.raises(InvalidArgumentError, match="pbtrust_no_such_module") as exc:
        pb.open(path, trust=["pbtrust_no_such_module"])
    assert "sys.path" in str(exc.value)
    assert not path.exists()
    with pytest.raises(TypeError, match=r"trust=\['myapp'\]"):
        pb.open(path, trust="myapp")          # a str would be taken letter by letter


def test_a_registered_class_round_trips_across_processes_and_an_unregistered_name_says_how(
        tmp_path, models, child_env, child_cwd):
    db_path = tmp_path / "reg.pb"
    _run("""
        import sys, protobase as pb, pbtrust_models as m
        pb.register_class(m.Point, "trial.Point")
        with pb.open(sys.argv[1]) as db, db.transaction() as tx:
            tx["p"] = m.Point(7, 8)
    """, child_env, child_cwd, db_path)
    out = _run("""
        import sys, protobase as pb, pbtrust_models as m
        pb.register_class(m.Point, "trial.Point")
        with pb.open(sys.argv[1], readonly=True) as db, db.transaction(readonly=True) as tx:
            p = tx["p"]
            assert type(p) is m.Point and p == m.Point(7, 8)
        print("ok")
    """, child_env, child_cwd, db_path).stdout
    assert out.strip() == "ok"
    out = _run("""
        import sys, protobase as pb
        with pb.open(sys.argv[1], readonly=True) as db, db.transaction(readonly=True) as tx:
            try:
                tx["p"]
            except pb.DecodeError as exc:
                print(exc)
    """, child_env, child_cwd, db_path).stdout
    assert "'trial.Point'" in out and "not registered in this process" in out
    assert "pb.register_class(cls, 'trial.Point')" in out and "malformed" not in out


def test_a_class_this_process_stored_reads_back_without_registration():
    mod = types.ModuleType("pbtrust_local")
    sys.modules[mod.__name__] = mod
    try:
        exec("import dataclasses\n@dataclasses.dataclass\nclass Item:\n    n: int\n", mod.__dict__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pb.open() as db:
                with db.transaction() as tx:
                    tx["i"] = mod.Item(3)
                with db.transaction() as tx:
                    assert tx["i"] == mod.Item(3)
    finally:
        del sys.modules[mod.__name__]


@pytest.mark.parametrize("name", ["trial Point", "a:b:c", "1app.Point", ":Point", "app.",
                                  "app..Point", "app:", "app:Point.", "app-x.Point"])
def test_register_class_refuses_a_name_of_no_allowed_form(name):
    class Thing:
        pass
    with pytest.raises(InvalidArgumentError) as exc:
        pb.register_class(Thing, name)
    assert repr(name) in str(exc.value) and "'module:qualname'" in str(exc.value)


def test_register_class_accepts_dotted_and_module_qualname_names():
    class Thing:
        pass
    for name in ("pbtrust_ok.Thing", "pbtrust_ok.models:Outer.Thing", "Thing_pbtrust"):
        pb.register_class(Thing, name)


# ------------------------------------------------------------------ the writer is told

def test_storing_an_unregistered_class_warns_once_per_class():
    mod = types.ModuleType("pbtrust_warn")
    sys.modules[mod.__name__] = mod
    try:
        exec("import dataclasses, enum\n"
             "@dataclasses.dataclass\nclass A:\n    n: int\n"
             "class B(enum.Enum):\n    X = 1\n"
             "class C:\n    pass\n", mod.__dict__)
        pb.register_class(mod.C, "pbtrust_warn.C")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pb.open() as db:
                for i in range(3):
                    with db.transaction() as tx:
                        tx[f"a{i}"] = mod.A(i)
                        tx[f"b{i}"] = [mod.B.X, mod.B.X]
                        tx[f"c{i}"] = mod.C()
        texts = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        assert len(texts) == 2, texts
        a, b = texts
        assert "pbtrust_warn.A" in a and "pbtrust_warn.B" in b
        for t in texts:
            assert "pb.register_class" in t and "trust=['pbtrust_warn']" in t
    finally:
        del sys.modules[mod.__name__]


def test_a_database_that_trusts_the_module_stores_its_classes_without_a_warning():
    mod = types.ModuleType("pbtrust_quiet")
    sys.modules[mod.__name__] = mod
    try:
        exec("class Q:\n    pass\n", mod.__dict__)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pb.open(trust=["pbtrust_quiet"]) as db, db.transaction() as tx:
                tx["q"] = mod.Q()
        assert not [w for w in caught if issubclass(w.category, UserWarning)]
    finally:
        del sys.modules[mod.__name__]


def test_a_class_of_a_script_warns_unless_registered(tmp_path, child_env, child_cwd):
    script = """
        import dataclasses, sys, protobase as pb
        @dataclasses.dataclass
        class Note:
            text: str
        @dataclasses.dataclass
        class Known:
            text: str
        pb.register_class(Known, "notes.Known")
        with pb.open(sys.argv[1], trust=["__main__"]) as db, db.transaction() as tx:
            tx["a"] = Note("a")
            tx["b"] = Note("b")
            tx["k"] = Known("k")
    """
    err = _run(script, child_env, child_cwd, tmp_path / "s.pb").stderr
    assert err.count("UserWarning") == 1, err
    assert "__main__.Note" in err and "pb.register_class(Note" in err and "Known" not in err
