"""Generate docs/api.md, the API reference, from the docstrings of the public API.

    python docs/gen_api.py            # rewrites docs/api.md beside this script
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date

Only what ``protobase.__all__`` exports is documented, in that order; for a class, its
public methods and properties defined in protobase (not those inherited from the
``collections.abc`` mixins, which behave as documented for ``dict``/``list``/``set``).
The output is deterministic, so a stale reference shows up as a diff.
"""
import inspect
import re
import sys
from pathlib import Path

# Document the checkout this script sits in when it is built in place; when its compiled
# core is not built (CI installs the package instead), the installed copy of it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    import protobase  # noqa: E402
except ImportError:
    del sys.path[0]
    for _name in [m for m in sys.modules if m == "protobase" or m.startswith("protobase.")]:
        del sys.modules[_name]
    import protobase  # noqa: E402
import protobase.cli as protobase_cli  # noqa: E402

OUT = Path(__file__).resolve().parent / "api.md"

HEADER = """# ProtoBase API reference

Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.
The command line (`protobase --help`) and its dump format close the page.

## What to know first

- **Values are copies.** A value is encoded when it is written and decoded at every read,
  so `cart = tx["carts"]["u1"]` is a new object the caller owns: changing it changes
  nothing stored. Mutate it and write it back (`cart["items"].append(x);
  tx["carts"]["u1"] = cart`). The pb collections (`Dict`, `List`, `Set`, `SortedDict`) are
  the exception: they are stored by reference, and a handle read in a transaction writes
  through to the database.
- **Missing fields.** A term on a field an entry does not have is false, so `F.x != v`
  skips entries without `x`; `~(F.x == v)` is the complement over the collection and
  includes them. `F.x.exists()` tests presence.
- **One comparison rule.** Values of different type classes are unequal and unordered
  (`<`, `>`... are false, `!=` is true); int, float, Decimal and bool compare as numbers.
  An index never changes a query's answer, only its speed.
- **Distances** (`hits.scored()`, `hits.distances()`, ascending): `"l2"` is the squared
  Euclidean distance, `"ip"` is 1 − dot product, `"cosine"` is 1 − cosine similarity.
- **Files.** A database at `PATH` is the one file `PATH`; a writer holds an `flock` on
  that file itself (there is no lock file). Beside it: `PATH-vec-<collection id>-<field>.hnsw`,
  one per vector index, the checkpoint of its graph, written at close (written through a
  temporary `....hnsw.tmp-*` file; rebuilt when missing or not matching the database);
  `PATH.compact` only while a compaction runs (an interrupted one is removed at the next
  open); `db.backup(target)` writes `target.partial` and renames it to `target` when
  complete. `pb.open()` or `":memory:"` makes no files.
- **Durability.** `durability="full"` (default) fsyncs before `commit()` returns;
  `"normal"` writes before it returns and fsyncs within a second; `"none"` fsyncs at
  `close()` and `db.checkpoint()` only. A new transaction sees every commit acknowledged
  before it began (a read-only database re-reads the file's head when it starts one).
"""


def _doc(obj):
    text = inspect.cleandoc(inspect.getdoc(obj) or "").strip()
    first, _, rest = text.partition("\n")
    if first.startswith(f"{getattr(obj, '__name__', '')}(") and first.endswith(")"):
        text = rest.strip()                 # Cython's embedded signature: already in the heading
    return text


def _signature(obj, method=False):
    try:
        try:
            sig = inspect.signature(obj, eval_str=True)   # "Database" -> Database
        except NameError:                                 # a name imported for type checkers only
            sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = list(sig.parameters.values())
    if method and params and params[0].name in ("self", "cls"):
        sig = sig.replace(parameters=params[1:])
    text = str(sig).replace(" -> None", "")
    # Annotations as a reader writes them: no module paths, no TypeVar tildes.
    text = re.sub(r"'(\w+\[[^']*\])'", r"\1", text)           # 'Hits[_K, _V]' -> Hits[_K, _V]
    return re.sub(r"\b(?:protobase|typing|collections\.abc)\.(?:\w+\.)*(?=\w)", "", text).replace("~", "")


def _own_members(cls):
    """Public methods and properties that protobase itself defines for cls."""
    seen = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("protobase"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") and name != "__init__":
                continue
            if name == "__init__" and not getattr(member, "__doc__", None):
                continue                    # nothing to say beyond the class docstring
            if isinstance(member, (property, staticmethod, classmethod)) or inspect.isfunction(member):
                seen[name] = member
    return sorted(seen.items(), key=lambda kv: (kv[0] != "__init__", kv[0]))


# Classes users never construct themselves: say where they come from instead.
MADE_BY = {"Database": "`pb.open(...)`", "Transaction": "`db.transaction(...)`",
           "Query": "`coll.where(...)`"}


def _section_for_class(name, cls, prefix=None):
    """A class's section; `prefix` names an instance (``F``) whose methods are documented."""
    out = [f"## `{name}`\n"]
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    if bases and prefix is None:
        out.append(f"*Bases: {', '.join(f'`{b}`' for b in bases)}*\n")
    if name in MADE_BY:
        out.append(f"*Made by {MADE_BY[name]}.*\n")
    if _doc(cls):
        out.append(_doc(cls) + "\n")
    if prefix is not None:
        out.append(f"`{prefix} == v`, `!=`, `<`, `<=`, `>`, `>=` build terms; terms combine with "
                   "`&` (and), `|` (or) and `~` (not); several arguments to `where()` are ANDed.\n")
    for mname, member in _own_members(cls):
        if mname == "__init__" and (name in MADE_BY or prefix is not None):
            continue
        if isinstance(member, property):
            out.append(f"### `{prefix or name}.{mname}` *(property)*\n")
            target = member.fget
        else:
            target = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
            shown = name if mname == "__init__" else f"{prefix or name}.{mname}"
            out.append(f"### `{shown}{_signature(target, method=not isinstance(member, staticmethod))}`\n")
        doc = _doc(target)
        if doc:
            out.append(doc + "\n")
    return out


def _section_for_errors():
    out = ["## Errors\n", "All derive from `ProtoBaseError`; the second column shows the "
           "built-in each also is, where the meaning matches.\n",
           "| error | also | meaning |", "|---|---|---|"]
    for ename in protobase.errors.__all__:
        exc = getattr(protobase.errors, ename)
        also = ", ".join(f"`{b.__name__}`" for b in exc.__mro__[1:]
                         if b.__module__ == "builtins" and b not in (Exception, BaseException, object))
        first = _doc(exc).split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
        out.append(f"| `{ename}` | {also} | {first} |")
    out.append("")
    return out


def render():
    parts = [HEADER]
    for name in protobase.__all__:
        obj = getattr(protobase, name)
        if name == "errors" or (inspect.isclass(obj) and issubclass(obj, BaseException)):
            continue
        if inspect.isclass(obj):
            parts.extend(_section_for_class(name, obj))
        elif inspect.isroutine(obj) or "function" in type(obj).__name__:   # incl. Cython
            parts.append(f"## `{name}{_signature(obj)}`\n")
            parts.append(_doc(obj) + "\n")
        else:                               # an instance such as F: document its class
            parts.extend(_section_for_class(name, type(obj), prefix=f"{name}.field"))
    parts.extend(_section_for_errors())
    parts.append("## Command line\n")
    parts.append("From the docstring of `protobase.cli`:\n")
    parts.append(inspect.cleandoc(protobase_cli.__doc__ or "").replace("``", "`") + "\n")
    return "\n".join(parts).rstrip() + "\n"


def main(argv):
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
