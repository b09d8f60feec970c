"""vkernel's distances are defined bit for bit (vkernel.pyx's essay: 16 float32 lanes, item
i into lane i mod 16, the lanes folded 8/4/2/1), so they are checked here for exact
equality against that definition written out in numpy float32 arithmetic (each numpy
elementwise float32 operation is one IEEE rounding, whatever SIMD numpy dispatches to),
and against themselves across every way of reaching a row."""
import numpy as np
import pytest

from protobase._core import load

vk = load("vkernel")


def lanes(terms):
    """The essay's sum of float32 ``terms``, one IEEE operation at a time."""
    acc = np.zeros(16, np.float32)
    full = len(terms) - len(terms) % 16
    for i in range(0, full, 16):
        acc = acc + terms[i:i + 16]
    tail = terms[full:]
    acc[:len(tail)] = acc[:len(tail)] + tail
    for width in (8, 4, 2, 1):
        acc[:width] = acc[:width] + acc[width:2 * width]
    return acc[0]


def reference(row, q, l2):
    if l2:
        t = row - q
        return lanes(t * t)
    return np.float32(1.0) - lanes(row * q)


@pytest.mark.parametrize("seed", range(6))
def test_distances_follow_the_fixed_lane_order_bit_for_bit(seed):
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    for dim in (1, 3, 15, 16, 17, 31, 33, 64, 100, 128, 385):
        scale = np.float32(10.0) ** rng.integers(-15, 16, size=(9, 1))   # no overflow
        mat = (rng.standard_normal((9, dim)) * scale).astype(np.float32)
        q = rng.standard_normal(dim).astype(np.float32)
        for l2 in (False, True):
            out = np.empty(9, np.float32)
            vk.distances(mat, q, out, l2)
            want = np.array([reference(row, q, l2) for row in mat], np.float32)
            assert out.tobytes() == want.tobytes(), (dim, l2)
            ids, dist = vk.rank(mat, q, np.arange(9, dtype=np.int64) * 7, 9, l2)
            order = np.lexsort((np.arange(9), want))
            assert ids == (order * 7).tolist()
            assert np.array(dist, np.float32).tobytes() == want[order].tobytes()


def test_a_row_gets_the_same_distance_on_every_path_and_at_any_place():
    """The same row, alone, inside a large matrix, gathered by ``pos`` or scanned in
    place, and merged through top_k: one float32, bit for bit (BLAS gives none of this:
    its sgemv sums by blocks that depend on the matrix's size)."""
    rng = np.random.default_rng(11)
    dim, n = 96, 5000
    big = rng.standard_normal((n, dim)).astype(np.float32)
    q = rng.standard_normal(dim).astype(np.float32)
    for l2 in (False, True):
        whole = np.empty(n, np.float32)
        vk.distances(big, q, whole, l2)
        for j in (0, 1, 2047, 2048, 4999):
            alone = np.empty(1, np.float32)
            vk.distances(big[j:j + 1].copy(), q, alone, l2)
            assert alone[0] == whole[j] == reference(big[j], q, l2)
        rowids = rng.permutation(n * 2)[:n].astype(np.int64)           # sparse row ids
        pos = np.full(n * 2 + 1, -1, np.int64)
        pos[rowids] = rng.permutation(n)                               # scattered slots
        mat = np.empty_like(big)
        mat[pos[rowids]] = big
        asked = np.concatenate([rowids, [n * 2 - 1, n * 3]]).astype(np.int64)  # some absent
        asked = np.unique(asked)
        present = asked[(asked < len(pos)) & (pos[np.minimum(asked, len(pos) - 1)] >= 0)]
        gathered = vk.rank(mat, q, asked, 50, l2, pos)
        in_place = vk.rank(big, q, rowids, 50, l2)
        d = np.empty(n, np.float32)
        vk.distances(big, q, d, l2)
        merged = vk.top_k(d, rowids, 50, False)
        assert gathered == in_place == merged
        assert len(present) == n


def test_rank_refuses_a_position_outside_its_matrix():
    mat = np.zeros((3, 4), np.float32)
    q = np.zeros(4, np.float32)
    pos = np.array([0, 1, 7, -1], np.int64)
    assert vk.rank(mat, q, np.array([0, 1, 3, 9], np.int64), 5, True, pos) == (
        [0, 1], [0.0, 0.0])                                     # 3 and 9 have no row
    with pytest.raises(ValueError, match="row 7 of 3"):
        vk.rank(mat, q, np.array([0, 2], np.int64), 5, True, pos)
    with pytest.raises(ValueError):
        vk.rank(mat, np.zeros(5, np.float32), np.array([0], np.int64), 1, True, pos)
    with pytest.raises(ValueError):
        vk.rank(mat, q, np.array([0, 1], np.int64), 1, True)    # 3 rows, 2 ids


def test_stored_and_query_vectors_reach_unit_length_by_one_computation():
    rng = np.random.default_rng(5)
    mat = (rng.standard_normal((50, 37)) * 3).astype(np.float32)
    mat[7] = 0.0
    out = np.empty_like(mat)
    assert vk.rows_to_space(mat, out, True)
    for j in range(50):
        one = np.empty(37, np.float32)
        assert vk.to_space(mat[j], one, True)
        assert one.tobytes() == out[j].tobytes()
    assert not out[7].any()
    bad = mat.copy()
    bad[3, 5] = np.inf
    assert not vk.rows_to_space(bad, out, True)
