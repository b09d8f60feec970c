"""The ``protobase`` command (also ``python -m protobase``).

    protobase demo [PATH]                      a guided tour on ./protobase-demo.pb
    protobase info PATH [--json]               format, size, commits, collections, root names
    protobase check PATH [--json]              verify every checksum; exit 1 listing problems
    protobase compact PATH                     rewrite the file with only the live data
    protobase stats PATH [--json]              the file's own figures: commits, size,
                                               collections and entries by kind, indexes
    protobase dump PATH [--format jsonl|msgpack] [-o FILE]
    protobase load PATH FILE                   load a dump into a new (empty) database
    protobase --version

``--json`` prints one JSON object instead of the text. A 0-byte file is reported as
"empty: no database yet"; a path that is not a regular file (a directory, a FIFO,
/dev/null) is a NotADatabaseError, and is never read. ``dump --format msgpack`` refuses to
write its binary stream to a terminal: redirect it or give ``-o FILE``.

Reading runs no code of the application's classes: their instances are carried as opaque
payloads (their stored bytes) unless ``--trust MODULE`` (repeatable, the word
``pb.open(trust=)`` uses) asks for that module's classes to be decoded.

Every failure the user can cause (bad arguments, a missing, damaged, foreign or locked
file) ends with one line on stderr and a non-zero exit status, never a traceback.
Progress bars (tqdm) go to stderr and only when stderr is a terminal.

The dump format
---------------

A dump is a stream of records that reproduces the root and every collection reachable
from it, with their identity: a collection stored in two places, or in a cycle, is dumped
once and referred to by its *dump id*. The root is dump id 0; other collections are
numbered in the order the dump meets them. Four kinds of record:

- ``{"format": "protobase-dump", "version": 1, "root": 0}``: the first record;
- ``{"collection": ID, "kind": "Dict"|"SortedDict"|"List"|"Set", "indexes": [field, ...],
  "vector_indexes": {field: settings}}``: declares a collection, always before any record
  that refers to it (so a loader can create it when first met);
- ``{"c": ID, "k": KEY, "v": VALUE}``: one entry of collection ID: a key and a value
  (Dict, SortedDict), a value (List, in order; no ``k``) or a member (Set; no ``v``);
- ``{"end": true, "collections": N, "entries": M}``: the last record; a dump without it
  was cut short, and ``load`` refuses it.

``load`` writes everything in one transaction into a database whose root is empty, then
rebuilds the declared indexes (a vector index only when hnswlib is installed).

``--format jsonl`` (the default) writes one JSON object per line. JSON holds None, bool,
int, str, finite floats, lists and dicts with string keys; everything else is a tagged
object with a single ``$``-key:

- ``{"$ref": ID}``: the collection with that dump id;
- ``{"$float": "nan"}`` (or ``"inf"``, ``"-inf"``);
- ``{"$int": "0x..."}``: an int too long for JSON readers (over 8192 bits), in hex;
- ``{"$dict": [[key, value], ...]}``: a dict whose keys are not all strings, or one of
  whose keys starts with ``$`` (order kept);
- ``$tuple``, ``$set``, ``$frozenset``: a list of the items;
- ``$bytes``, ``$bytearray``: base64;
- ``$complex``: ``[real, imag]``;
- ``$datetime``, ``$date``, ``$time``: ISO 8601 (naive, or with a fixed UTC offset);
- ``$timedelta``: ``[days, seconds, microseconds]``;
- ``$decimal``, ``$fraction``, ``$uuid``: the ``str()`` of the value;
- ``{"$codec": "..."}``: anything else (Enum members, numpy arrays and scalars,
  dataclasses, class instances, named time zones): base64 of ProtoBase's own value
  encoding, whose collection references are dump ids. An instance of a class the command
  does not trust (every application class, unless ``--trust`` names its module) is carried
  as the bytes it was stored as, never decoded: ``load`` writes them back byte for byte
  (collection references inside renumbered), and reading a dump runs no class code either.

``--format msgpack`` writes the same records as a stream of MessagePack maps in
ProtoBase's value encoding (readable with ``msgpack.Unpacker``), with keys and values in
their native form and collection references as ProtoBase's reference extension type
holding the dump id.
"""
import argparse
import base64
import glob
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import date, datetime, time as dtime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import IO, Any, Callable, Dict as TDict, Iterator, List as TList, Optional, Tuple

from . import errors
from .collections import Dict, List, Set, SortedDict, _Collection
from .database import Database, open as open_db
from .state import codec

__all__ = ["main", "dump", "load", "demo"]

DUMP_FORMAT = "protobase-dump"
DUMP_VERSION = 1
KINDS = {"Dict": Dict, "SortedDict": SortedDict, "List": List, "Set": Set}


class UsageError(Exception):
    """A mistake on the command line or in an input file: one line, exit status 2."""


def _progress(**kwargs: Any) -> Any:
    from tqdm import tqdm  # type: ignore[import-untyped]
    return tqdm(disable=not sys.stderr.isatty(), file=sys.stderr, leave=False, **kwargs)


def _kind(coll: _Collection) -> str:
    return type(coll).__name__


# -- dump ----------------------------------------------------------------------------------

class _Writer:
    """Numbers collections as the dump meets them and writes declare-before-use records."""

    def __init__(self, out: IO[bytes], fmt: str, trust: Optional[frozenset] = None):
        self.out = out
        self.fmt = fmt
        # the database's trusted modules: storing their classes in the dump is no surprise
        self.encode = codec.Encoder(ref_hook=self.ref, trust=trust).encode
        self.ids: TDict[int, int] = {}        # database collection id -> dump id
        self.queue: TList[Any] = []          # collections (Sized, iterable) in dump-id order
        self.fresh: TList[_Collection] = []    # met while encoding the current record
        self.entries = 0

    def ref(self, obj: object) -> Optional[int]:
        if not isinstance(obj, _Collection):
            return None
        did = self.ids.get(obj._cid)
        if did is None:
            did = self.ids[obj._cid] = len(self.ids)
            self.queue.append(obj)
            self.fresh.append(obj)
        return did

    def write(self, record: TDict[str, Any]) -> None:
        if self.fmt == "jsonl":
            line = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            data = line.encode("utf-8") + b"\n"
        else:
            data = self.encode(record)
        # Declarations of collections first met inside this record go before it.
        fresh, self.fresh = self.fresh, []
        for coll in fresh:
            self.write(self.declaration(coll))
        self.out.write(data)

    def declaration(self, coll: _Collection) -> TDict[str, Any]:
        indexes = list(getattr(coll, "indexes", []))
        vectors = dict(getattr(coll, "vector_indexes", {}))
        return {"collection": self.ids[coll._cid], "kind": _kind(coll),
                "indexes": indexes, "vector_indexes": vectors}

    def value(self, v: Any) -> Any:
        return _to_json(v, self.ref, self.encode) if self.fmt == "jsonl" else v


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _to_json(v: Any, ref: Callable[[object], Optional[int]],
             encode: Callable[[Any], bytes]) -> Any:
    """v as a JSON-able tree, tagging what JSON cannot hold (see the module docstring)."""
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t is int:            # beyond Python's int<->str digit limit: hexadecimal
        return v if v.bit_length() <= 8192 else {"$int": hex(v)}
    if t is float:
        if math.isfinite(v):
            return v
        return {"$float": "nan" if v != v else ("inf" if v > 0 else "-inf")}
    if t is list:
        return [_to_json(x, ref, encode) for x in v]
    if t is dict:
        if all(type(k) is str and not k.startswith("$") for k in v):
            return {k: _to_json(x, ref, encode) for k, x in v.items()}
        return {"$dict": [[_to_json(k, ref, encode), _to_json(x, ref, encode)] for k, x in v.items()]}
    if isinstance(v, _Collection):
        return {"$ref": ref(v)}
    if t is tuple:
        return {"$tuple": [_to_json(x, ref, encode) for x in v]}
    if t is set or t is frozenset:
        return {"$" + t.__name__: [_to_json(x, ref, encode) for x in v]}
    if t is bytes or t is bytearray:
        return {"$" + t.__name__: _b64(v)}
    if t is complex:
        return {"$complex": [_to_json(v.real, ref, encode), _to_json(v.imag, ref, encode)]}
    if t in (datetime, dtime) and v.tzinfo is not None and type(v.tzinfo) is not timezone:
        pass                                   # a named zone: only the codec keeps it
    elif t in (datetime, date, dtime):
        return {"$" + t.__name__: v.isoformat()}
    if t is timedelta:
        return {"$timedelta": [v.days, v.seconds, v.microseconds]}
    if t in (Decimal, Fraction, uuid.UUID):
        return {"$" + {Decimal: "decimal", Fraction: "fraction", uuid.UUID: "uuid"}[t]: str(v)}
    return {"$codec": _b64(encode(v))}


def dump(db: Database, out: IO[bytes], fmt: str = "jsonl") -> TDict[str, int]:
    """Write a dump of `db` (one consistent snapshot) to the binary stream `out`.
    Returns {"collections": ..., "entries": ...}."""
    if fmt not in ("jsonl", "msgpack"):
        raise UsageError(f"unknown dump format {fmt!r}: use jsonl or msgpack")
    w = _Writer(out, fmt, db.trust)
    with db.transaction(readonly=True) as tx:
        root = tx.root
        w.write({"format": DUMP_FORMAT, "version": DUMP_VERSION, "root": 0})
        w.ref(root)
        with _progress(total=len(root), unit=" entries", desc="dump") as bar:
            done = 0
            while done < len(w.queue):
                coll = w.queue[done]
                if done:
                    bar.total += len(coll)
                    bar.refresh()
                else:
                    w.fresh.clear()
                    w.write(w.declaration(coll))
                did = w.ids[coll._cid]
                for record in _entries(coll, did, w):
                    w.write(record)
                    w.entries += 1
                    bar.update(1)
                done += 1
        w.write({"end": True, "collections": len(w.queue), "entries": w.entries})
    return {"collections": len(w.queue), "entries": w.entries}


def _entries(coll: Any, did: int, w: _Writer) -> Iterator[TDict[str, Any]]:
    if isinstance(coll, (Dict, SortedDict)):
        for k, v in coll.items():
            yield {"c": did, "k": w.value(k), "v": w.value(v)}
    elif isinstance(coll, List):
        for v in coll:
            yield {"c": did, "v": w.value(v)}
    else:
        for k in coll:
            yield {"c": did, "k": w.value(k)}


# -- load ----------------------------------------------------------------------------------

_SIMPLE_TAGS: TDict[str, Callable[[Any], Any]] = {
    "$bytes": lambda s: base64.b64decode(s, validate=True),
    "$bytearray": lambda s: bytearray(base64.b64decode(s, validate=True)),
    "$datetime": datetime.fromisoformat,
    "$date": date.fromisoformat,
    "$time": dtime.fromisoformat,
    "$timedelta": lambda p: timedelta(days=p[0], seconds=p[1], microseconds=p[2]),
    "$decimal": Decimal,
    "$fraction": Fraction,
    "$uuid": uuid.UUID,
    "$float": float,
    "$int": lambda s: int(s, 16),
}


def _from_json(v: Any, resolve: Callable[[int], _Collection], decode: Callable[[bytes], Any]) -> Any:
    if type(v) is list:
        return [_from_json(x, resolve, decode) for x in v]
    if type(v) is not dict:
        return v
    if len(v) == 1:
        tag, arg = next(iter(v.items()))
        if tag.startswith("$"):
            if tag == "$ref":
                return resolve(arg)
            if tag == "$dict":
                return {_from_json(k, resolve, decode): _from_json(x, resolve, decode) for k, x in arg}
            if tag == "$tuple":
                return tuple(_from_json(x, resolve, decode) for x in arg)
            if tag == "$set":
                return {_from_json(x, resolve, decode) for x in arg}
            if tag == "$frozenset":
                return frozenset(_from_json(x, resolve, decode) for x in arg)
            if tag == "$complex":
                return complex(_from_json(arg[0], resolve, decode), _from_json(arg[1], resolve, decode))
            if tag == "$codec":
                return decode(base64.b64decode(arg, validate=True))
            if tag in _SIMPLE_TAGS:
                return _SIMPLE_TAGS[tag](arg)
            raise UsageError(f"unknown tag {tag!r} in the dump")
    return {k: _from_json(x, resolve, decode) for k, x in v.items()}


def _records(stream: IO[bytes], fmt: str, resolve: Callable[[int], _Collection],
             decode: Callable[[bytes], Any], bar: Any) -> Iterator[TDict[str, Any]]:
    if fmt == "jsonl":
        for n, line in enumerate(stream, 1):
            bar.update(len(line))
            try:
                raw = json.loads(line)
            except ValueError as exc:
                raise UsageError(f"line {n} of the dump is not JSON: {exc}") from None
            except RecursionError:
                raise UsageError(_too_nested(f"line {n}")) from None
            try:
                record = _from_json(raw, resolve, decode)
            except errors.ProtoBaseError:
                raise
            except RecursionError:
                raise UsageError(_too_nested(f"line {n}")) from None
            except (ValueError, TypeError, KeyError, IndexError) as exc:   # a malformed tag
                raise UsageError(f"line {n} of the dump holds a bad value: {exc}") from None
            yield record
        return
    data = stream.read()
    bar.update(len(data))
    pos = 0
    while pos < len(data):
        record, pos = _next_msgpack(data, pos, decode)
        yield record


def _too_nested(where: str) -> str:
    return (f"{where} of the dump nests values deeper than protobase stores (at most "
            f"{codec.MAX_DEPTH} levels): it was not written by `protobase dump`")


def _next_msgpack(data: bytes, pos: int, decode: Callable[[bytes], Any]) -> Any:
    """Decode the record at data[pos:]; the codec decodes whole buffers, so the record's
    end is found from MessagePack's framing first."""
    end = pos + _msgpack_size(data, pos)
    return decode(data[pos:end]), end


def _msgpack_size(data: bytes, pos: int) -> int:
    """The byte length of the MessagePack object starting at data[pos] (framing only)."""
    n = len(data)
    stack = 1
    p = pos
    while stack:
        if p >= n:
            raise UsageError("the dump ends in the middle of a record (truncated file?)")
        b = data[p]
        stack -= 1
        p += 1
        if b <= 0x7f or b >= 0xe0 or b in (0xc0, 0xc2, 0xc3):
            continue
        if 0x80 <= b <= 0x8f:
            stack += 2 * (b & 0x0f)
        elif 0x90 <= b <= 0x9f:
            stack += b & 0x0f
        elif 0xa0 <= b <= 0xbf:
            p += b & 0x1f
        elif b in (0xcc, 0xd0):
            p += 1
        elif b in (0xcd, 0xd1):
            p += 2
        elif b in (0xca, 0xce, 0xd2):
            p += 4
        elif b in (0xcb, 0xcf, 0xd3):
            p += 8
        elif b in (0xc4, 0xc5, 0xc6, 0xd9, 0xda, 0xdb):   # bin / str 8, 16, 32
            width = {0xc4: 1, 0xd9: 1, 0xc5: 2, 0xda: 2, 0xc6: 4, 0xdb: 4}[b]
            p += width + int.from_bytes(data[p:p + width], "big")
        elif b in (0xdc, 0xdd):
            width = 2 if b == 0xdc else 4
            stack += int.from_bytes(data[p:p + width], "big")
            p += width
        elif b in (0xde, 0xdf):
            width = 2 if b == 0xde else 4
            stack += 2 * int.from_bytes(data[p:p + width], "big")
            p += width
        elif b in (0xd4, 0xd5, 0xd6, 0xd7, 0xd8):          # fixext 1..16
            p += 1 + (1 << (b - 0xd4))
        elif b in (0xc7, 0xc8, 0xc9):                      # ext 8, 16, 32
            width = {0xc7: 1, 0xc8: 2, 0xc9: 4}[b]
            p += width + 1 + int.from_bytes(data[p:p + width], "big")
        else:
            raise UsageError(f"byte {p - 1} of the dump is not MessagePack")
    if p > n:
        raise UsageError("the dump ends in the middle of a record (truncated file?)")
    return p - pos


def load(db: Database, stream: IO[bytes], fmt: Optional[str] = None,
         size: Optional[int] = None) -> TDict[str, int]:
    """Load a dump (see the module docstring) into `db`, whose root must be empty, in one
    transaction. `fmt` is guessed from the first byte when None. Class instances are decoded
    only for the modules `db` trusts (pb.open(trust=)); the others stay opaque payloads."""
    if fmt is None:
        first = stream.peek(1)[:1] if hasattr(stream, "peek") else b""
        fmt = "jsonl" if first in (b"{", b"") else "msgpack"
    objs: TDict[int, Any] = {}              # dump id -> collection (root: tx.root)
    specs: TList[TDict[str, Any]] = []
    entries = 0

    def resolve(did: int) -> Any:
        if type(did) is not int or did not in objs:
            raise UsageError(f"the dump refers to collection {did} before declaring it")
        return objs[did]

    # No class code runs while reading a dump: classes of modules `db` trusts are decoded,
    # the others come back as the opaque payloads they were dumped as.
    decode = codec.Decoder(ref_resolver=resolve, trust=db.trust, opaque=True).decode

    with db.transaction() as tx, _progress(total=size, unit="B", unit_scale=True, desc="load") as bar:
        if len(tx.root):
            raise UsageError("the database already holds data; load into a new database path")
        records = _records(stream, fmt, resolve, decode, bar)
        head = next(records, None)
        if not isinstance(head, dict) or head.get("format") != DUMP_FORMAT:
            raise UsageError("not a protobase dump (no header record)")
        if head.get("version") != DUMP_VERSION:
            raise UsageError(f"dump version {head.get('version')!r} is not supported "
                             f"(this protobase reads version {DUMP_VERSION})")
        end = None
        for n, rec in enumerate(records, 2):
            if end is not None:
                raise UsageError("the dump has records after its end record")
            if not isinstance(rec, dict):
                raise UsageError(f"record {n} of the dump is not a map")
            if "c" in rec:
                coll = resolve(rec["c"])
                field = "v" if isinstance(coll, List) else "k"
                if field not in rec or (isinstance(coll, (Dict, SortedDict)) and "v" not in rec):
                    raise UsageError(f"record {n} of the dump is an incomplete entry")
                try:
                    if isinstance(coll, List):
                        coll.append(rec["v"])
                    elif isinstance(coll, Set):
                        coll.add(rec["k"])
                    else:
                        coll[rec["k"]] = rec["v"]
                except errors.SerializationError as exc:   # a bad key, a value too deep...
                    where = f"line {n}" if fmt == "jsonl" else f"record {n}"
                    raise UsageError(f"{where} of the dump cannot be stored: {exc}") from None
                entries += 1
            elif "collection" in rec:
                did, kind = rec["collection"], rec.get("kind")
                root_ok = kind == "Dict" and not objs if did == 0 else bool(objs)
                if kind not in KINDS or type(did) is not int or did in objs or not root_ok:
                    raise UsageError(f"record {n}: bad declaration of collection {did!r} ({kind})")
                objs[did] = tx.root if did == 0 else KINDS[kind]()
                specs.append(rec)
            elif rec.get("end") is True:
                end = rec
            else:
                raise UsageError(f"record {n} of the dump is of no known kind: {sorted(map(str, rec))}")
        if end is None:
            raise UsageError("the dump has no end record: it was cut short")
        if end.get("entries") != entries or end.get("collections") != len(objs):
            raise UsageError("the dump's end record does not match what it holds")
        _build_indexes(objs, specs)
    return {"collections": len(objs), "entries": entries}


def _build_indexes(objs: TDict[int, Any], specs: TList[TDict[str, Any]]) -> None:
    todo = [(objs[s["collection"]], f, None) for s in specs for f in s.get("indexes", ())]
    todo += [(objs[s["collection"]], f, spec) for s in specs
             for f, spec in s.get("vector_indexes", {}).items()]
    for coll, field, spec in _progress(iterable=todo, desc="indexes"):
        if spec is None:
            coll.create_index(field)
            continue
        try:
            coll.create_vector_index(field, dim=spec["dim"], metric=spec["metric"],
                                     M=spec["M"], ef_construction=spec["ef_construction"])
        except errors.MissingDependencyError as exc:
            print(f"protobase: warning: vector index on {field!r} not recreated: {exc}",
                  file=sys.stderr)


# -- the other commands -------------------------------------------------------------------

def _open_existing(path: str, readonly: bool = True,
                   trust: Optional[TList[str]] = None) -> Database:
    # Anything that is not a regular file (a directory, a FIFO, /dev/null) is refused by
    # the open itself, as NotADatabaseError, without reading it (storage.fileio).
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    # Untrusted classes read as codec.Opaque: no application code runs, and nothing fails
    # for want of the application's modules.
    return open_db(path, readonly=readonly, trust=trust, opaque=True)


def _size(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


EMPTY_NOTE = "empty: no database yet"
_KIND_NAMES = {"dict": "Dict", "sorted": "SortedDict", "list": "List", "set": "Set"}


def _is_empty(db: Database) -> bool:
    """A file of no bytes (or a torn first header): a database was never written there."""
    from .storage.log import HEADER_SIZE
    size = db.stats().get("file_size")
    return size is not None and size < HEADER_SIZE


def _print_json(doc: TDict[str, Any]) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False, default=repr))


def _describe(name: Any, value: Any) -> TDict[str, Any]:
    """One root name for info: the name (a str as is, any other key as its repr), its
    value's kind and, for a collection, how many entries it holds."""
    if isinstance(value, (Dict, SortedDict, List, Set)):
        kind, size = _kind(value), len(value)
    else:
        kind, size = type(value).__name__, None
    return {"name": name if type(name) is str else repr(name), "name_repr": repr(name),
            "kind": kind, "size": size}


def cmd_info(args: argparse.Namespace) -> int:
    with _open_existing(args.path, trust=args.trust) as db:
        st = db.stats()
        doc: TDict[str, Any] = {"path": args.path, "empty": _is_empty(db),
                                "format": st.get("format_version"),
                                "database_id": st.get("database_id"),
                                "file_size": st.get("file_size"),
                                "commits": st["sequence"], "collections": st["collections"]}
        with db.transaction(readonly=True) as tx:
            names: TList[Tuple[Any, Any]] = list(tx.root.items())
            doc["root_names"] = [_describe(name, value) for name, value in names]
    if args.json:
        _print_json(doc)
        return 0
    print(f"path:        {args.path}")
    if doc["empty"]:
        print(f"state:       {EMPTY_NOTE} ({_size(doc['file_size'])}; the first commit "
              f"writes one)")
        return 0
    print(f"format:      ProtoBase file format {doc['format']}")
    if doc["database_id"]:
        print(f"database id: {doc['database_id']}")
    print(f"size:        {_size(doc['file_size'])}")
    print(f"commits:     {doc['commits']}")
    print(f"collections: {doc['collections']}")
    print(f"root names:  {len(names)}")
    for entry in doc["root_names"]:
        of = f" of {entry['size']}" if entry["size"] is not None else ""
        print(f"  {entry['name_repr']}: {entry['kind']}{of}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with _open_existing(args.path) as db:
        empty = _is_empty(db)
        report = db.check()
    problems = [{"offset": p.offset, "message": p.message} for p in report.problems]
    if args.json:
        _print_json({"path": args.path, "ok": not problems, "empty": empty and not problems,
                     "commits": report.commits, "atoms": report.atoms, "problems": problems})
        return 1 if problems else 0
    if problems:
        print(f"{args.path}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            where = f"at offset {p['offset']}: " if p["offset"] is not None else ""
            print(f"  {where}{p['message']}", file=sys.stderr)
        return 1
    if empty:
        print(f"{args.path}: ok, {EMPTY_NOTE} (nothing to check)")
        return 0
    print(f"{args.path}: ok ({report.commits} commits, {report.atoms} atoms checked)")
    return 0


def _stats_figures(db: Database, path: str) -> TDict[str, Any]:
    """The file's own figures, as of its last commit (not this process's counters: a
    fresh read-only open has made no commits of its own)."""
    st = db.stats()
    kinds = {name: 0 for name in _KIND_NAMES.values()}
    entries = {name: 0 for name in _KIND_NAMES.values()}
    indexes = vector_indexes = 0
    with db.transaction(readonly=True) as tx:
        root_names = len(tx.root)
        for _cid, cs in tx._snapshot.colls.items():
            kind = _KIND_NAMES.get(cs.kind, cs.kind)
            kinds[kind] = kinds.get(kind, 0) + 1
            entries[kind] = entries.get(kind, 0) + len(cs.data)
            indexes += len(cs.meta.get("indexes", ()))
            vector_indexes += len(cs.meta.get("vectors", {}) or {})
    size, end = st.get("file_size"), st.get("end")
    return {
        "path": path, "empty": _is_empty(db), "file_size": size,
        "commits": st["sequence"],              # commits over the file's life (its sequence)
        "collections": st["collections"], "collections_by_kind": kinds,
        "entries": sum(entries.values()), "entries_by_kind": entries,
        "root_names": root_names, "indexes": indexes, "vector_indexes": vector_indexes,
        "bytes_to_last_commit": end,
        "bytes_after_last_commit": None if size is None or end is None else max(0, size - end),
    }


def cmd_stats(args: argparse.Namespace) -> int:
    with _open_existing(args.path) as db:
        doc = _stats_figures(db, args.path)
    if args.json:
        _print_json(doc)
        return 0
    if doc["empty"]:
        print(f"{args.path}: {EMPTY_NOTE} ({_size(doc['file_size'])})")
        return 0
    rows = [(k, v) for k, v in doc.items() if k != "empty"]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        if isinstance(v, dict):
            v = ", ".join(f"{name} {n}" for name, n in v.items())
        elif k in ("file_size", "bytes_to_last_commit", "bytes_after_last_commit") and v is not None:
            v = f"{v} ({_size(v)})"
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    with _open_existing(args.path, readonly=False) as db:
        before = os.path.getsize(args.path)
        result: TDict[str, Any] = {}

        def work() -> None:
            try:
                result.update(db.compact())
            except BaseException as exc:          # re-raised in the main thread
                result["error"] = exc

        t = threading.Thread(target=work)
        t.start()
        with _progress(total=before, unit="B", unit_scale=True, desc="compact") as bar:
            while t.is_alive():
                t.join(0.1)
                try:
                    bar.n = min(before, os.path.getsize(args.path + ".compact"))
                    bar.refresh()
                except OSError:
                    pass
        if "error" in result:
            raise result["error"]
    print(f"{args.path}: {_size(result['before'])} -> {_size(result['after'])}")
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    if args.format == "msgpack" and args.output in (None, "-") and _is_terminal(sys.stdout):
        raise UsageError("refusing to write MessagePack (binary) to a terminal: redirect "
                         "stdout to a file or a pipe, or give -o FILE")
    with _open_existing(args.path, trust=args.trust) as db:
        if args.output in (None, "-"):
            result = dump(db, sys.stdout.buffer, args.format)
            sys.stdout.flush()
        else:
            tmp = args.output + ".part"
            try:
                with open(tmp, "wb") as f:
                    result = dump(db, f, args.format)
                os.replace(tmp, args.output)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    print(f"dumped {result['collections']} collections, {result['entries']} entries",
          file=sys.stderr)
    return 0


def _is_terminal(stream: Any) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):   # no descriptor (captured, closed)
        return False


def cmd_load(args: argparse.Namespace) -> int:
    if not os.path.exists(args.file):
        raise UsageError(f"{args.file}: no such file")
    created = not os.path.exists(args.path)
    try:
        with open(args.file, "rb") as f, open_db(args.path, trust=args.trust, opaque=True) as db:
            result = load(db, f, args.format, os.path.getsize(args.file))
    except BaseException:
        if created:                            # no half-made database left behind
            for made in [args.path] + glob.glob(glob.escape(args.path) + "-vec-*"):
                os.remove(made)
        raise
    print(f"loaded {result['collections']} collections, {result['entries']} entries into {args.path}")
    return 0


# -- demo ----------------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(msg, flush=True)


def _vector_search_missing() -> Optional[str]:
    """Why the vector part of the demo cannot run, or None when it can."""
    if importlib.util.find_spec("hnswlib") is None or importlib.util.find_spec("numpy") is None:
        return 'needs `pip install "protobase[vector]"`'
    try:                   # tried, not assumed: the vector layer is optional and may be partial
        with open_db() as db, db.transaction() as tx:
            tx["probe"] = Dict({1: {"v": [1.0, 0.0]}, 2: {"v": [0.0, 1.0]}})
            tx["probe"].create_vector_index("v", dim=2, metric="l2")
            hits = tx["probe"].where().nearest("v", [0.9, 0.1], k=1)
            if [key for key, _, _ in hits.scored()] != [1]:
                return "vector search gave a wrong answer on a probe"
    except Exception as exc:
        return f"vector search does not work here: {type(exc).__name__}: {exc}"
    return None


_CRASH_CHILD = """
import sys, protobase as pb
db = pb.open(sys.argv[1])
n = 0
while True:
    with db.transaction() as tx:
        tx["counter"] = n = tx.get("counter", 0) + 1
        tx["log"].append(n)
    print(n, flush=True)          # acknowledged: commit() has returned
"""


DEMO_MARK = "protobase-demo"         # a root name that marks a database the demo made


def demo(path: str = "protobase-demo.pb", threads: int = 8, products: int = 20000,
         crash_commits: int = 200) -> TDict[str, Any]:
    """The guided tour; returns the figures it printed (the tests check them)."""
    out: TDict[str, Any] = {}
    if os.path.exists(path):          # never delete a database the demo did not make
        with open_db(path, readonly=True) as db, db.transaction(readonly=True) as tx:
            ours = DEMO_MARK in tx.root
        if not ours:
            raise UsageError(f"{path} holds a database that is not the demo's; "
                             "give the demo another path")
    # Start afresh: the file, an interrupted compaction, vector index checkpoints.
    for leftover in [path, path + ".compact"] + glob.glob(glob.escape(path) + "-vec-*"):
        if os.path.exists(leftover):
            os.remove(leftover)
    _say(f"ProtoBase demo on {os.path.abspath(path)}\n")
    with open_db(path) as db:
        out["carts"] = _demo_carts(db, threads)
        out["query"] = _demo_query(db, products)
        missing = _vector_search_missing()
        out["vector"] = _demo_vectors(db) if missing is None else None
        if missing is not None:
            _say(f"3. hybrid vector search: skipped ({missing})\n")
    out["crash"] = _demo_crash(path, crash_commits)
    with open_db(path, readonly=True) as db:
        report = db.check()
        out["check_ok"] = not report.problems
        _say(f"5. check: {'ok' if not report.problems else report.problems} "
             f"({report.commits} commits verified); file {_size(os.path.getsize(path))}")
    _say(f"\nDone. Explore it: protobase info {path}")
    return out


def _demo_carts(db: Database, threads: int) -> TDict[str, Any]:
    _say("1. shopping carts: concurrent transactions")
    with db.transaction() as tx:
        tx[DEMO_MARK] = True
        tx["carts"] = Dict({f"user{u}": {"items": [], "total": 0} for u in range(4)})

    # Two transactions on one snapshot write the same key: the later commit loses.
    a, b = db.transaction(), db.transaction()
    a["carts"]["user0"] = {"items": ["tea"], "total": 4}
    b["carts"]["user0"] = {"items": ["coffee"], "total": 6}
    a.commit()
    try:
        b.commit()
    except errors.ConflictError as exc:
        _say(f"   second writer of carts['user0'] got ConflictError: key={exc.key!r}")
    else:
        _say("   second writer of carts['user0'] committed: NO CONFLICT DETECTED")

    def add_item(tx: Any, user: str, item: str, price: int) -> None:
        cart = tx["carts"][user]
        cart["items"].append(item)
        cart["total"] += price
        tx["carts"][user] = cart

    db.run(add_item, "user0", "coffee", 6)
    _say(f"   the same write retried with db.run: carts['user0'] = {_read(db, 'carts', 'user0')}")

    per_thread = 50
    conflicts_before = db.stats()["conflicts"]

    def shopper(t: int) -> None:
        for i in range(per_thread):
            db.run(add_item, f"user{(t + i) % 4}", f"item{t}-{i}", 1, retries=1000)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=shopper, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    dt = time.perf_counter() - t0
    n = threads * per_thread
    conflicts = db.stats()["conflicts"] - conflicts_before
    with db.transaction(readonly=True) as tx:
        total_items = sum(len(c["items"]) for c in tx["carts"].values())
    _say(f"   {threads} threads added {n} items to 4 shared carts in {dt:.2f} s "
         f"({n / dt:,.0f} commits/s); {conflicts} conflicts retried; "
         f"{total_items - 2} items in the carts "
         f"({'none lost' if total_items - 2 == n else 'ITEMS LOST'})\n")
    return {"items": total_items - 2, "expected": n, "conflicts": conflicts}


def _read(db: Database, name: str, key: Any) -> Any:
    with db.transaction(readonly=True) as tx:
        return tx[name][key]


def _demo_query(db: Database, n: int) -> TDict[str, Any]:
    from .query import F
    _say(f"2. {n:,} products, two indexes, an AND query")
    cats = ["books", "games", "music", "tools", "garden"]
    t0 = time.perf_counter()
    with db.transaction() as tx:
        tx["products"] = Dict({i: {"name": f"product {i}", "category": cats[i % 5],
                                   "price": (i * 7919) % 1000 / 10} for i in range(n)})
    with db.transaction() as tx:
        tx["products"].create_index("category")
        tx["products"].create_index("price")
    _say(f"   stored and indexed in {time.perf_counter() - t0:.2f} s")
    with db.transaction(readonly=True) as tx:
        p = tx["products"]
        q = p.where(F.category == "books", F.price.between(10, 12))
        t0 = time.perf_counter()
        hits = q.count()
        dt_index = time.perf_counter() - t0
        t0 = time.perf_counter()
        scan = sum(1 for v in p.values() if v["category"] == "books" and 10 <= v["price"] <= 12)
        dt_scan = time.perf_counter() - t0
        plan = q.explain()
    _say(f"   {hits} books priced 10..12: {dt_index * 1e3:.2f} ms with indexes, "
         f"{dt_scan * 1e3:.1f} ms by a Python scan ({scan} found)")
    _say("   " + plan.replace("\n", "\n   ") + "\n")
    return {"hits": hits, "scan": scan, "plan": plan}


def _demo_vectors(db: Database) -> TDict[str, Any]:
    import numpy as np
    from .query import F
    _say("3. hybrid search: a filter plus vector similarity")
    rng = np.random.default_rng(7)
    vecs = rng.normal(size=(2000, 32)).astype("float32")
    langs = ["en" if i % 3 else "de" for i in range(len(vecs))]
    with db.transaction() as tx:
        tx["docs"] = Dict({i: {"lang": langs[i], "embedding": vecs[i]} for i in range(len(vecs))})
        tx["docs"].create_index("lang")
        tx["docs"].create_vector_index("embedding", dim=32, metric="l2")
    query = vecs[5] + 0.01
    times = []
    for _ in range(2):       # the first search loads (or builds) the HNSW index
        with db.transaction(readonly=True) as tx:
            t0 = time.perf_counter()
            hits = tx["docs"].where(F.lang == "en").nearest("embedding", query, k=3)
            scored = list(hits.scored())
            times.append(time.perf_counter() - t0)
    for key, value, distance in scored:
        _say(f"   doc {key} (lang={value['lang']}) at distance {distance:.4f}")
    en = np.array([i for i, lang in enumerate(langs) if lang == "en"])
    exact = en[np.argsort(((vecs[en] - query) ** 2).sum(axis=1), kind="stable")[:3]].tolist()
    keys = [k for k, _, _ in scored]
    _say(f"   {len(en)} of {len(vecs)} docs pass the filter; first search {times[0] * 1e3:.1f} ms "
         f"(builds the HNSW index), then {times[1] * 1e3:.2f} ms; "
         f"{'same as' if keys == exact else 'DIFFERS FROM'} an exact numpy search\n")
    return {"keys": keys, "exact": exact}


def _demo_crash(path: str, commits: int) -> TDict[str, Any]:
    _say("4. crash safety: a child process commits, then is killed with SIGKILL")
    with open_db(path) as db, db.transaction() as tx:
        tx["counter"] = 0
        tx["log"] = List()
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = package_parent + os.pathsep + env.get("PYTHONPATH", "")
    child = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, path], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, text=True)
    acked = 0
    assert child.stdout is not None
    t0 = time.perf_counter()
    for line in child.stdout:
        acked = int(line)
        if acked >= commits:
            break
    dt = time.perf_counter() - t0
    child.send_signal(signal.SIGKILL)
    child.wait()
    if acked == 0:
        assert child.stderr is not None
        raise errors.ProtoBaseError(f"the demo's child process failed: {child.stderr.read()}")
    t0 = time.perf_counter()
    with open_db(path, readonly=True) as db, db.transaction(readonly=True) as tx:
        counter, log = tx["counter"], list(tx["log"])
    reopen = time.perf_counter() - t0
    intact = counter >= acked and log == list(range(1, counter + 1))
    _say(f"   {acked} commits acknowledged in {dt:.2f} s ({acked / dt:,.0f}/s, fsync each); "
         f"killed; reopened in {reopen * 1e3:.1f} ms")
    _say(f"   after recovery: counter = {counter}, log holds {len(log)} entries in order: "
         f"{'every acknowledged commit is there' if intact else 'COMMITS LOST'}\n")
    return {"acked": acked, "counter": counter, "intact": intact}


def cmd_demo(args: argparse.Namespace) -> int:
    out = demo(args.path)
    ok = (out["carts"]["items"] == out["carts"]["expected"] and out["crash"]["intact"]
          and out["check_ok"] and out["query"]["hits"] == out["query"]["scan"]
          and (out["vector"] is None or out["vector"]["keys"] == out["vector"]["exact"]))
    return 0 if ok else 1


# -- entry point ---------------------------------------------------------------------------

def _trust_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument("--trust", action="append", metavar="MODULE",
                   help="decode the classes of this module (imported; repeatable) instead of "
                        "carrying them as opaque payloads")


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="protobase", description="ProtoBase database tool.")
    p.add_argument("--version", action="version", version=f"protobase {__version__}",
                   help="print the version of protobase and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("demo", help="a guided tour: carts, queries, vectors, crash recovery")
    s.add_argument("path", nargs="?", default="protobase-demo.pb",
                   help="demo database file (recreated; default ./protobase-demo.pb)")
    s.set_defaults(fn=cmd_demo)
    for name, fn, text, json_text in [
            ("info", cmd_info, "format, size, commits, collections, root names",
             "print one JSON object instead of text"),
            ("check", cmd_check, "verify every checksum; exit 1 when damaged",
             "print one JSON object (ok, commits, atoms, problems) instead of text"),
            ("compact", cmd_compact, "rewrite the file keeping only live data", None),
            ("stats", cmd_stats, "the file's own figures: commits, size, collections, entries",
             "print one JSON object instead of text")]:
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("path", metavar="PATH", help="the database file (opened read-only)"
                       if name != "compact" else "the database file (rewritten in place)")
        if json_text is not None:
            s.add_argument("--json", action="store_true", help=json_text)
        if name == "info":
            _trust_arg(s)
        s.set_defaults(fn=fn)
    s = sub.add_parser("dump", help="write the root and every reachable collection")
    s.add_argument("path", metavar="PATH", help="the database file (opened read-only)")
    _trust_arg(s)
    s.add_argument("--format", choices=["jsonl", "msgpack"], default="jsonl",
                   help="jsonl: one JSON object per line (default); msgpack: a binary "
                        "MessagePack stream (needs -o or a redirect, never a terminal)")
    s.add_argument("-o", "--output", metavar="FILE",
                   help="write here (atomically, via FILE.part) instead of stdout")
    s.set_defaults(fn=cmd_dump)
    s = sub.add_parser("load", help="load a dump into a new database")
    s.add_argument("path", metavar="PATH", help="the database to create (or an empty one)")
    s.add_argument("file", metavar="FILE", help="the dump to read, as written by dump")
    _trust_arg(s)
    s.add_argument("--format", choices=["jsonl", "msgpack"], default=None,
                   help="the dump's format (default: guessed from the first byte)")
    s.set_defaults(fn=cmd_load)
    return p


def main(argv: Optional[TList[str]] = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except UsageError as exc:
        print(f"protobase: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`protobase dump db | head`): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (errors.ProtoBaseError, OSError) as exc:
        print(f"protobase: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("protobase: interrupted", file=sys.stderr)
        return 130
