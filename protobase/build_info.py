"""How the compiled core was built: ``MODE`` is "release", "profile" or "debug"."""
try:
    from ._core._build import CFLAGS, DIGESTS, DIRECTIVES, MACROS, MODE
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "protobase was not built (no protobase/_core/_build.py); build it with `pip install .`"
    ) from exc

__all__ = ["MODE", "CFLAGS", "MACROS", "DIRECTIVES", "DIGESTS", "profiling"]

profiling = MODE == "profile"
