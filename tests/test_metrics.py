"""gradreg_fast.metrics against hand-computed cases and brute-force references."""

import ctypes
import math

import numpy as np
import pytest
import torch

from gradreg_fast import metrics


def cube(shape, start, size, label=1):
    out = np.zeros(shape, np.int64)
    out[tuple(slice(s, s + size) for s in start)] = label
    return out


def brute_force_distances(a, b, spacing):
    """Every surface voxel's distance to the nearest surface voxel of the other mask, by enumeration."""
    def surface_points(mask):
        points = []
        for index in np.argwhere(mask):
            for axis in range(3):
                for step in (-1, 1):
                    neighbour = index.copy()
                    neighbour[axis] += step
                    if (neighbour < 0).any() or (neighbour >= mask.shape).any() or not mask[tuple(neighbour)]:
                        points.append(index)
                        break
                else:
                    continue
                break
        return np.unique(np.array(points), axis=0) * np.asarray(spacing)

    pa, pb = surface_points(a), surface_points(b)
    pairwise = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    return pairwise.min(axis=1), pairwise.min(axis=0)


def test_dice_hand_computed():
    shape = (20, 12, 12)
    a = cube(shape, (0, 0, 0), 10)
    b = cube(shape, (5, 0, 0), 10)  # overlap 5 x 10 x 10 = 500 of 1000 each
    assert metrics.dice(a, b) == {1: pytest.approx(0.5)}
    small = cube(shape, (2, 2, 2), 4)  # 64 voxels inside a's 1000
    assert metrics.dice(a, small)[1] == pytest.approx(2 * 64 / 1064)
    assert metrics.dice(a, a)[1] == 1.0
    two = a + cube(shape, (12, 0, 0), 4, label=2)
    scores = metrics.dice(two, a, labels=[1, 2, 7])
    assert scores[1] == 1.0 and scores[2] == 0.0 and math.isnan(scores[7])  # 7 absent from both: undefined
    assert metrics.dice(torch.from_numpy(a)[None], torch.from_numpy(b)[None]) == {1: pytest.approx(0.5)}
    with pytest.raises(ValueError, match="same shape"):
        metrics.dice(a, b[:-1])


def test_surface_distance_parallel_planes_anisotropic():
    """Two one-voxel planes 3 voxels apart along x: every surface distance is 3 * spacing_x."""
    shape, spacing = (10, 6, 5), (2.0, 0.7, 1.3)
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[2], b[5] = True, True
    assert metrics.average_surface_distance(a, b, spacing) == pytest.approx(6.0)
    assert metrics.hausdorff95(a, b, spacing) == pytest.approx(6.0)
    assert metrics.average_surface_distance(a, a, spacing) == 0.0


def test_surface_distance_concentric_cubes():
    """Cube of side 6 centred in a cube of side 10: the inner surface is exactly 2 voxels from the outer."""
    shape, spacing = (14, 14, 14), 1.5
    outer, inner = cube(shape, (2, 2, 2), 10).astype(bool), cube(shape, (4, 4, 4), 6).astype(bool)
    inner_to_outer = metrics.surface_distances(inner, outer, spacing)[0]
    assert np.allclose(inner_to_outer, 3.0)  # 2 voxels * 1.5 mm, for every inner surface voxel
    assert len(inner_to_outer) == 6 ** 3 - 4 ** 3
    ab, ba = brute_force_distances(outer, inner, (spacing,) * 3)
    pooled = np.concatenate([ab, ba])
    assert metrics.average_surface_distance(outer, inner, spacing) == pytest.approx(pooled.mean())
    assert metrics.hausdorff95(outer, inner, spacing) == pytest.approx(np.percentile(pooled, 95))


def test_surface_metrics_match_brute_force_on_random_shapes():
    rng = np.random.default_rng(3)
    shape, spacing = (11, 9, 8), (1.2, 0.8, 2.5)
    a = np.zeros(shape, np.int64)
    b = np.zeros(shape, np.int64)
    a[2:8, 1:7, 1:6] = 1
    b[3:10, 2:8, 2:7] = 1
    a[rng.random(shape) < 0.05] = 2  # a scattered second label
    b[rng.random(shape) < 0.05] = 2
    table = metrics.label_metrics(a, b, spacing)
    for label in (1, 2):
        ab, ba = brute_force_distances(a == label, b == label, spacing)
        pooled = np.concatenate([ab, ba])
        assert table[label]["asd"] == pytest.approx(pooled.mean())
        assert table[label]["hd95"] == pytest.approx(np.percentile(pooled, 95))
        overlap = np.logical_and(a == label, b == label).sum()
        assert table[label]["dice"] == pytest.approx(2 * overlap / ((a == label).sum() + (b == label).sum()))


def test_surface_metrics_undefined_when_a_mask_is_empty():
    a = cube((8, 8, 8), (1, 1, 1), 3)
    empty = np.zeros_like(a)
    assert math.isnan(metrics.average_surface_distance(a, empty))
    assert math.isnan(metrics.hausdorff95(empty, a))
    assert all(math.isnan(v) for v in metrics.surface_metrics(a, empty, labels=[1])[1].values())
    with pytest.raises(ValueError, match="spacing"):
        metrics.average_surface_distance(a, a, spacing=(1.0, 0.0, 1.0))


def test_jacobian_identity_and_linear_maps():
    shape = (6, 7, 5)
    zero = np.zeros((3,) + shape)
    assert np.allclose(metrics.jacobian_determinant(zero), 1.0)
    assert metrics.folding_percent(zero) == 0.0 and metrics.sd_log_jacobian(zero) == 0.0
    matrix = np.array([[0.1, 0.02, 0.0], [0.0, -0.2, 0.05], [0.03, 0.0, 0.3]])
    grid = np.indices(shape).astype(float)
    linear = np.einsum("ij,j...->i...", matrix, grid)  # u(x) = M x: det(I + M) everywhere, borders included
    det = metrics.jacobian_determinant(torch.from_numpy(linear)[None])
    assert np.allclose(det, np.linalg.det(np.eye(3) + matrix))
    assert metrics.sd_log_jacobian(linear) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(2, 2, 2), (5, 2, 7), (13, 9, 11)])
def test_jacobian_of_the_core_is_the_numpy_expression_bit_for_bit(shape):
    """The CPU core's determinant against the numpy expression it replaces: the same doubles (signs of zero
    included), for float32 and non-contiguous flows too, and on a flow with exact zero determinants."""
    rng = np.random.default_rng(sum(shape))
    flow = rng.normal(0.0, 0.5, (3,) + shape)
    flow[:, ::2] = np.round(flow[:, ::2] * 4) / 4  # quarter steps: many exactly representable derivatives
    for value in (flow, flow.astype(np.float32), np.ascontiguousarray(flow.transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1),
                  torch.from_numpy(flow)[None]):
        got = metrics.jacobian_determinant(value)
        expected = metrics._jacobian_determinant_numpy(metrics._flow(value))
        assert got.shape == shape and np.array_equal(got, expected)
        assert np.array_equal(np.signbit(got), np.signbit(expected))
    flat = np.zeros((3,) + shape)
    flat[0] = -np.indices(shape)[0].astype(float)  # d(x0 + u0)/dx0 = 0: det exactly 0, folding everywhere
    assert np.array_equal(metrics.jacobian_determinant(flat), np.zeros(shape)) and metrics.folding_percent(flat) == 100


def test_folding_and_sdlogj_hand_computed():
    shape = (8, 6, 4)
    x0 = np.indices(shape)[0].astype(float)
    folded = np.zeros((3,) + shape)
    folded[0] = -2.0 * x0  # d(x0 + u0)/dx0 = -1: every voxel folds
    assert metrics.folding_percent(folded) == 100.0
    half = np.zeros((3,) + shape)
    rows = np.indices(shape)[1]
    slope = np.where(rows < 3, 0.5, -0.5)  # det = 1.5 in one half of the rows, 0.5 in the other
    half[0] = slope * x0
    assert np.allclose(np.unique(np.round(metrics.jacobian_determinant(half), 12)), [0.5, 1.5])
    assert metrics.sd_log_jacobian(half) == pytest.approx(math.log(3) / 2)
    assert metrics.folding_percent(half) == 0.0
    mask = np.zeros(shape, bool)
    mask[:, :3] = True
    assert metrics.sd_log_jacobian(half, mask=mask) == pytest.approx(0.0, abs=1e-12)
    mixed = half.copy()
    mixed[0] = np.where(rows < 3, -2.0, 0.0) * x0  # half the voxels fold
    assert metrics.folding_percent(mixed) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="flow"):
        metrics.folding_percent(np.zeros((2,) + shape))
    with pytest.raises(ValueError, match="mask"):
        metrics.folding_percent(half, mask=np.ones((3, 3, 3), bool))


def random_atlas(shape, labels, rng, blobs_per_label=2):
    """A label map of ``labels`` ids: overlapping random boxes, later ones on top, some ids unused."""
    atlas = np.zeros(shape, np.int64)
    for label in labels:
        for _ in range(blobs_per_label):
            size = rng.integers(1, np.maximum(2, np.asarray(shape) // 3))
            start = rng.integers(0, np.asarray(shape) - size + 1)
            atlas[tuple(slice(s, s + n) for s, n in zip(start, size))] = label
    return atlas


def whole_volume_table(a, b, spacing, labels):
    """Dice and ASD/HD95 per label from masks of the whole volume and its distance transform."""
    table = {}
    for label in labels:
        in_a, in_b = a == label, b == label
        total = int(in_a.sum() + in_b.sum())
        dice = 2 * int((in_a & in_b).sum()) / total if total else math.nan
        ab, ba = metrics.surface_distances(in_a, in_b, spacing)
        if ab is None:
            table[label] = {"dice": dice, "asd": math.nan, "hd95": math.nan}
        else:
            pooled = np.concatenate([ab, ba])
            table[label] = {"dice": dice, "asd": pooled.mean(), "hd95": np.percentile(pooled, 95)}
    return table


def assert_same_table(got, expected):
    assert list(got) == list(expected)
    for label, values in expected.items():
        for key, value in values.items():
            if math.isnan(value):
                assert math.isnan(got[label][key]), (label, key)
            else:
                assert got[label][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (label, key)


@pytest.mark.parametrize("shape, spacing", [((23, 17, 12), (1.3, 0.7, 2.1)), ((9, 1, 14), (1.0, 1.0, 1.0))])
def test_label_metrics_equal_the_whole_volume_computation(shape, spacing):
    rng = np.random.default_rng(sum(shape))
    ids = [1, 2, 3, 5, 8, 13, 40, 255, 1000]
    a, b = random_atlas(shape, ids, rng), random_atlas(shape, ids, rng)
    b[b == 13] = 0  # one id only in a: distances undefined, Dice 0
    asked = ids + [77]  # absent from both: everything undefined
    got = metrics.label_metrics(a, b, spacing, labels=asked)
    assert_same_table(got, whole_volume_table(a, b, spacing, asked))
    assert got[13]["dice"] == 0.0 and math.isnan(got[77]["dice"])
    # Default label list: every non-zero id present; as tensors with a leading singleton dim too.
    default = metrics.label_metrics(torch.from_numpy(a)[None], torch.from_numpy(b)[None], spacing)
    present = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    assert_same_table(default, whole_volume_table(a, b, spacing, present))


def embed_pair(a, b, b_origin):
    """``a`` and ``b`` (placed at ``b_origin`` in ``a``'s lattice) embedded in one volume covering both."""
    low = np.minimum(0, b_origin)
    high = np.maximum(a.shape, np.add(b_origin, b.shape))
    big_a = np.zeros(tuple(high - low), np.int64)
    big_b = np.zeros_like(big_a)
    big_a[tuple(slice(-lo, -lo + n) for lo, n in zip(low, a.shape))] = a
    big_b[tuple(slice(o - lo, o - lo + n) for o, lo, n in zip(b_origin, low, b.shape))] = b
    return big_a, big_b


def test_label_metrics_of_maps_placed_apart_equal_the_embedding():
    """Maps of different shapes placed on one lattice (b_origin) score as both embedded in a volume
    covering them, including far apart (no common voxel) and touching their own borders."""
    rng = np.random.default_rng(11)
    spacing = (1.5, 0.9, 2.0)
    a = random_atlas((14, 12, 9), [1, 2, 4], rng)
    a[0, :3, :3] = 2  # on a's border: the border is outside
    b = random_atlas((10, 15, 7), [1, 2, 4], rng)
    for origin in [(3, -4, 2), (-6, 5, -3), (40, -3, 0)]:
        big_a, big_b = embed_pair(a, b, origin)
        # In the big volume a map's border voxels are no longer on the volume's border: pad so that
        # the surfaces stay those of the maps themselves.
        big_a, big_b = np.pad(big_a, 1), np.pad(big_b, 1)
        expected = whole_volume_table(big_a, big_b, spacing, [1, 2, 4])
        assert_same_table(metrics.label_metrics(a, b, spacing, labels=[1, 2, 4], b_origin=origin), expected)
    far = metrics.label_metrics(a, b, spacing, labels=[1], b_origin=(10**6, 0, 0))
    assert far[1]["dice"] == 0.0 and far[1]["asd"] > 1.4e6


def test_label_metrics_prepared_maps_and_progress():
    rng = np.random.default_rng(5)
    a, b = random_atlas((12, 10, 8), [1, 2, 3], rng), random_atlas((12, 10, 8), [1, 2, 3], rng)
    fixed = metrics.LabelSurfaces(a, [1, 2, 3])
    ticks = []

    class Bar:
        def update(self, n):
            ticks.append(n)

    got = metrics.label_metrics(fixed, metrics.LabelSurfaces(b, [1, 2, 3]), 1.5, progress=Bar())
    assert_same_table(got, whole_volume_table(a, b, 1.5, [1, 2, 3]))
    assert ticks == [1, 1, 1]
    with pytest.raises(ValueError, match="different label lists"):
        metrics.label_metrics(fixed, metrics.LabelSurfaces(b, [1, 2]), 1.0)


def voronoi_atlas(shape, count, rng):
    """``count`` labels as the Voronoi cells of random seeds inside an ellipsoid (every label present)."""
    from scipy.spatial import cKDTree

    grid = np.indices(shape).reshape(3, -1).T
    centre, radii = (np.asarray(shape) - 1) / 2, 0.5 * np.asarray(shape)
    inside = (((grid - centre) / radii) ** 2).sum(axis=1) <= 1
    seeds = grid[inside][rng.choice(int(inside.sum()), count, replace=False)]
    owner = cKDTree(seeds).query(grid)[1] + 1
    return np.where(inside, owner, 0).reshape(shape)


def per_label_table(a, b, spacing, labels, b_origin=(0, 0, 0)):
    """Dice, ASD and HD95 label by label: each map's surface by a binary erosion (beyond a map: background),
    nearest surface voxels by a KD-tree per label, in the lattice coordinates of ``a``."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    big_a, big_b = embed_pair(a, b, b_origin)
    low = np.minimum(0, b_origin)  # the embedding's voxel 0 in a's lattice
    cross = ndimage.generate_binary_structure(3, 1)
    spacing = np.asarray(spacing, dtype=np.float64)
    table = {}
    for label in labels:
        in_a, in_b = big_a == label, big_b == label
        total = int(in_a.sum() + in_b.sum())
        entry = {"dice": 2 * int((in_a & in_b).sum()) / total if total else math.nan, "asd": math.nan,
                 "hd95": math.nan}
        # np.pad: the map's own border is outside it
        surface_a = in_a & ~ndimage.binary_erosion(np.pad(in_a, 1), cross)[1:-1, 1:-1, 1:-1]
        surface_b = in_b & ~ndimage.binary_erosion(np.pad(in_b, 1), cross)[1:-1, 1:-1, 1:-1]
        if surface_a.any() and surface_b.any():
            points_a = (np.argwhere(surface_a) + low) * spacing
            points_b = (np.argwhere(surface_b) + low) * spacing
            pooled = np.concatenate([cKDTree(points_b).query(points_a)[0], cKDTree(points_a).query(points_b)[0]])
            entry["asd"], entry["hd95"] = float(pooled.mean()), float(np.percentile(pooled, 95))
        table[label] = entry
    return table


def assert_identical_table(got, expected):
    assert list(got) == list(expected)
    for label, values in expected.items():
        for key, value in values.items():
            assert got[label][key] == value or (math.isnan(value) and math.isnan(got[label][key])), \
                (label, key, got[label][key], value)


def many_label_pair(shape, count, seed):
    """A Voronoi atlas and a moved, speckled copy of it: one label missing from the copy, one id only in
    the copy, and a single-voxel label in each."""
    rng = np.random.default_rng(seed)
    a = voronoi_atlas(shape, count, rng)
    b = np.roll(a, (1, -2, 1), axis=(0, 1, 2))
    speckle = rng.random(shape) < 0.03
    b[speckle] = rng.integers(0, count + 1, int(speckle.sum()))
    b[b == 7] = 0
    b[shape[0] // 2, 2, shape[2] // 2] = count + 5  # only in b
    a[1, 1, 1], b[-2, -2, -3] = count + 9, count + 9  # one voxel in each map, far apart
    return a, b


@pytest.fixture
def transformed(monkeypatch):
    """The labels (per call, as a sorted list) whose distances the CPU core's box transform computed."""
    import gradreg_fast._C as core

    calls, original = [], core.label_surface_distances

    def spy(points_a, starts_a, points_b, starts_b, labels, boxes, count, *rest):
        calls.append(sorted(np.frombuffer(ctypes.string_at(labels, 8 * count), np.int64).tolist()))
        return original(points_a, starts_a, points_b, starts_b, labels, boxes, count, *rest)

    monkeypatch.setattr(core, "label_surface_distances", spy)
    return calls


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (1.3, 0.7, 2.1)])
@pytest.mark.parametrize("path", ["both", "trees"])
def test_label_metrics_with_many_labels_equal_a_per_label_search(spacing, path, transformed, monkeypatch):
    """The distances of one KD-tree per label over each whole surface: bit for bit by the trees alone (the
    shared-voxel shortcut, the threads and the tree settings change nothing), to rounding by default, where
    the box transform takes the labels whose two surfaces lie close and the trees the rest."""
    if path == "trees":
        monkeypatch.setattr(metrics, "BOX_VOXELS_PER_POINT", 0)
    same = assert_identical_table if path == "trees" else assert_same_table
    a, b = many_label_pair((26, 30, 22), 120, seed=1)
    labels = sorted((set(np.unique(a)) | set(np.unique(b))) - {0}) + [4000]  # 4000: in neither map
    expected = per_label_table(a, b, spacing, labels)
    assert math.isnan(expected[7]["asd"]) and expected[7]["dice"] == 0.0 and math.isnan(expected[4000]["dice"])
    assert expected[129]["dice"] == 0.0 and expected[129]["asd"] > 0  # the single voxels
    assert expected[125]["dice"] == 0.0 and math.isnan(expected[125]["hd95"])  # only in b
    for workers in (1, 2, 4):
        same(metrics.label_metrics(a, b, spacing, labels=labels, workers=workers), expected)
    if path == "trees":
        assert transformed == []
    else:  # both ways ran: the speckle spreads some labels' surfaces over the map, the single voxels lie apart
        assert transformed[0] == transformed[1] == transformed[2]
        boxed = {labels[k - 1] for k in transformed[0]}
        assert 20 <= len(boxed) <= len(labels) - 20 and not boxed & {7, 125, 129, 4000}
    # A prepared fixed map keeps its trees between calls, per spacing.
    fixed = metrics.LabelSurfaces(a, labels)
    for scale in (1.0, 1.7, 1.0):
        scaled = tuple(scale * s for s in spacing)
        for moving in (b, np.roll(b, 3, axis=1), a):
            got = metrics.label_metrics(fixed, metrics.LabelSurfaces(moving, labels), scaled)
            same(got, per_label_table(a, moving, scaled, labels))


def test_labels_the_box_transform_cannot_take_go_to_the_trees(transformed, monkeypatch):
    """Boxes over BOX_VOXELS_LIMIT, voxel sizes whose squares a double cannot hold, and a transform whose
    scratch does not fit (MemoryError) all leave the labels to the trees, with the same distances."""
    import gradreg_fast._C as core

    rng = np.random.default_rng(13)
    a, b = random_atlas((15, 12, 10), [1, 2, 3], rng), random_atlas((15, 12, 10), [1, 2, 3], rng)
    spacing = (0.8, 1.4, 1.1)
    expected = whole_volume_table(a, b, spacing, [1, 2, 3])
    assert_same_table(metrics.label_metrics(a, b, spacing), expected)
    assert transformed == [[1, 2, 3]]
    with monkeypatch.context() as small:
        small.setattr(metrics, "BOX_VOXELS_LIMIT", 1)
        assert_same_table(metrics.label_metrics(a, b, spacing), expected)
    tiny = tuple(1e-120 * s for s in spacing)
    for label, values in metrics.label_metrics(a, b, tiny).items():
        assert values["asd"] == pytest.approx(1e-120 * expected[label]["asd"], rel=1e-12)
    assert len(transformed) == 1

    def no_memory(*args):
        raise MemoryError("scratch")

    monkeypatch.setattr(core, "label_surface_distances", no_memory)
    assert_same_table(metrics.label_metrics(a, b, spacing), expected)


def test_box_transform_writes_every_row_of_its_labels_and_no_other():
    """The CPU core's label_surface_distances on outputs full of NaN: each chosen label's rows in both
    directions hold the nearest-point distances of a brute-force search (zero where the surfaces share a
    voxel), the rows of other labels keep their NaN."""
    import gradreg_fast._C as core

    rng = np.random.default_rng(8)
    spacing = np.array([0.7, 1.9, 1.3])
    # Three labels' point sets, grouped by label as LabelSurfaces keeps them; label 2 is shared in part.
    groups_a = [rng.integers(-3, 9, (n, 3)) for n in (5, 17, 1)]
    groups_b = [rng.integers(-1, 12, (n, 3)) for n in (9, 4, 6)]
    groups_b[1][:2] = groups_a[1][:2]
    points_a = np.ascontiguousarray(np.concatenate(groups_a), dtype=np.int64)
    points_b = np.ascontiguousarray(np.concatenate(groups_b), dtype=np.int64)
    starts_a = np.array([0, 0] + np.cumsum([len(g) for g in groups_a]).tolist(), np.int64)  # index 0: background
    starts_b = np.array([0, 0] + np.cumsum([len(g) for g in groups_b]).tolist(), np.int64)
    chosen = np.array([3, 2], np.int64)  # label index 1 is left out
    boxes = []
    for k in chosen:
        both = np.concatenate([groups_a[k - 1], groups_b[k - 1]])
        low = both.min(0) - np.array([1, 0, 2])  # a box larger than the points needs is fine
        boxes.append(np.concatenate([low, both.max(0) - low + 1]))
    boxes = np.ascontiguousarray(boxes, dtype=np.int64)
    out_ab, out_ba = np.full(len(points_a), np.nan), np.full(len(points_b), np.nan)
    core.label_surface_distances(points_a.ctypes.data, starts_a.ctypes.data, points_b.ctypes.data,
                                 starts_b.ctypes.data, chosen.ctypes.data, boxes.ctypes.data, len(chosen),
                                 spacing.tolist(), out_ab.ctypes.data, out_ba.ctypes.data, 2)
    for k in (2, 3):
        pa, pb = groups_a[k - 1] * spacing, groups_b[k - 1] * spacing
        pairwise = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
        np.testing.assert_allclose(out_ab[starts_a[k]:starts_a[k + 1]], pairwise.min(1), rtol=1e-13, atol=0)
        np.testing.assert_allclose(out_ba[starts_b[k]:starts_b[k + 1]], pairwise.min(0), rtol=1e-13, atol=0)
    assert (out_ab[starts_a[2]:starts_a[2] + 2] == 0).all() and (out_ba[starts_b[2]:starts_b[2] + 2] == 0).all()
    assert np.isnan(out_ab[:starts_a[2]]).all() and np.isnan(out_ba[:starts_b[2]]).all()


@pytest.mark.parametrize("shape, spacing", [((17, 13), (0.6, 1.7)), ((1, 19, 11), (2.0, 0.9, 1.4))])
def test_box_transform_on_flat_maps_equals_the_whole_volume_computation(shape, spacing, transformed):
    """2D maps (padded to one slice for the core) and maps one voxel thick, with anisotropic voxels."""
    rng = np.random.default_rng(len(shape))
    a, b = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    for label in (1, 2, 3):
        for m in (a, b):
            start = [int(rng.integers(0, max(1, n - 4))) for n in shape]
            m[tuple(slice(s, s + int(rng.integers(2, 7))) for s in start)] = label
    assert_same_table(metrics.label_metrics(a, b, spacing), whole_volume_table(a, b, spacing, [1, 2, 3]))
    assert transformed and transformed[0]


def test_label_metrics_with_many_labels_placed_apart_equal_a_per_label_search(monkeypatch):
    a, b = many_label_pair((20, 24, 18), 110, seed=2)
    b = b[2:, :-3, 1:]  # another shape too
    labels = sorted((set(np.unique(a)) | set(np.unique(b))) - {0})
    spacing = (0.9, 1.6, 1.2)
    for origin in [(0, 0, 0), (2, -3, 1), (-5, 4, 9), (30, 0, -2)]:
        expected = per_label_table(a, b, spacing, labels, origin)
        for workers in (1, 3):
            got = metrics.label_metrics(a, b, spacing, labels=labels, b_origin=origin, workers=workers)
            assert_same_table(got, expected)
        with monkeypatch.context() as trees_only:
            trees_only.setattr(metrics, "BOX_VOXELS_PER_POINT", 0)
            assert_identical_table(metrics.label_metrics(a, b, spacing, labels=labels, b_origin=origin), expected)
    # And against the distance transform of the whole embedding, to rounding.
    low = np.minimum(0, (-5, 4, 9))
    high = np.maximum(a.shape, np.add((-5, 4, 9), b.shape))
    big_a, big_b = np.zeros(tuple(high - low), np.int64), np.zeros(tuple(high - low), np.int64)
    big_a[tuple(slice(-lo, -lo + n) for lo, n in zip(low, a.shape))] = a
    big_b[tuple(slice(o - lo, o - lo + n) for o, lo, n in zip((-5, 4, 9), low, b.shape))] = b
    assert_same_table(metrics.label_metrics(a, b, spacing, labels=labels, b_origin=(-5, 4, 9)),
                      whole_volume_table(np.pad(big_a, 1), np.pad(big_b, 1), spacing, labels))


def test_percentile_is_numpys_bit_for_bit():
    rng = np.random.default_rng(4)
    for n in list(range(1, 60)) + [97, 1000, 4099]:
        values = rng.random(n) * rng.choice([1e-3, 1.0, 700.0])
        if n > 3:
            values[: n // 3] = 0.0  # ties, as the shared surface voxels give
        for q in (95, 50, 5, 99.9, 100, 0):
            assert metrics._percentile(values.copy(), q) == float(np.percentile(values, q)), (n, q)


def test_regularity_equals_the_separate_metrics():
    rng = np.random.default_rng(6)
    flow = rng.normal(0, 0.6, (3, 9, 8, 7))
    mask = rng.random((9, 8, 7)) < 0.5
    for m in (None, mask):
        both = metrics.regularity(torch.from_numpy(flow)[None], mask=m)
        assert both == {"folding_percent": metrics.folding_percent(flow, mask=m),
                        "sd_log_jacobian": metrics.sd_log_jacobian(flow, mask=m)}
    assert 0 < both["folding_percent"] < 100


def _blobs(seed=0, shape=(6, 7, 5)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4, shape), rng.integers(0, 4, shape)


def test_float_label_maps_within_round_off_are_their_whole_numbers():
    a, b = _blobs()
    expected = metrics.label_metrics(a, b, (1.0, 2.0, 1.5))
    noisy_a = a + np.random.default_rng(1).uniform(-5e-4, 5e-4, a.shape)
    assert metrics.label_metrics(noisy_a.astype(np.float32), b.astype(np.float64), (1.0, 2.0, 1.5)) == expected
    assert metrics.dice(noisy_a, b) == metrics.dice(a, b)
    assert metrics.dice(a > 0, b > 0) == metrics.dice((a > 0).astype(int), (b > 0).astype(int))
    as_tensor = metrics.label_metrics(torch.from_numpy(a).to(torch.bfloat16), torch.from_numpy(b), (1.0, 2.0, 1.5))
    assert as_tensor == expected


@pytest.mark.parametrize("value", [1.5, np.nan, np.inf, 1e20])
@pytest.mark.parametrize("where", ["a", "b"])
def test_a_label_map_that_is_not_whole_numbers_is_refused_not_misread(value, where):
    a, b = (m.astype(np.float64) for m in _blobs())
    (a if where == "a" else b)[1, 2, 3] = value
    for call in (lambda: metrics.dice(a, b), lambda: metrics.label_metrics(a, b),
                 lambda: metrics.LabelSurfaces(a if where == "a" else b, [1, 2])):
        with pytest.raises(ValueError, match="whole numbers"):
            call()


def test_label_ids_beyond_int64_are_refused():
    huge = np.full((3, 3, 3), np.iinfo(np.uint64).max, dtype=np.uint64)
    with pytest.raises(ValueError, match="within int64"):
        metrics.dice(huge, huge)


@pytest.mark.parametrize("labels, message", [(1, "sequence"), ("12", "sequence"), ([1.5], "whole numbers"),
                                             (["1"], "whole-number"), ([2 ** 70], "whole-number"),
                                             ([np.nan], "whole numbers")])
def test_bad_label_lists_are_named(labels, message):
    a, b = _blobs()
    for call in (lambda: metrics.dice(a, b, labels), lambda: metrics.label_metrics(a, b, labels=labels),
                 lambda: metrics.LabelSurfaces(a, labels)):
        with pytest.raises(ValueError, match="^`labels` must") as refused:
            call()
        assert message in str(refused.value)


def test_whole_float_and_numpy_label_lists_are_ids():
    a, b = _blobs()
    expected = metrics.label_metrics(a, b, labels=[1, 3])
    assert metrics.label_metrics(a, b, labels=[1.0, np.int16(3)]) == expected
    assert metrics.dice(a, b, np.array([1, 3], np.uint8)) == metrics.dice(a, b, [1, 3])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_flow_has_no_regularity(value):
    flow = np.zeros((3, 4, 5, 6))
    flow[1, 2, 2, 2] = value
    for call in (metrics.regularity, metrics.folding_percent, metrics.sd_log_jacobian, metrics.jacobian_determinant):
        with pytest.raises(ValueError, match="`flow` holds non-finite values"):
            call(flow)
    low = torch.zeros(1, 3, 4, 5, 6, dtype=torch.bfloat16)
    assert metrics.regularity(low) == {"folding_percent": 0.0, "sd_log_jacobian": 0.0}


def test_label_metrics_name_their_placement_and_spacing_arguments():
    a, b = _blobs()
    with pytest.raises(ValueError, match="`b_origin` must hold whole voxel offsets"):
        metrics.label_metrics(a, b, b_origin=(0.7, 0, 0))
    with pytest.raises(ValueError, match="`b_origin` must hold 3 integers"):
        metrics.label_metrics(a, b, b_origin=(0, 0))
    with pytest.raises(ValueError, match="`spacing` must be one value or 3"):
        metrics.label_metrics(a, b, spacing=(1.0, 2.0))
    for spacing in (1e200, 1e-200, 0.0, np.inf):  # squared distances would overflow or vanish
        with pytest.raises(ValueError, match=r"`spacing` must be positive voxel sizes in \[1e-150, 1e100\]"):
            metrics.label_metrics(a, b, spacing=spacing)
    for origin in ((1e19, 0, 0), (2 ** 63 - 1, 0, 0)):  # would wrap in int64
        with pytest.raises(ValueError, match="`b_origin` must hold offsets of at most 2\\*\\*53 voxels"):
            metrics.label_metrics(a, b, b_origin=origin)
    with pytest.raises(ValueError, match="`a` must be an array with at least one axis"):
        metrics.label_metrics(np.array(1), np.array(1))
    with pytest.raises(ValueError, match="`flow` must hold real numbers"):
        metrics.jacobian_determinant(np.zeros((3, 4, 4, 4), np.complex128))
    assert metrics.label_metrics(a, b, b_origin=np.array([0.0, 0.0, 0.0])) == metrics.label_metrics(a, b)
    # a 2D pair is scored as 2D (no 3D origin is assumed)
    flat_a, flat_b = a[:, :, 0], b[:, :, 0]
    table = metrics.label_metrics(flat_a, flat_b, spacing=(1.0, 2.0))
    assert table[1]["dice"] == pytest.approx(metrics.dice(flat_a, flat_b)[1])
    assert table[1]["asd"] == pytest.approx(metrics.average_surface_distance(flat_a == 1, flat_b == 1, (1.0, 2.0)))
