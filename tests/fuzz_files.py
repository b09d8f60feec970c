"""Crafted-file fuzz: damage committed atoms of a real database, recompute every checksum
the way the format does (docs/format.md "File"), and read the result in a child process.

The mutated bytes pass every CRC, so they reach the codec's decoder, the persistent
structures' node loaders and the query layer instead of stopping at the checksum check.
Each child opens its files read-only and reads everything: every collection of every kind,
recursively through stored references, every index through queries, then ``check()``.
A round passes when the child neither dies by a signal nor hangs, and every error it sees
is a ``protobase.errors.ProtoBaseError`` (CorruptionError, DecodeError, ...).

    python tests/fuzz_files.py --seed S --rounds N [--keep DIR]

prints the seed, the outcome counts and each failure (the mutated file is kept in DIR to
be replayed with ``--read FILE``). tests/test_crafted_files.py runs a short, seeded round
of this in CI and holds the deterministic tests its failures became.
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from uuid import UUID

INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC2, 0xC3, 0xCC, 0xCD, 0xCE, 0xCF,
               0xD0, 0xD3, 0xD4, 0xC7, 0xC9, 0x90, 0x9F, 0xDC, 0xDD, 0x80, 0x8F, 0xDE,
               0xDF, 0xA0, 0xBF, 0xD9, 0xDB, 0xC4, 0xC6, 0xE0, 0xCB)


def build_database(path, seed=0):
    """A small real database: every collection kind, indexes on a map and a list, nested
    values of many types, stored collections inside values, several commits. (The fuzz
    also reads a compacted copy, where every atom is live.)"""
    import protobase as pb
    rng = random.Random(seed)
    with pb.open(path) as db:
        with db.transaction() as tx:
            tx["users"] = pb.Dict()
            users = tx["users"]
            for i in range(40):
                users[f"u{i}"] = {
                    "age": rng.randrange(18, 80), "name": f"name{i}",
                    "tags": [rng.choice("abc") for _ in range(rng.randrange(3))],
                    "where": {"city": rng.choice(["x", "y", None]), "n": i * 1.5},
                    "when": date(2020, 1, 1) + timedelta(days=i),
                }
            users.create_index("age")
            users.create_index("where.city")
            tx["sorted"] = pb.SortedDict({i: (i, str(i), b"b" * (i % 3)) for i in range(30)})
            tx["set"] = pb.Set([1, "two", 3.5, (4, 5), Decimal("6.5"), UUID(int=7)])
            tx["list"] = pb.List([{"k": i % 5, "v": [i, {"deep": [i]}]} for i in range(25)])
            tx["list"].create_index("k")
            tx["nested"] = {"a": [1, 2, {"b": (3, frozenset([4]))}], "big": 2 ** 70,
                            "t": datetime(2021, 5, 6, 7, 8, tzinfo=timezone.utc),
                            "f": Fraction(1, 3), "c": 2 + 3j, "by": bytearray(b"xy"),
                            "inner": pb.Set(["p", "q"]), "lst": pb.List([1, [2, 3]])}
        for i in range(6):                         # later commits: edits over earlier atoms
            with db.transaction() as tx:
                tx["users"][f"u{rng.randrange(40)}"] = {"age": i, "name": "edited", "tags": []}
                gone = rng.randrange(30)
                if gone in tx["sorted"]:
                    del tx["sorted"][gone]
                tx["list"].append({"k": i, "v": [i]})
                tx["set"].add(100 + i)
                tx["nested"]["inner"].add(f"r{i}")


class _Bytes:
    """The file-like reader log.walk_commits expects, over a bytes object."""

    def __init__(self, data):
        self.data = data

    def read(self, offset, n):
        return self.data[offset:offset + n]


def layout(data):
    """``(salt, [(footer, [atom offsets])])`` for every commit of the file's bytes."""
    from protobase.storage import log
    header = log.parse_header(data[:log.HEADER_SIZE])
    salt = header.salt
    commits = []
    for ft in log.walk_commits(_Bytes(data), len(data), salt, header.size):
        offsets, pos, stop = [], ft.start, ft.end - log.FOOTER_SIZE
        while pos < stop:
            n, _crc = log.ATOM_PREFIX.unpack_from(data, pos)
            offsets.append(pos)
            pos += log.ATOM_PREFIX_SIZE + n
        commits.append((ft, offsets))
    return salt, commits


def reseal(buf, salt, commits):
    """Recompute, in place, every atom CRC, commit CRC and footer of ``buf``."""
    from protobase.storage import log
    for ft, offsets in commits:
        for pos in offsets:
            n, _ = log.ATOM_PREFIX.unpack_from(buf, pos)
            body = bytes(buf[pos + log.ATOM_PREFIX_SIZE:pos + log.ATOM_PREFIX_SIZE + n])
            log.ATOM_PREFIX.pack_into(buf, pos, n, zlib.crc32(body, salt))
        body = bytes(buf[ft.start:ft.end - log.FOOTER_SIZE])
        ccrc = zlib.crc32(body, salt) if body else salt
        log.pack_footer(buf, ft.end - log.FOOTER_SIZE, salt, ft.seq, ft.root, ft.length,
                        ft.synced, ft.flags, ccrc)


def mutate(data, rng):
    """The bytes of ``data`` with 1-4 bytes of one committed atom changed and every checksum
    recomputed, and a description of the change."""
    from protobase.storage import log
    salt, commits = layout(data)
    atoms = [(pos, ft) for ft, offsets in commits for pos in offsets]
    pos, _ = rng.choice(atoms)
    n, _ = log.ATOM_PREFIX.unpack_from(data, pos)
    buf = bytearray(data)
    changes = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        if n == 0:
            break
        at = pos + log.ATOM_PREFIX_SIZE + rng.randrange(n)
        how = rng.random()
        if how < 0.3:
            new = buf[at] ^ (1 << rng.randrange(8))
        elif how < 0.55:
            new = rng.choice(INTERESTING)
        elif how < 0.8:
            new = (buf[at] + rng.choice((-2, -1, 1, 2))) & 0xFF
        else:
            new = rng.randrange(256)
        changes.append((at, buf[at], new))
        buf[at] = new
    reseal(buf, salt, commits)
    return bytes(buf), f"atom at {pos}: " + ", ".join(f"byte {a} {o:#04x}->{v:#04x}"
                                                     for a, o, v in changes)


# ------------------------------------------------------------------------- the reader

def _walk(value, seen, out):
    import protobase as pb
    from protobase.query import F
    if isinstance(value, (pb.Dict, pb.SortedDict, pb.List, pb.Set)):
        if id(value) in seen:
            return
        seen.add(id(value))
        out.append(len(value))
        if isinstance(value, pb.Set):
            for x in value:
                out.append(x in value)
            return
        if isinstance(value, pb.List):
            items = list(enumerate(value))
            if len(value):
                out.append(value[-1])
        else:
            items = list(value.items())
            for k, _ in items[:5]:
                out.append(value.get(k))
            if isinstance(value, pb.SortedDict) and len(value):
                out.append(value.peekitem(0))
                out.append(list(value.irange(reverse=True))[:3])
        for _, v in items:
            _walk(v, seen, out)
        for field in value.indexes:
            f = F
            for part in field.split("."):
                f = getattr(f, part)
            out.append(list(value.where(f.exists()).keys()))
            out.append(value.where(f == 30).count())
            out.append(list(value.where(f > 10, f < 60).order_by(field).limit(5)))
            out.append(len(value.where(f.exists()).matching_ids()))
            out.append(bool(value.where(f == "x")))
    elif isinstance(value, dict):
        for v in value.values():
            _walk(v, seen, out)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _walk(v, seen, out)


def read_everything(path):
    """Open ``path`` read-only and read all of it; returns a short outcome word."""
    import protobase as pb
    with pb.open(path, readonly=True) as db:
        with db.transaction(readonly=True) as tx:
            _walk(tx.root, set(), [])
        report = db.check()
    return "problems" if report.problems else "clean"


def _read_files(paths):
    """The child: one line per file, flushed before reading it (a crash or hang then
    names its file)."""
    from protobase.errors import ProtoBaseError
    import traceback
    bad = 0
    for path in paths:
        print(f"BEGIN {path}", flush=True)
        try:
            word = read_everything(path)
        except ProtoBaseError as exc:
            word = f"typed {type(exc).__name__}"
        except BaseException as exc:   # noqa: BLE001 - the fuzz reports every other error
            bad += 1
            tb = traceback.format_exc().strip().splitlines()
            print(f"UNTYPED {type(exc).__name__}: {exc!s:.200} | {' / '.join(tb[-4:-1])}",
                  flush=True)
            continue
        print(f"DONE {word}", flush=True)
    return 3 if bad else 0


def run_child(paths, timeout, env=None):
    """Read ``paths`` in one child; ``[(path, outcome)]`` where the outcome is ``clean``,
    ``problems``, ``typed X``, ``UNTYPED ...``, ``crash (signal N)`` or ``hang``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--read", *paths]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=tempfile.gettempdir())
        out, code, hung = r.stdout, r.returncode, False
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        code, hung = None, True
    results, current = [], None
    for line in out.splitlines():
        if line.startswith("BEGIN "):
            current = line[6:]
        elif current is not None and line.startswith(("DONE ", "UNTYPED ")):
            results.append((current, line[5:] if line.startswith("DONE ") else line))
            current = None
    if current is not None:
        results.append((current, "hang" if hung else f"crash (exit {code})"))
    elif code not in (0, 3) and not hung:
        results.append((paths[-1], f"child failed (exit {code}): {r.stderr[-500:]}"))
    return results


def fuzz(seed, rounds, workdir, batch=25, timeout=60, env=None, log=print):
    """Run ``rounds`` mutated files in batches; returns (counts, failures) where each
    failure is (file, description, outcome)."""
    rng = random.Random(seed)
    base = os.path.join(workdir, "base.pb")
    if not os.path.exists(base):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--build", base, str(seed)],
                       check=True, env=env, timeout=120, cwd=tempfile.gettempdir())
    bases = []
    for name in ("base.pb", "base-compacted.pb"):   # history; only live atoms
        with open(os.path.join(workdir, name), "rb") as f:
            bases.append(f.read())
    counts, failures = {}, []
    done = 0
    while done < rounds:
        paths, what = [], {}
        for i in range(done, min(rounds, done + batch)):
            crafted, desc = mutate(bases[i % 2], rng)
            p = os.path.join(workdir, f"r{i:06d}.pb")
            with open(p, "wb") as f:
                f.write(crafted)
            paths.append(p)
            what[p] = desc
        results = run_child(paths, timeout, env)
        finished = {p for p, _ in results}
        for p, outcome in results:
            word = outcome.split(":")[0].split(" (")[0]
            counts[word] = counts.get(word, 0) + 1
            if outcome.startswith(("UNTYPED", "crash", "hang", "child")):
                failures.append((p, what[p], outcome))
                log(f"FAIL {p}: {what[p]}: {outcome}")
            else:
                os.remove(p)
        for p in paths:                  # after a crash or hang: the rest were never read
            if p not in finished and os.path.exists(p):
                os.remove(p)
        done += len(paths)
    return counts, failures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--keep", default=None, help="folder to keep failing files in")
    ap.add_argument("--read", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.read:
        return _read_files(args.read)
    if args.build:
        path = args.build[0]
        build_database(path, int(args.build[1]))
        import shutil
        import protobase as pb
        compacted = path[:-3] + "-compacted.pb"
        shutil.copyfile(path, compacted)
        with pb.open(compacted) as db:
            db.compact()
        return 0
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    print(f"seed {seed}, {args.rounds} rounds", flush=True)
    workdir = args.keep or tempfile.mkdtemp(prefix="pb-fuzz-files-")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.monotonic()
    counts, failures = fuzz(seed, args.rounds, workdir, batch=args.batch)
    took = time.monotonic() - t0
    print(f"seed {seed}: {args.rounds} rounds in {took:.1f}s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"{len(failures)} failures" + (f" (files kept in {workdir})" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
