"""The log file's byte format: header, atoms, commit footers, and the recovery scan.

Layout (every integer little-endian; docs/format.md "## File" specifies each byte)::

    0        64                                           E1                 E2
    +--------+--------+--------+-----+--------------------+--------+------+--------+
    | header | atom   | atom   | ... | footer (commit 1)  | atom   | ...  | footer |
    +--------+--------+--------+-----+--------------------+--------+------+--------+
              ^ pointer = byte offset of the atom's 8-byte prefix {length, crc}

The header is 64 bytes in format version 2 (this release's: it carries the database
identity, a random UUID made at creation) and was 32 in version 1. A file of version 1 is
still read (every scan below takes the header's size as ``base``, the offset of the
first commit), never written: a writable open rewrites it as version 2 (store.py).

A commit is its atoms followed by one fixed-size footer, so the newest commit's footer
is always the last FOOTER_SIZE bytes of a healthy file: open reads the header and that
footer, never the whole file.

The footer records ``synced``: the file offset up to which the writer had fsynced
successfully when it wrote this commit. Everything below ``synced`` survived an fsync and
is trusted; the commits between ``synced`` and the footer were written by one or more
writes that may have been torn by a crash (pages reach the disk in any order), so
recovery verifies each of their commit checksums. That span is the last group (full
mode) or at most about a second of writes (normal mode); a clean close appends a
"sync mark" footer whose ``synced`` is its own start, which makes the next open O(1).

Checksums are CRC-32 (zlib.crc32) seeded with the file's random 32-bit salt, so bytes
copied from another ProtoBase file (or stored inside an atom) never pass as a footer of
this one.
"""
import struct
import uuid
import zlib

from ..errors import CorruptionError, NotADatabaseError

__all__ = [
    "HEADER_SIZE", "FOOTER_SIZE", "ATOM_PREFIX_SIZE", "FORMAT_VERSION", "READABLE_VERSIONS",
    "HEADER_MAGIC", "FOOTER_MAGIC", "FLAG_SYNC_MARK", "Header", "Footer", "build_header",
    "parse_header", "pack_footer", "make_footer", "read_footer", "find_last_commit",
    "walk_commits", "empty_head", "EMPTY",
]

HEADER_MAGIC = b"\x89ProtoBase\r\n"     # 12 bytes; \x89 and \r\n catch text-mode mangling
FOOTER_MAGIC = b"\x89PBcmt\r\n"         # 8 bytes
FORMAT_VERSION = 2                      # what this build writes (one per release)
FLAG_SYNC_MARK = 1                      # footer with no atoms: "everything before me is synced"

# magic, version, flags, salt, database identity (UUID bytes), reserved, crc
HEADER = struct.Struct("<12sHHI16s24xI")
HEADER_V1 = struct.Struct("<12sHHI8xI")  # magic, version, flags, salt, reserved, crc
_HEADERS = {1: HEADER_V1, 2: HEADER}
READABLE_VERSIONS = tuple(sorted(_HEADERS))
ATOM_PREFIX = struct.Struct("<II")      # length, crc32(data, salt)
# magic, seq, root, length, synced, flags, commit crc, footer crc
FOOTER = struct.Struct("<8sQqQQIII")
FOOTER_BODY = struct.Struct("<8sQqQQII")  # the footer without its own crc

HEADER_SIZE = HEADER.size               # 64 (32 in format version 1)
ATOM_PREFIX_SIZE = ATOM_PREFIX.size     # 8
FOOTER_SIZE = FOOTER.size               # 52
_FOOTER_CRC_AT = FOOTER_BODY.size       # 48

_SCAN_CHUNK = 1 << 16


class Header:
    """A decoded file header: ``version``, ``salt``, ``database_id`` (a uuid.UUID; None in
    format version 1, which had none) and ``size`` (where the first commit starts)."""

    __slots__ = ("version", "salt", "database_id", "size")

    def __init__(self, version, salt, database_id, size):
        self.version, self.salt, self.database_id, self.size = version, salt, database_id, size

    def __repr__(self):
        return (f"Header(version={self.version}, salt={self.salt:#010x}, "
                f"database_id={self.database_id}, size={self.size})")


def build_header(salt, database_id):
    """The 64 header bytes of a new file (this build's format version)."""
    if not isinstance(database_id, uuid.UUID):
        raise TypeError(f"a database identity is a uuid.UUID, not {type(database_id).__name__}")
    body = HEADER.pack(HEADER_MAGIC, FORMAT_VERSION, 0, salt, database_id.bytes, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def parse_header(data, path=None):
    """The file's Header, or None when ``data`` is empty or a torn prefix of a header (a
    crash while the file was being created: a new, empty database). ``data`` is the
    file's first HEADER_SIZE bytes (fewer when the file is shorter). Raises
    NotADatabaseError when the bytes are not ours or are of a format version this build
    does not read, CorruptionError when the header is ours but damaged."""
    magic_n = len(HEADER_MAGIC)
    if len(data) < magic_n + 2:
        if HEADER_MAGIC.startswith(data[:magic_n]):
            return None
        raise NotADatabaseError(f"{path!r} is not a ProtoBase database (no ProtoBase header)")
    if data[:magic_n] != HEADER_MAGIC:
        raise NotADatabaseError(f"{path!r} is not a ProtoBase database (no ProtoBase header)")
    (version,) = struct.unpack_from("<H", data, magic_n)
    layout = _HEADERS.get(version)
    if layout is None:
        # The layout (and so the checksum) of another version is unknown here: refuse on
        # the version alone, before reading anything else.
        raise NotADatabaseError(
            f"{path!r} uses ProtoBase file format version {version}; this build reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}: upgrade protobase to open it")
    if len(data) < layout.size:
        return None                    # the header's own write was torn: a new file
    if zlib.crc32(data[:layout.size - 4]) != struct.unpack_from("<I", data, layout.size - 4)[0]:
        raise CorruptionError(f"the header of {path!r} fails its checksum", offset=0, path=path)
    if version == 1:
        _m, _v, _flags, salt, _crc = HEADER_V1.unpack_from(data)
        return Header(1, salt, None, HEADER_V1.size)
    _m, _v, _flags, salt, ident, _crc = HEADER.unpack_from(data)
    return Header(version, salt, uuid.UUID(bytes=ident), HEADER.size)


class Footer:
    """One decoded commit footer. ``end`` is the offset just past it; ``start`` the offset
    of the commit's first atom."""

    __slots__ = ("seq", "root", "length", "synced", "flags", "commit_crc", "end")

    def __init__(self, seq, root, length, synced, flags, commit_crc, end):
        self.seq, self.root, self.length, self.synced = seq, root, length, synced
        self.flags, self.commit_crc, self.end = flags, commit_crc, end

    @property
    def start(self):
        return self.end - self.length

    def __repr__(self):
        return (f"Footer(seq={self.seq}, root={self.root}, start={self.start}, "
                f"end={self.end}, synced={self.synced}, flags={self.flags})")


_pack_footer_body = FOOTER_BODY.pack
_pack_u32 = struct.Struct("<I").pack


def make_footer(salt, seq, root, length, synced, flags, commit_crc):
    """A footer's 52 bytes."""
    body = _pack_footer_body(FOOTER_MAGIC, seq, root, length, synced, flags, commit_crc)
    return body + _pack_u32(zlib.crc32(body, salt))


def pack_footer(buf, at, salt, seq, root, length, synced, flags, commit_crc):
    """Write a footer into ``buf`` at ``at`` (the commit's bytes are already in place)."""
    FOOTER_BODY.pack_into(buf, at, FOOTER_MAGIC, seq, root, length, synced, flags, commit_crc)
    struct.pack_into("<I", buf, at + _FOOTER_CRC_AT,
                     zlib.crc32(memoryview(buf)[at:at + _FOOTER_CRC_AT], salt))


def _decode_footer(raw, end, salt, base=HEADER_SIZE):
    """The footer in ``raw`` (FOOTER_SIZE bytes ending at file offset ``end``) if it is
    self-consistent, else None. Does not read the commit's atoms. ``base``: the size of
    the file's header (where the first commit starts)."""
    if len(raw) != FOOTER_SIZE or raw[:8] != FOOTER_MAGIC:
        return None
    _m, seq, root, length, synced, flags, ccrc, fcrc = FOOTER.unpack(raw)
    if zlib.crc32(raw[:_FOOTER_CRC_AT], salt) != fcrc:
        return None
    start = end - length
    if length < FOOTER_SIZE or start < base or synced > end or seq < 1:
        return None
    if flags == FLAG_SYNC_MARK and length != FOOTER_SIZE:
        return None
    if flags not in (0, FLAG_SYNC_MARK):
        return None
    if root != -1 and not base <= root < end - FOOTER_SIZE:
        return None
    return Footer(seq, root, length, synced, flags, ccrc, end)


def read_footer(f, end, salt, base=HEADER_SIZE):
    if end - FOOTER_SIZE < base:
        return None
    return _decode_footer(f.read(end - FOOTER_SIZE, FOOTER_SIZE), end, salt, base)


def _commit_ok(f, ft, salt):
    n = ft.length - FOOTER_SIZE
    body = f.read(ft.start, n) if n else b""
    return len(body) == n and zlib.crc32(body, salt) == ft.commit_crc


def _previous_ok(prev, cur):
    # Sequence numbers rise by one per commit; a sync mark repeats its predecessor's.
    if cur.flags == FLAG_SYNC_MARK:
        return prev.seq == cur.seq and prev.root == cur.root
    return prev.seq == cur.seq - 1


def _validate(f, last, salt, strict, base):
    """Given a self-consistent footer ``last``, return the newest commit at or below it
    that is fully trustworthy, or None when ``last`` is not a real commit end (with
    ``strict``, CorruptionError when the footer at its synced point is damaged).

    Commits above ``last.synced`` are re-verified byte for byte (they were never known
    to be on disk); the chain of footers down to ``synced`` must link up exactly."""
    chain = [last]
    cur = last
    while cur.start > last.synced:
        prev = read_footer(f, cur.start, salt, base)
        if prev is None or not _previous_ok(prev, cur):
            return None
        chain.append(prev)
        cur = prev
    if cur.start < last.synced:
        return None
    if cur.start == base and not (cur.seq == 1 and cur.flags == 0):
        return None
    below = None
    if cur.start > base:
        below = read_footer(f, cur.start, salt, base)
        if below is None or not _previous_ok(below, cur):
            if not strict:
                return None
            # `last` vouches that everything below `synced` had been fsynced: damage there
            # is not a torn tail, and stepping back past it would drop durable commits.
            raise CorruptionError(f"the commit footer ending at offset {cur.start} is damaged "
                                  f"(below the synced point of the commit ending at {last.end})",
                                  offset=cur.start - FOOTER_SIZE)
    good = below
    for ft in reversed(chain):
        if not _commit_ok(f, ft, salt):
            break
        good = ft
    return good if good is not None else empty_head(base)


def empty_head(base=HEADER_SIZE):
    """The pseudo-footer of a file with no commit, whose header is ``base`` bytes."""
    return Footer(0, -1, 0, base, 0, 0, base)


# The state before the first commit (of a file of this build's format).
EMPTY = empty_head()


def find_last_commit(f, size, salt, strict=False, base=HEADER_SIZE):
    """The newest valid commit's Footer in a file of ``size`` bytes (a pseudo-footer with
    seq 0, root -1 and end HEADER_SIZE when there is none). Reads the last footer (and
    the commits since the last fsync); scans backwards only past a torn or corrupt tail.

    strict: raise CorruptionError rather than step back past a damaged footer that a
    later valid footer vouches was fsynced (media damage, not a torn write: stepping
    back would silently drop durable commits). Opening and refreshing are strict.
    ``base``: the size of the file's header (Header.size)."""
    if size <= base:
        return empty_head(base)
    last = read_footer(f, size, salt, base)
    if last is not None:
        good = _validate(f, last, salt, strict, base)
        if good is not None:
            return good
    # Torn tail: look backwards for the newest footer that validates.
    hi = size - 1
    while hi >= base:
        lo = max(base, hi - _SCAN_CHUNK)
        window = f.read(lo, hi - lo + len(FOOTER_MAGIC))
        pos = window.rfind(FOOTER_MAGIC)
        while pos >= 0:
            end = lo + pos + FOOTER_SIZE
            if end <= size:
                cand = read_footer(f, end, salt, base)
                if cand is not None:
                    good = _validate(f, cand, salt, strict, base)
                    if good is not None:
                        return good
            pos = window.rfind(FOOTER_MAGIC, 0, pos + len(FOOTER_MAGIC) - 1)
        hi = lo - 1
    return empty_head(base)


def walk_commits(f, end, salt, base=HEADER_SIZE):
    """Every commit footer from the first to the one ending at ``end``, oldest first,
    following the footer chain backwards. Raises CorruptionError at a broken link."""
    out = []
    while end > base:
        ft = read_footer(f, end, salt, base)
        if ft is None:
            raise CorruptionError("commit footer fails its checksum", offset=end - FOOTER_SIZE)
        out.append(ft)
        end = ft.start
    out.reverse()
    return out
