"""GLCM texture: the vectorised properties equal scikit-image's on the same quantised input."""

import numpy as np
import pytest

from sar_ray.metrics import glcm

ANGLES = [0.0, 45.0, 90.0, 135.0]


def _assert_same(q, levels, distances, angles, symmetric):
    ours = glcm.glcm_props(q, levels, distances, angles, symmetric)
    ref = glcm.glcm_props_skimage(q, levels, distances, angles, symmetric)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("levels", [2, 3, 8, 64, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_equals_skimage_on_random_images(levels, symmetric):
    rng = np.random.default_rng(levels)
    q = rng.integers(0, levels, (3, 33, 40)).astype(np.uint16)
    _assert_same(q, levels, [1, 2, 4], ANGLES, symmetric)


@pytest.mark.parametrize("levels", [2, 16, 64, 256])
def test_equals_skimage_on_constant_images(levels):
    # Flat GLCMs: contrast 0, ASM 1, entropy 0, and skimage's convention correlation = 1.
    q = np.stack([np.full((20, 20), v, np.uint16) for v in (0, levels // 2, levels - 1)])
    for symmetric in (True, False):
        _assert_same(q, levels, [1, 2, 4], ANGLES, symmetric)
    props = glcm.glcm_props(q, levels)
    i = glcm.GLCM_PROPS.index
    assert np.all(props[:, i("contrast")] == 0) and np.all(props[:, i("correlation")] == 1)
    assert np.allclose(props[:, i("ASM")], 1) and np.allclose(props[:, i("entropy")], 0)


def test_equals_skimage_on_speckle_images_at_256_levels():
    rng = np.random.default_rng(7)
    amp = np.sqrt(rng.gamma(4, 1 / 4, (2, 64, 64))) / 2.5
    q = glcm.quantize(amp, 256)
    _assert_same(q, 256, [1, 2, 4], ANGLES, True)


@pytest.mark.parametrize("levels", [128, 129, 181, 255])
def test_equals_skimage_around_the_packed_pair_table(levels):
    # Above glcm._PACK_LEVELS symmetric counts go to a packed table; up to ~180 levels two
    # small images still share one bincount (the per-image bin offsets).
    rng = np.random.default_rng(levels)
    q = rng.integers(0, levels, (3, 17, 23)).astype(np.uint16)
    q[1] = levels - 1  # constant at the top level: only the last diagonal bin
    q[2, :, :5] = 0
    _assert_same(q, levels, [1, 2, 4, 30], ANGLES, True)
    single = np.concatenate([glcm.glcm_props(im, levels) for im in q])
    np.testing.assert_allclose(glcm.glcm_props(q, levels), single, rtol=0, atol=1e-12)


def test_odd_offsets_thin_images_and_offsets_past_the_edge():
    rng = np.random.default_rng(8)
    for shape in [(40, 7), (7, 40), (5, 5), (1, 9)]:
        q = rng.integers(0, 8, (2, *shape))
        _assert_same(q, 8, [1, 3, 6, 50], [0.0, 30.0, 45.0, 120.0, 200.0], True)


def test_batch_equals_single_images_and_chunking():
    rng = np.random.default_rng(9)
    q = rng.integers(0, 256, (5, 24, 24)).astype(np.uint16)  # 256 levels: one image per chunk
    batch = glcm.glcm_props(q, 256)
    single = np.concatenate([glcm.glcm_props(im, 256) for im in q])
    np.testing.assert_array_equal(batch, single)


def test_quantize_and_validation():
    x = np.array([[0.0, 0.24999, 0.25, 0.999, 1.0, 1.5, -0.1]])
    assert glcm.quantize(x, 4).tolist() == [[0, 0, 1, 3, 3, 3, 0]]
    with pytest.raises(ValueError, match="levels"):
        glcm.quantize(x, 300)
    with pytest.raises(ValueError, match="grey levels"):
        glcm.glcm_props(np.array([[0, 9]]), 8)


def test_offsets_follow_skimage_convention():
    # Rows grow downwards: angle 90 is (+d, 0); 45 degrees at d=2 rounds 1.41 to 1.
    assert glcm.glcm_offsets([1], [0, 45, 90, 135]) == [(0, 1), (1, 1), (1, 0), (1, -1)]
    assert glcm.glcm_offsets([2, 4], [45]) == [(1, 1), (3, 3)]


def test_descriptors_average_angles():
    rng = np.random.default_rng(10)
    images = rng.random((2, 32, 32))
    desc = glcm.glcm_descriptors(images, 16, [1, 2], ANGLES)
    names = glcm.descriptor_names([1, 2])
    assert desc.shape == (2, len(names)) and names[0] == "contrast_d1"
    props = glcm.glcm_props(glcm.quantize(images, 16), 16, [1, 2], ANGLES)
    assert desc[0, names.index("entropy_d2")] == pytest.approx(props[0, glcm.GLCM_PROPS.index("entropy"), 1].mean())


def test_set_distances_zero_against_itself_and_symmetric_where_defined():
    rng = np.random.default_rng(11)
    names = glcm.descriptor_names([1, 2, 4])
    a = glcm.glcm_descriptors(rng.random((6, 32, 32)), 16)
    b = glcm.glcm_descriptors(rng.random((7, 32, 32)) ** 2, 16)
    same = glcm.set_distances(a, a, names)
    assert all(v == 0 for v in same.values()), same
    ab, ba = glcm.set_distances(a, b, names), glcm.set_distances(b, a, names)
    # The relative mean difference is symmetric; Wasserstein and Frechet are in reference units.
    assert ab["rel_mean_diff"] == pytest.approx(ba["rel_mean_diff"], rel=1e-12)
    assert ab["frechet"] > 0 and ab["wasserstein"] > 0
    assert 0 < ab["rel_mean_diff"] <= 2
    assert np.isnan(glcm.set_distances(a[:1], b, names)["frechet"])  # one image: no covariance
