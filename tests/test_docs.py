"""The user docs (README.md, docs/*.md) against the code: the README's quickstart runs and
prints what the README shows, docs/api.md is what docs/gen_api.py generates from today's
docstrings, and the user docs stand alone (no pointers into files users do not have) and
say what users trip over."""
import os
import re
import subprocess
import sys
from pathlib import Path

import protobase as pb

ROOT = Path(__file__).resolve().parent.parent
HOME = os.path.dirname(os.path.dirname(os.path.abspath(pb.__file__)))
USER_DOCS = ["README.md", "docs/api.md", "docs/durability.md", "docs/performance.md",
             "docs/format.md"]


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=str(cwd), capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=HOME))


def test_readme_quickstart_runs_and_prints_what_the_readme_shows(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    code, shown = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[:2]
    (tmp_path / "quickstart.py").write_text(code)
    out = _run(["quickstart.py"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == shown


def test_api_reference_is_generated_from_the_current_docstrings():
    out = _run([str(ROOT / "docs" / "gen_api.py"), "--check"], ROOT)
    assert out.returncode == 0, out.stderr


def test_user_docs_name_no_file_users_do_not_have():
    for name in USER_DOCS:
        text = (ROOT / name).read_text()
        for private in ("DESIGN.md", "plans.py", "shared/"):
            assert private not in text, f"{name} points at {private}"


def test_user_docs_say_what_users_trip_over():
    api = " ".join((ROOT / "docs" / "api.md").read_text().split())
    assert "Values are copies" in api and "write it back" in api
    assert "`F.x != v`" in api and "`~(F.x == v)`" in api
    assert "squared Euclidean" in api and "1 − dot" in api and "1 − cosine" in api
    assert "-vec-" in api and ".hnsw" in api and ".compact" in api and "lock file" in api
    durability = " ".join((ROOT / "docs" / "durability.md").read_text().split())
    assert "db.checkpoint()" in durability
    assert durability.count("refresh()") == 1 and "There is no `refresh()` to call" in durability
    readme = (ROOT / "README.md").read_text()
    assert "protobase.build_info.MODE" in readme


def test_every_database_method_a_doc_calls_exists():
    """`db.name(` in a user doc is a method of Database (checkpoint() and refresh() were
    promised once without existing)."""
    for name in USER_DOCS:
        for method in set(re.findall(r"\bdb\.(\w+)\(", (ROOT / name).read_text())):
            assert hasattr(pb.Database, method), f"{name} calls db.{method}(), which does not exist"
