"""What `protobase info`, `stats` and `check` report, in text and as JSON; the paths they
refuse (a FIFO, a directory, a device); `--version`, `--help` of every argument, and dump's
refusal to send MessagePack to a terminal (checked on a real pty)."""
import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile

import pytest

import protobase as pb
from protobase import cli
from protobase.cli import main

_NEUTRAL = tempfile.mkdtemp(prefix="pb-cli-reports-")   # `python -m` puts the cwd on sys.path


def run_cli(*args, stdout=subprocess.PIPE, timeout=60):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(pb.__file__)))
    return subprocess.run([sys.executable, "-m", "protobase", *args], cwd=_NEUTRAL, env=env,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout)


def _commits(path, n):
    """A database made by n commits in one writer; returns what that writer's stats said."""
    with pb.open(path) as db:
        with db.transaction() as tx:
            tx["carts"] = pb.Dict()
            tx["tags"] = pb.Set({"a", "b"})
            tx["log"] = pb.List()
        for i in range(n - 1):
            with db.transaction() as tx:
                tx["carts"][f"u{i}"] = i
                tx["log"].append(i)
        with db.transaction() as tx:
            tx["carts"].create_index("x")
        return db.stats()


def _json(capsys, *argv, status=0):
    assert main(list(argv)) == status
    return json.loads(capsys.readouterr().out)


def test_stats_shows_the_files_own_figures_not_the_fresh_opens_counters(tmp_path, capsys):
    path = str(tmp_path / "shop.pb")
    writer = _commits(path, 40)
    doc = _json(capsys, "stats", "--json", path)
    assert doc["commits"] == writer["sequence"] >= 41          # the fresh open made none
    assert doc["file_size"] == os.path.getsize(path) >= writer["file_size"]   # close adds a mark
    assert 0 < doc["bytes_to_last_commit"] <= doc["file_size"]
    assert doc["collections"] == writer["collections"] == 4
    assert doc["collections_by_kind"] == {"Dict": 2, "SortedDict": 0, "List": 1, "Set": 1}
    assert doc["entries_by_kind"] == {"Dict": 3 + 39, "SortedDict": 0, "List": 39, "Set": 2}
    assert doc["root_names"] == 3 and doc["indexes"] == 1 and doc["empty"] is False
    assert main(["stats", path]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["commits"] == str(writer["sequence"]) and lines["root_names"] == "3"


def test_info_and_check_report_the_same_commits_as_json(tmp_path, capsys):
    path = str(tmp_path / "shop.pb")
    writer = _commits(path, 5)
    info = _json(capsys, "info", "--json", path)
    assert info["commits"] == writer["sequence"] and info["empty"] is False
    assert {(e["name"], e["kind"], e["size"]) for e in info["root_names"]} == {
        ("carts", "Dict", 4), ("tags", "Set", 2), ("log", "List", 4)}
    check = _json(capsys, "check", "--json", path)
    assert check["ok"] is True and check["problems"] == [] and check["commits"] >= 6


def test_check_json_lists_the_problems_of_a_damaged_file_and_exits_1(tmp_path, capsys):
    path = str(tmp_path / "shop.pb")
    _commits(path, 5)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xa5" * 64)
    doc = _json(capsys, "check", "--json", path, status=1)
    assert doc["ok"] is False and doc["problems"]
    assert all("message" in p and "offset" in p for p in doc["problems"])


def test_info_on_an_empty_file_says_there_is_no_database_yet(tmp_path, capsys):
    path = tmp_path / "new.pb"
    path.write_bytes(b"")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "empty: no database yet" in out and "format:" not in out and "commits:" not in out
    assert _json(capsys, "info", "--json", str(path))["empty"] is True
    assert _json(capsys, "stats", "--json", str(path))["empty"] is True
    assert main(["check", str(path)]) == 0
    assert "empty: no database yet" in capsys.readouterr().out
    assert path.read_bytes() == b"" and os.listdir(tmp_path) == ["new.pb"]


@pytest.mark.parametrize("command", ["info", "stats", "check"])
def test_a_fifo_a_directory_and_dev_null_are_not_a_database_at_once(tmp_path, command):
    fifo = tmp_path / "pipe.pb"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for path, what in [(fifo, "FIFO"), (folder, "directory"), ("/dev/null", "device")]:
        r = run_cli(command, str(path))                  # a blocking open fails by timeout
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert lines[0].startswith("protobase: error: NotADatabaseError") and what in lines[0]
        assert r.stdout == ""
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(folder) == []
    assert sorted(os.listdir(tmp_path)) == ["folder", "pipe.pb"]


def test_version_prints_the_package_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"protobase {pb.__version__}"


def test_every_argument_of_every_command_has_a_description():
    parser = cli._parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subparsers) == 1
    commands = subparsers[0].choices
    assert set(commands) >= {"demo", "info", "check", "compact", "stats", "dump", "load"}
    missing = [(name, action.dest) for name, sub in [("protobase", parser), *commands.items()]
               for action in sub._actions
               if not isinstance(action, argparse._SubParsersAction)
               and not (action.help and action.help.strip())]
    assert missing == []
    for name in ("info", "stats", "check"):
        assert "--json" in commands[name].format_help()


def test_dump_refuses_to_write_messagepack_to_a_terminal(tmp_path):
    path = str(tmp_path / "shop.pb")
    _commits(path, 3)
    leader, follower = os.openpty()
    try:
        r = run_cli("dump", path, "--format", "msgpack", stdout=follower)
        os.set_blocking(leader, False)
        try:
            shown = os.read(leader, 65536)
        except BlockingIOError:
            shown = b""
    finally:
        os.close(follower)
        os.close(leader)
    assert r.returncode == 2 and shown == b""
    line = r.stderr.strip()
    assert line.startswith("protobase: error:") and "terminal" in line and "-o" in line
    piped = subprocess.run([sys.executable, "-m", "protobase", "dump", path, "--format", "msgpack"],
                           cwd=_NEUTRAL, capture_output=True, timeout=60,
                           env=dict(os.environ,
                                    PYTHONPATH=os.path.dirname(os.path.dirname(pb.__file__))))
    assert piped.returncode == 0 and piped.stdout[:1] != b"{" and len(piped.stdout) > 50


def test_dump_writes_json_lines_to_a_terminal(tmp_path):
    path = str(tmp_path / "shop.pb")
    _commits(path, 3)
    leader, follower = os.openpty()
    try:
        r = run_cli("dump", path, stdout=follower)
        os.set_blocking(leader, False)
        shown = os.read(leader, 65536)
    finally:
        os.close(follower)
        os.close(leader)
    assert r.returncode == 0 and b'"format":"protobase-dump"' in shown


def test_info_reports_the_file_s_own_format_and_identity(tmp_path, capsys):
    import shutil
    import uuid
    v1 = tmp_path / "old.pb"
    shutil.copy(os.path.join(os.path.dirname(__file__), "data", "format1.pb"), v1)
    old = _json(capsys, "info", "--json", str(v1))
    assert old["format"] == 1 and old["database_id"] is None
    path = str(tmp_path / "shop.pb")
    _commits(path, 2)
    new = _json(capsys, "info", "--json", path)
    assert new["format"] == 2 and uuid.UUID(new["database_id"]).version == 4
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "file format 2" in out and new["database_id"] in out
