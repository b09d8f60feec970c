"""The vector tests again under other numpy CPU dispatches, as on an older machine.

numpy picks its SIMD kernels by CPU at run time, so a distance numpy computes can differ in
its last bits from one machine to the next (and BLAS picks its own). Every distance
ProtoBase reports comes from one compiled kernel (_core.vkernel, one fixed summation
order), so tests/test_vector.py must pass alike whatever numpy and OpenBLAS dispatch to.

NPY_DISABLE_CPU_FEATURES only acts on the targets this numpy build dispatches to
(``__cpu_dispatch__``: "AVX512F", "AVX512_SKX", "AVX2", "FMA3"... up to numpy 2.3; the
levels "X86_V4", "X86_V3", "AVX512_ICL", "AVX512_SPR" from 2.4, which ignores any other
name with a message), so each variant names a level of machine and disables exactly the
targets of that level that this build dispatches and this CPU has. A variant with none is
the default run again: it is skipped, saying so. Each run also checks in a child that numpy
really dispatches some of its functions elsewhere than by default."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("hnswlib")

TESTS = Path(__file__).with_name("test_vector.py")

_AVX512 = {"AVX512F", "AVX512CD", "AVX512_KNL", "AVX512_KNM", "AVX512_SKX", "AVX512_CLX",
           "AVX512_CNL", "AVX512_ICL", "AVX512_SPR", "AVX512FP16", "X86_V4"}
_AVX2 = {"AVX", "F16C", "FMA3", "AVX2", "X86_V3"}
# name -> (numpy targets turned off, OpenBLAS core type of such a machine)
VARIANTS = {"without-avx512": (_AVX512, "Haswell"),
            "without-avx2": (_AVX512 | _AVX2, "Nehalem")}

_PROBE = ("import json, numpy\n"
          "try:\n"
          "    from numpy.lib.introspect import opt_func_info\n"
          "    print(json.dumps(opt_func_info(), sort_keys=True))\n"
          "except ImportError:\n"
          "    print(json.dumps(None))\n")


def _umath():
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:                               # numpy < 2
        from numpy.core import _multiarray_umath as umath
    return umath


def _disabled(targets):
    umath = _umath()
    have = {name for name, on in umath.__cpu_features__.items() if on}
    return [name for name in umath.__cpu_dispatch__ if name in targets and name in have]


def _probe(env, cwd):
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vector_tests_pass_under_another_numpy_cpu_dispatch(variant, child_env, child_cwd):
    targets, coretype = VARIANTS[variant]
    off = _disabled(targets)
    if not off:
        pytest.skip(f"numpy dispatches none of {sorted(targets)} on this CPU "
                    f"({' '.join(_umath().__cpu_dispatch__) or 'baseline only'}): "
                    "the run would be the default dispatch")
    env = dict(child_env, NPY_DISABLE_CPU_FEATURES=" ".join(off), OPENBLAS_CORETYPE=coretype)
    default, _ = _probe(child_env, child_cwd)
    changed, said = _probe(env, child_cwd)
    assert "cannot disable" not in said, said     # every name given is one numpy obeys
    if default is not None:
        assert changed != default, f"disabling {off} left numpy's dispatch as it was"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        str(TESTS)], cwd=child_cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (f"NPY_DISABLE_CPU_FEATURES={' '.join(off)} "
                               f"OPENBLAS_CORETYPE={coretype}:\n{r.stdout[-4000:]}\n"
                               f"{r.stderr[-2000:]}")
