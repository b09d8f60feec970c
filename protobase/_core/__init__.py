"""The compiled core: persistent structures and the value codec (Cython, no I/O, no locks).

Every module here is a compiled extension. There is no pure-Python fallback: a missing
or stale build is a loud ImportError that says how to build, never a silent slow path.
"""
import importlib
from pathlib import Path

from ._digest import source_digest

__all__ = ["load"]

_HERE = Path(__file__).parent
_HOW = ('build it with `pip install .` (or, in a source checkout, `pip install -e .` / '
        '`python setup.py build_ext --inplace`)')


def load(name):
    """Import the compiled module protobase._core.<name>, refusing a missing or stale build."""
    try:
        mod = importlib.import_module(f"protobase._core.{name}")
    except ImportError as exc:
        raise ImportError(
            f"protobase's compiled core module '{name}' is not built or failed to load ({exc}); {_HOW}"
        ) from exc
    if (_HERE / f"{name}.pyx").exists():  # a source tree: the build must match the sources
        built = getattr(mod, "__source_digest__", None)
        if built != source_digest(name):
            raise ImportError(
                f"protobase's compiled core module '{name}' is stale: it was built from older "
                f"sources than {name}.pyx; rebuild it: {_HOW}"
            )
    return mod
