"""Source digests of the compiled core, shared by setup.py and the import-time staleness check."""
import hashlib
from pathlib import Path

CORE = Path(__file__).parent


def source_digest(module, core=CORE):
    """Digest of the sources one extension is compiled from: its .pyx, its .pxd, the shared _*.pxd."""
    core = Path(core)
    h = hashlib.sha256()
    for f in [core / f"{module}.pyx", core / f"{module}.pxd"] + sorted(core.glob("_*.pxd")):
        if f.exists():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
