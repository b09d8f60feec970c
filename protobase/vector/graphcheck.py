"""Bounds-check an hnswlib graph (the bytes ``Index.save_index`` writes) before
``load_index`` sees it.

hnswlib trusts its file: a neighbour id past the element count, a link count beyond the
list's room, or an entry point above its own level makes a later search read outside its
arrays (a segfault, or worse). A checkpoint passes the CRC whenever whoever wrote it
recomputed the CRC, so the graph is parsed here and every value a search follows is
checked; a graph that fails is refused with ValueError naming what is wrong, and the caller
rebuilds the index from the rows.

The format (hnswlib 0.8, ``HierarchicalNSW::saveIndex``; little-endian, native sizes of a
64-bit build)::

    header (96 bytes)
        u64 offsetLevel0 (0)      u64 max_elements      u64 cur_element_count
        u64 size_data_per_element u64 label_offset      u64 offsetData
        i32 maxlevel              u32 enterpoint_node
        u64 maxM (M)              u64 maxM0 (2M)        u64 M
        f64 mult (1 / ln M)       u64 ef_construction
    level 0: cur_element_count records of size_data_per_element bytes
        u16 link count | u8 flags (bit 0: deleted) | u8 0 | u32 neighbour[maxM0]
        | float32 vector[dim] | u64 label
    then per element: u32 byte size of its upper levels (level * (4 + 4 * maxM)), and
    that many bytes: per level 1..level, u16 link count | u16 0 | u32 neighbour[maxM]

Checked: every size and offset is the one the settings imply (M, ef_construction, the
level multiplier), nothing is left over, ``cur_element_count <= max_elements`` and the
capacity no larger than ProtoBase ever asks for (it is allocated at load), every link count within its list's room, every
neighbour id below the element count and, on an upper level, of an element that reaches
that level; levels at most ``maxlevel``, the entry point's level exactly ``maxlevel``;
labels distinct and below 2**63; vectors finite; flags only the deleted bit.
"""
import math
import struct

import numpy as np

__all__ = ["check_graph", "HEADER"]

HEADER = struct.Struct("<6Q i I 3Q d Q")
# The most room a graph ProtoBase saved can have: HnswIndex starts at 1024 (or 1.25 times
# the rows) and doubles when full, so at most twice the element count beyond that.
ROOM = 4096


def check_graph(data, dim, M, ef_construction):
    """Raise ValueError (saying what is wrong) unless ``data`` is a well-formed hnswlib
    graph of float32 vectors of ``dim`` items built with ``M`` and ``ef_construction``;
    return its element count."""
    try:
        return _check(memoryview(data).cast("B"), dim, M, ef_construction)
    except ValueError as exc:
        raise ValueError(f"bad hnswlib graph: {exc}") from None


def _check(data, dim, M, ef_construction):
    if len(data) < HEADER.size:
        raise ValueError("graph shorter than its header")
    (off0, max_el, count, per_el, label_off, data_off, maxlevel, enter, max_m, max_m0,
     m, mult, efc) = HEADER.unpack_from(data, 0)
    links0 = 4 + 4 * max_m0
    if m != M or max_m != M or max_m0 != 2 * M:
        raise ValueError(f"graph links M={m}/{max_m}/{max_m0}, settings say M={M}")
    if not (math.isfinite(mult) and abs(mult - 1.0 / math.log(M)) <= 1e-9 * mult):
        raise ValueError(f"graph level multiplier {mult!r} is not 1/ln(M)")
    if (off0, data_off, label_off, per_el) != (0, links0, links0 + 4 * dim,
                                               links0 + 4 * dim + 8):
        raise ValueError("graph record layout does not match its settings")
    if efc != max(ef_construction, M):
        raise ValueError(f"graph ef_construction {efc}, settings say {ef_construction}")
    if count > max_el:
        raise ValueError(f"graph holds {count} elements, more than its capacity {max_el}")
    if max_el > max(ROOM, 4 * count):          # hnswlib allocates it all at load
        raise ValueError(f"graph capacity {max_el} for {count} elements")
    end0 = HEADER.size + count * per_el
    if end0 + 4 * count > len(data):
        raise ValueError("graph shorter than its element count says")
    if count == 0:
        if len(data) != end0:
            raise ValueError("bytes after an empty graph")
        return 0
    if not 0 <= maxlevel < 64 or enter >= count:
        raise ValueError(f"graph entry point {enter} or top level {maxlevel} out of range")

    recs = np.frombuffer(data, np.uint8, count * per_el, HEADER.size).reshape(count, per_el)
    nlinks = recs[:, 0:2].copy().view("<u2")[:, 0]
    if (nlinks > max_m0).any():
        raise ValueError(f"a level-0 link count exceeds {max_m0}")
    if (recs[:, 2] & ~np.uint8(1)).any() or recs[:, 3].any():
        raise ValueError("unknown element flags")
    ids = recs[:, 4:links0].copy().view("<u4")
    used = np.arange(max_m0) < nlinks[:, None]
    if (ids[used] >= count).any():
        raise ValueError("a level-0 neighbour id beyond the element count")
    if not np.isfinite(recs[:, links0:label_off].copy().view("<f4")).all():
        raise ValueError("a graph vector is not finite")
    labels = recs[:, label_off:per_el].copy().view("<u8")[:, 0]
    if (labels >= 1 << 63).any() or len(np.unique(labels)) != count:
        raise ValueError("graph labels are not distinct row ids")

    per_level = 4 + 4 * max_m
    levels = np.zeros(count, np.int64)
    starts = {}
    pos = end0
    size = struct.Struct("<I")
    for i in range(count):
        if pos + 4 > len(data):
            raise ValueError("graph ends inside its upper levels")
        (nbytes,) = size.unpack_from(data, pos)
        pos += 4
        if nbytes:
            level, rest = divmod(nbytes, per_level)
            if rest or level > maxlevel or pos + nbytes > len(data):
                raise ValueError(f"element {i}'s upper levels are malformed")
            levels[i] = level
            starts[i] = pos
            pos += nbytes
    if pos != len(data):
        raise ValueError("bytes after the graph")
    if levels[enter] != maxlevel:
        raise ValueError("the graph's entry point does not reach its top level")
    for i, start in starts.items():
        block = np.frombuffer(data, np.uint8, int(levels[i]) * per_level, start)
        block = block.reshape(-1, per_level)
        n = block[:, 0:2].copy().view("<u2")[:, 0]
        if (n > max_m).any() or block[:, 2:4].any():
            raise ValueError(f"element {i}: an upper link count exceeds {max_m}")
        nb = block[:, 4:].copy().view("<u4")
        for lv in range(len(block)):
            got = nb[lv, :n[lv]]
            if (got >= count).any() or (levels[got] < lv + 1).any():
                raise ValueError(f"element {i}: a level-{lv + 1} neighbour beyond the graph")
    return count
