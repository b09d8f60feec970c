"""The vector tests again under other numpy CPU dispatches.

numpy picks SIMD kernels by CPU at run time (NPY_DISABLE_CPU_FEATURES turns some off), so
a distance computed by numpy can differ in its last bits from one machine to the next. Every
distance ProtoBase reports comes from one compiled kernel (_core.vkernel, fixed summation
order), so the vector tests must pass alike whatever numpy dispatches. Only features this
CPU and numpy build have are disabled: the test means the same on any machine."""
import subprocess
import sys
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("hnswlib")

VARIANTS = [("AVX512F", "AVX512_SKX"), ("AVX2", "FMA3")]
TESTS = Path(__file__).with_name("test_vector.py")


def _available():
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:                            # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return {name for name, on in features.items() if on}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_vector_tests_pass_under_another_numpy_cpu_dispatch(variant, child_env, child_cwd):
    have = [name for name in variant if name in _available()]
    if not have:
        pytest.skip(f"this CPU has none of {variant}: the run would be the default dispatch")
    env = dict(child_env, NPY_DISABLE_CPU_FEATURES=" ".join(have))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--import-mode=importlib", str(TESTS)],
                       cwd=child_cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"NPY_DISABLE_CPU_FEATURES={' '.join(have)}:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
