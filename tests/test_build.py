"""The compiled core refuses to run stale or missing: a loud ImportError saying how to
build, never a silent slow path. Checked on a copy of the installed core in a temp folder,
in child processes (so this test process keeps its own, good, modules)."""
import glob
import os
import shutil
import subprocess
import sys

import protobase
import protobase._core as core
import protobase.errors as errors_module

PROBE = """
import sys
from protobase._core import load
try:
    load(sys.argv[1])
except ImportError as exc:
    print("ImportError:", exc)
else:
    print("loaded")
"""


def _core_copy(tmp_path):
    pkg = tmp_path / "protobase"
    (pkg / "_core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copy(errors_module.__file__, pkg / "errors.py")
    src = os.path.dirname(core.__file__)
    for name in ("__init__.py", "_digest.py"):
        shutil.copy(os.path.join(src, name), pkg / "_core" / name)
    for so in glob.glob(os.path.join(src, "idset.*.so")):
        shutil.copy(so, pkg / "_core")
    return pkg / "_core"


def _probe(tmp_path, module):
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", PROBE, module], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_built_module_without_sources_beside_it_loads(tmp_path):
    _core_copy(tmp_path)
    assert _probe(tmp_path, "idset") == "loaded"


def test_a_module_built_from_older_sources_is_refused_as_stale(tmp_path):
    core_dir = _core_copy(tmp_path)
    (core_dir / "idset.pyx").write_text("# sources edited after the build\n")
    out = _probe(tmp_path, "idset")
    assert out.startswith("ImportError:") and "stale" in out and "pip install" in out


def test_a_missing_module_is_refused_with_how_to_build(tmp_path):
    _core_copy(tmp_path)
    out = _probe(tmp_path, "pvec")
    assert out.startswith("ImportError:") and "not built" in out and "pip install" in out


def test_the_installed_package_records_its_build():
    from protobase import build_info
    assert build_info.MODE in ("release", "profile", "debug")
    assert set(build_info.DIGESTS) >= {"hamt", "pvec", "btree", "idset", "codec"}
    assert protobase.__version__


def test_build_info_is_an_attribute_of_the_package_after_a_plain_import():
    """README: `protobase.build_info.MODE` says which build is installed. A fresh process
    that only ran `import protobase` reads it without importing the submodule itself."""
    home = os.path.dirname(os.path.dirname(os.path.abspath(protobase.__file__)))
    code = "import protobase; print(protobase.build_info.MODE, 'build_info' in protobase.__all__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=home, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=home))
    assert out.returncode == 0, out.stderr
    mode, listed = out.stdout.split()
    assert mode in ("release", "profile", "debug") and listed == "True"
