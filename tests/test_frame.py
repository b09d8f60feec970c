"""protobase._core.frame: atom batches and commit framing, checked against a plain Python
model of the log's atom format (u32 length, u32 crc32(data, salt), data)."""
import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from protobase._core import load
from protobase.errors import TransactionClosedError

frame = load("frame")

atoms = st.lists(st.binary(max_size=300), max_size=40)
salts = st.integers(0, 2**32 - 1)


def model_frame(datas, salt):
    return b"".join(struct.pack("<II", len(d), zlib.crc32(d, salt)) + d for d in datas)


def model_ptrs(start, datas):
    out, pos = [], start
    for d in datas:
        out.append(pos)
        pos += 8 + len(d)
    return out, pos


def parse(body, salt):
    """Walk a framed body back into its atoms, verifying every checksum."""
    out, pos = [], 0
    while pos < len(body):
        n, crc = struct.unpack_from("<II", body, pos)
        data = body[pos + 8:pos + 8 + n]
        assert len(data) == n and zlib.crc32(data, salt) == crc
        out.append(data)
        pos += 8 + n
    return out


@settings(derandomize=True, max_examples=200)
@given(atoms, salts)
def test_frame_atoms_matches_the_model(datas, salt):
    body = frame.frame_atoms(datas, salt)
    assert body == model_frame(datas, salt)
    assert parse(body, salt) == datas


@settings(derandomize=True, max_examples=200)
@given(st.integers(32, 10**9), atoms, salts)
def test_batch_pointers_frame_and_find(start, datas, salt):
    b = frame.AtomBatch(start)
    ptrs = []
    for i, d in enumerate(datas):
        # Alternate bytes with other buffer types: both must be stored as bytes.
        ptrs.append(b.append(d if i % 2 else bytearray(d)))
    want_ptrs, want_pos = model_ptrs(start, datas)
    assert ptrs == want_ptrs == b.ptrs
    assert b.datas == datas and all(type(d) is bytes for d in b.datas)
    assert (b.start, b.pos, b.payload, len(b)) == (start, want_pos, sum(map(len, datas)), len(datas))
    assert b.frame(salt) == model_frame(datas, salt)
    for p, d in zip(ptrs, datas):
        assert b.find(p) == d
    for p in ptrs:
        assert b.find(p + 1) is None or (p + 1) in ptrs
    assert b.find(start - 1) is None and b.find(want_pos) is None


@settings(derandomize=True, max_examples=100)
@given(st.lists(atoms, max_size=5))
def test_extend_equals_appending_one_by_one(chunks):
    one, many = frame.AtomBatch(100), frame.AtomBatch(100)
    for chunk in chunks:
        got = many.extend(iter(chunk))
        assert got == [one.append(d) for d in chunk]
    assert one.ptrs == many.ptrs and one.datas == many.datas and one.pos == many.pos
    assert one.frame(7) == many.frame(7)


def test_a_closed_batch_refuses_atoms_but_stays_readable():
    b = frame.AtomBatch(32)
    p = b.append(b"abc")
    b.close()
    assert b.closed
    with pytest.raises(TransactionClosedError):
        b.append(b"x")
    with pytest.raises(TransactionClosedError):
        b.extend([b"x"])
    assert b.find(p) == b"abc" and b.datas == [b"abc"] and b.pos == 32 + 8 + 3
    assert b.frame(1) == model_frame([b"abc"], 1)


def test_bad_arguments():
    with pytest.raises(ValueError):
        frame.AtomBatch(-1)
    b = frame.AtomBatch(0)
    with pytest.raises(TypeError):
        b.append(12)
    with pytest.raises(TypeError):
        frame.frame_atoms([b"ok", 3], 0)
    # A failed extend adds nothing.
    with pytest.raises(TypeError):
        b.extend([b"a", None])
    assert len(b) == 0 and b.pos == 0


def test_empty_batch_and_empty_atoms():
    b = frame.AtomBatch(32)
    assert b.frame(5) == b"" and frame.frame_atoms([], 5) == b""
    p = b.append(b"")
    assert p == 32 and b.pos == 40 and b.find(32) == b""
    assert b.frame(5) == struct.pack("<II", 0, zlib.crc32(b"", 5))


def test_constants():
    assert frame.PREFIX_SIZE == 8 and frame.MAX_ATOM == 2**32 - 1


# ---- AtomReader: the store's C read path ------------------------------------------------

class _Fallback:
    """Stands in for the store's Python read path: records the pointers it is asked."""

    def __init__(self):
        self.asked = []

    def __call__(self, ptr):
        self.asked.append(ptr)
        return b"fallback"


def _log_file(tmp_path, datas, salt):
    """A file shaped like a log: a 32-byte header, then the framed atoms."""
    path = tmp_path / "log"
    path.write_bytes(b"H" * 32 + frame.frame_atoms(datas, salt))
    ptrs, end = model_ptrs(32, datas)
    return path, ptrs, end


@pytest.mark.parametrize("durable", ["all", "none"])
def test_reader_returns_checked_atoms_from_the_mapping_or_pread(tmp_path, durable):
    from protobase.storage.cache import AtomBytesCache
    import os
    salt = 0x5EED
    datas = [b"", b"a", b"x" * 4087, b"y" * 4089, os.urandom(9000), b"tail"]
    path, ptrs, end = _log_file(tmp_path, datas, salt)
    fd = os.open(path, os.O_RDONLY)
    try:
        cache, fb, stats = AtomBytesCache(1 << 20), _Fallback(), {"reads": 0}
        r = frame.AtomReader(cache, fd, salt, fb, stats, None, end,
                             end if durable == "all" else 32)
        assert [r.read(p) for p in ptrs] == datas and fb.asked == []
        second = 0 if durable == "all" else sum(len(d) > 4088 for d in datas)
        assert stats["reads"] == len(datas) + second and cache.misses == len(datas)
        if durable == "all":
            assert r.mapped == end and len(cache) == 0     # mapped atoms skip the cache
        else:
            assert r.mapped == 0 and len(cache) == len(datas)
            assert [r.read(p) for p in ptrs] == datas and cache.hits == len(datas)
        # Everything the C path cannot vouch for goes to the fallback.
        bads = [0, 31, -1, 10 ** 30, end, end + 100, ptrs[1] + 1]
        for bad in bads:
            assert r.read(bad) == b"fallback"
        assert fb.asked == bads
        r.closed = True
        assert r.read(ptrs[-1]) in (b"fallback", datas[-1])  # a cached copy may answer
        r.unmap()
        assert r.mapped == 0
    finally:
        os.close(fd)


def test_reader_hands_damaged_atoms_to_the_fallback(tmp_path):
    from protobase.storage.cache import AtomBytesCache
    import os
    salt = 7
    datas = [b"alpha" * 30, b"beta" * 2000]
    path, ptrs, end = _log_file(tmp_path, datas, salt)
    raw = bytearray(path.read_bytes())
    raw[ptrs[0] + 8 + 5] ^= 1                 # payload of the first atom
    raw[ptrs[1]] ^= 0x80                      # length of the second: runs past the end
    path.write_bytes(bytes(raw))
    fd = os.open(path, os.O_RDONLY)
    try:
        for durable in (end, 32):
            fb = _Fallback()
            r = frame.AtomReader(AtomBytesCache(1 << 20), fd, salt, fb, {"reads": 0}, None,
                                 end, durable)
            assert r.read(ptrs[0]) == b"fallback" and r.read(ptrs[1]) == b"fallback"
            assert fb.asked == ptrs
        # No descriptor, or no salt yet: the fallback answers everything.
        fb = _Fallback()
        r = frame.AtomReader(AtomBytesCache(1 << 20), -1, salt, fb, {"reads": 0}, None, end)
        assert r.read(ptrs[0]) == b"fallback"
        r = frame.AtomReader(AtomBytesCache(1 << 20), fd, None, fb, {"reads": 0}, None, end)
        assert r.read(ptrs[0]) == b"fallback" and fb.asked == [ptrs[0], ptrs[0]]
    finally:
        os.close(fd)
