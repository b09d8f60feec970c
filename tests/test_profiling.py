"""Build modes: the release build says so, and a profile build (PROTOBASE_PROFILE=1)
exposes the Cython kernels' functions to cProfile, which a release build hides."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import protobase.build_info as build_info

ROOT = Path(__file__).resolve().parent.parent

# Runs in a subprocess: profile a few id-set operations and print every profiled
# function as "file:name", one per line.
PROFILE_IDSET = """
import cProfile, pstats, sys
from protobase._core import idset
a = idset.IdSet(range(0, 200000, 2))
b = idset.IdSet(range(0, 200000, 3))
prof = cProfile.Profile()
prof.enable()
for _ in range(20):
    both = a & b
    n = a.intersection_count(b)
    either = a | b
prof.disable()
assert len(both) == n == len(range(0, 200000, 6))
for (filename, line, name) in pstats.Stats(prof).stats:
    print(f"{filename}:{name}")
"""


def _env(pythonpath):
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath
    env.pop("PROTOBASE_PROFILE", None)
    env.pop("PROTOBASE_MODULES", None)
    return env


def _profiled_functions(pythonpath):
    # cwd=pythonpath: `python -c` puts the working directory first on sys.path.
    r = subprocess.run([sys.executable, "-c", PROFILE_IDSET + f"\nassert idset.__file__.startswith({pythonpath!r})"],
                       env=_env(pythonpath), cwd=pythonpath, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_the_release_build_records_release_mode():
    if os.environ.get("PROTOBASE_PROFILE") or os.environ.get("PROTOBASE_DEBUG"):
        pytest.skip("this run tests a non-release build on purpose")
    assert build_info.MODE == "release" and build_info.profiling is False
    assert "CYTHON_TRACE" not in build_info.MACROS and "-g" not in build_info.CFLAGS
    assert build_info.DIRECTIVES.get("profile") is not True
    assert set(build_info.DIGESTS) >= {"idset", "hamt", "btree", "pvec", "codec"}


def test_a_release_build_hides_kernel_functions_from_cprofile():
    if build_info.MODE != "release":
        pytest.skip("only a release build hides its kernels")
    package_parent = str(Path(build_info.__file__).resolve().parent.parent)
    names = _profiled_functions(package_parent)
    assert not [n for n in names if "idset.pyx" in n]


@pytest.mark.slow
def test_a_profile_build_exposes_kernel_functions_to_cprofile(tmp_path):
    """Build a profile copy of the idset kernel alone, out of tree, and profile it."""
    pytest.importorskip("Cython")
    core = ROOT / "protobase" / "_core"
    if not (ROOT / "setup.py").exists() or not (core / "idset.pyx").exists():
        pytest.skip("needs the source tree (setup.py and protobase/_core/idset.pyx)")
    tmp_core = tmp_path / "protobase" / "_core"
    tmp_core.mkdir(parents=True)
    shutil.copy(ROOT / "setup.py", tmp_path)
    shutil.copy(ROOT / "protobase" / "errors.py", tmp_path / "protobase")   # idset raises these
    (tmp_path / "protobase" / "__init__.py").write_text("")
    (tmp_core / "__init__.py").write_text("")
    for f in ["_digest.py", "idset.pyx", "idset.pxd", *(p.name for p in core.glob("_*.pxd"))]:
        shutil.copy(core / f, tmp_core)
    env = _env(str(tmp_path))
    env.update(PROTOBASE_PROFILE="1", PROTOBASE_MODULES="idset")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    built = (tmp_core / "_build.py").read_text()
    assert "MODE = 'profile'" in built and "CYTHON_TRACE_NOGIL" in built and "-g" in built

    names = _profiled_functions(str(tmp_path))
    kernel = {n.rsplit(":", 1)[1] for n in names if "idset.pyx" in n}
    assert {"__and__", "__or__", "intersection_count"} <= kernel, names
