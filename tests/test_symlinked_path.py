"""A database opened through a symbolic link lives in the file the link names.

The path is resolved at open (os.path.realpath): compaction replaces the real file (the
link stays a link and keeps naming the live database), side files (vector checkpoints,
the compaction's temporary file) sit beside the real file, and db.path reports the real
path."""
import glob
import os

import pytest

import protobase as pb


@pytest.fixture
def linked(tmp_path):
    real_dir, link_dir = tmp_path / "real", tmp_path / "links"
    real_dir.mkdir()
    link_dir.mkdir()
    real = str(real_dir / "data.pb")
    link = str(link_dir / "data.pb")
    os.symlink(real, link)
    return real, link


def test_compacting_through_a_symlink_replaces_the_real_file_and_keeps_the_link(linked):
    real, link = linked
    with pb.open(link) as db:
        assert db.path == real
        for i in range(50):
            with db.transaction() as tx:
                tx["n"] = i
                tx["blob"] = "x" * 2000 + str(i)
        before = os.path.getsize(real)
        db.compact()
        assert os.path.islink(link) and os.readlink(link) == real
        assert os.path.getsize(real) < before
        with db.transaction() as tx:       # written after compaction: into the real file
            tx["after"] = "yes"
        with pb.open(real, readonly=True) as other:
            with other.transaction() as tx:
                assert tx["n"] == 49 and tx["after"] == "yes"
    assert sorted(os.listdir(os.path.dirname(link))) == ["data.pb"]
    assert os.path.islink(link)
    with pb.open(link, readonly=True) as db:
        with db.transaction() as tx:
            assert tx["after"] == "yes" and tx["n"] == 49


def test_side_files_of_a_symlinked_database_sit_beside_the_real_file(linked):
    pytest.importorskip("hnswlib")
    real, link = linked
    with pb.open(link) as db:
        with db.transaction() as tx:
            tx["docs"] = pb.Dict({f"d{i}": {"v": [float(i), 1.0, 2.0]} for i in range(20)})
            tx["docs"].create_vector_index("v", dim=3, metric="l2")
        with db.transaction() as tx:
            assert len(tx["docs"].nearest("v", [3.0, 1.0, 2.0], k=2)) == 2
    assert glob.glob(real + "-vec-*")
    assert sorted(os.listdir(os.path.dirname(link))) == ["data.pb"]
