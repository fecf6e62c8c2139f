"""SAR normalisation: the numbers each method gives on hand-checked inputs."""

import numpy as np
import pytest

from sar_ray.config import NormalizationConfig
from sar_ray.data import NORMALIZERS, normalize, to_model_range, to_three_channels


def test_reference_divides_by_mean_plus_k_std():
    a = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    # mean 1.5, std sqrt(1.25): mean + 1*std = 2.618..., the 3 clips to 1.
    out = normalize(a, NormalizationConfig(method="reference", k=1.0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 0.381966, 0.763932, 1.0], atol=1e-6)
    # k = 3 (the reference study): 3 / (1.5 + 3 * 1.118034) = 0.618034
    out3 = normalize(a, NormalizationConfig(method="reference"))
    np.testing.assert_allclose(out3.ravel()[-1], 3 / (1.5 + 3 * 1.25**0.5), rtol=1e-6)


def test_intensity_input_is_square_rooted_first():
    amp = np.random.default_rng(0).rayleigh(1.0, (32, 32))
    for method in NORMALIZERS:
        a = normalize(amp, NormalizationConfig(method=method))
        i = normalize(amp**2, NormalizationConfig(method=method, input="intensity"))
        np.testing.assert_allclose(i, a, atol=1e-5, err_msg=method)


def test_db_clips_and_rescales():
    amp = np.array([0.0, 1e-3, 0.1, 1.0, 10.0])  # -inf, -60, -20, 0, +20 dB
    out = normalize(amp, NormalizationConfig(method="db", db_min=-30, db_max=0))
    np.testing.assert_allclose(out, [0.0, 0.0, 1 / 3, 1.0, 1.0], atol=1e-6)
    # 10*log10 for intensity: I = 0.01 is -20 dB.
    inten = normalize(np.array([0.01]), NormalizationConfig(method="db", input="intensity"))
    np.testing.assert_allclose(inten, [1 / 3], atol=1e-6)


def test_percentile_clips_to_percentiles():
    a = np.arange(101, dtype=np.float32)
    out = normalize(a, NormalizationConfig(method="percentile", p_low=10, p_high=90))
    assert out[0] == 0 and out[10] == 0 and out[90] == 1 and out[100] == 1
    assert out[50] == pytest.approx(0.5)


def test_none_uses_the_stored_range():
    cfg = NormalizationConfig(method="none")
    assert normalize(np.array([0.0, 51.0, 255.0]), cfg).tolist() == pytest.approx([0, 0.2, 1])
    assert normalize(np.array([0.0, 13107.0, 300.0]), cfg).tolist() == pytest.approx(
        [0, 0.2, 300 / 65535]
    )
    assert normalize(np.array([0, 200], np.uint16), cfg).tolist() == pytest.approx([0, 200 / 65535])
    assert normalize(np.array([0.1, 0.5]), cfg).tolist() == pytest.approx([0.1, 0.5])  # kept
    assert normalize(np.array([0.5, 2.5]), cfg).tolist() == pytest.approx([0.2, 1.0])  # / max


@pytest.mark.parametrize("method", list(NORMALIZERS))
@pytest.mark.parametrize("value", [0.0, 7.0])
def test_constant_image_gives_finite_unit_range(method, value):
    out = normalize(np.full((8, 8), value, np.float32), NormalizationConfig(method=method))
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    if value == 0.0:
        assert (out == 0).all()
    if method == "reference" and value:
        assert (out == 1).all()  # c / (c + k * 0)


def test_model_range_and_three_channels():
    img = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    x = to_three_channels(to_model_range(img))
    assert x.shape == (3, 2, 2) and x.dtype == np.float32
    assert x[2].tolist() == [[-1.0, 0.0], [1.0, -0.5]]
    assert (x[0] == x[1]).all() and (x[1] == x[2]).all()
    with pytest.raises(ValueError, match="grayscale"):
        to_three_channels(x)


def test_none_with_declared_bits_divides_by_their_full_scale_and_refuses_a_pixel_above_it():
    """12-bit data in 16-bit PNGs: `data.normalization.bits: 12` divides by 4095. An image it does
    not fit (a pixel above 4095, an 8-bit or float file, which / 4095 would read 16x too dark or
    worse) is an error, never a clipped or rescaled image."""
    from sar_ray.data.normalize import DepthError

    cfg = NormalizationConfig(method="none", bits=12)
    out = normalize(np.array([0, 1365, 4095], np.uint16), cfg, bits=16)
    assert out.tolist() == pytest.approx([0, 1365 / 4095, 1])
    assert normalize(np.array([0, 4095], np.uint16), cfg, bits=12).tolist() == [0, 1]  # a 12-bit TIFF
    with pytest.raises(DepthError, match=r"^chip\.png: a pixel of 5000 is above the full scale 4095 that "
                       r"data\.normalization\.bits=12 declares 12-bit samples; .*at least 13"):
        normalize(np.array([0, 5000], np.uint16), cfg, bits=16, name="chip.png")
    with pytest.raises(DepthError, match=r"^a\.png: stores 8-bit samples but data\.normalization\.bits=12"):
        normalize(np.array([0, 255], np.uint8), cfg, bits=8, name="a.png")
    with pytest.raises(DepthError, match=r"^s\.npy: stores float .*samples but"):
        normalize(np.array([0.0, 0.5], np.float32), cfg, bits=None, name="s.npy")
    # Other methods do not read it (a study may keep the key while trying them).
    assert normalize(np.array([0.0, 255.0]), NormalizationConfig(method="percentile", bits=12)).max() == 1
    assert normalize(np.array([0, 200], np.uint16), NormalizationConfig(method="none"), bits=16).tolist() \
        == pytest.approx([0, 200 / 65535])  # unset: the stored depth, as before


def test_declared_bits_are_checked_where_the_config_is_read():
    with pytest.raises(ValueError, match="bits"):
        NormalizationConfig(method="none", bits=0)
