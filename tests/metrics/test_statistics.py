"""Amplitude statistics: the numbers the speckle descriptors and distances give on known input."""

import numpy as np
import pytest
from scipy.special import polygamma
from scipy.stats import ks_2samp, wasserstein_distance

from sar_ray.metrics import statistics as st


def speckle_amplitude(looks: int, size: int = 512, seed: int = 0, sigma0: np.ndarray | float = 1.0) -> np.ndarray:
    """Amplitude of L-look fully developed speckle: sqrt(sigma0 * Gamma(L, 1/L))."""
    rng = np.random.default_rng(seed)
    return np.sqrt(sigma0 * rng.gamma(looks, 1.0 / looks, (size, size)))


@pytest.mark.parametrize("looks", [1, 4, 16])
def test_enl_and_cv_of_simulated_speckle(looks):
    amp = speckle_amplitude(looks, seed=looks)
    d = st.sar_descriptors(amp)
    assert d["enl"] == pytest.approx(looks, rel=0.05)
    assert d["cv"] == pytest.approx(1 / np.sqrt(looks), rel=0.05)
    # Method of log-cumulants: psi_1(L) = k2 recovers the looks; no texture left for K.
    assert d["gamma_looks"] == pytest.approx(looks, rel=0.05)
    assert d["molc_k2"] == pytest.approx(float(polygamma(1, looks)), rel=0.05)
    assert d["molc_k3"] == pytest.approx(float(polygamma(2, looks)), rel=0.15)
    if looks > 1:
        assert d["k_nu"] == st.K_NU_MAX


def test_enl_ignores_scene_brightness_and_picks_homogeneous_windows():
    # Half the image is 4-look speckle on a flat field; the other half is a strong random texture.
    rng = np.random.default_rng(1)
    looks = 4
    sigma0 = np.ones((512, 512))
    sigma0[:, 256:] = rng.gamma(0.5, 2.0, (512, 256))  # heterogeneous: pixel-to-pixel texture
    amp = np.sqrt(sigma0 * rng.gamma(looks, 1 / looks, sigma0.shape))
    assert st.enl(amp) == pytest.approx(looks, rel=0.1)
    # Scaling the image (calibration) changes nothing.
    assert st.enl(10 * amp) == pytest.approx(st.enl(amp), rel=1e-9)


def test_k_texture_recovered_when_texture_is_smooth():
    # K model: intensity = texture (Gamma nu, mean 1, constant over 16 px blocks) x L-look speckle.
    rng = np.random.default_rng(2)
    looks, nu = 4, 3.0
    tex = np.kron(rng.gamma(nu, 1 / nu, (32, 32)), np.ones((16, 16)))
    amp = np.sqrt(tex * rng.gamma(looks, 1 / looks, tex.shape))
    d = st.sar_descriptors(amp, enl_window=16)
    assert d["enl"] == pytest.approx(looks, rel=0.1)
    assert d["k_nu"] == pytest.approx(nu, rel=0.3)
    assert d["cv"] > 1 / np.sqrt(looks)  # texture on top of speckle


def test_inverse_trigamma_round_trip():
    x = np.array([0.05, 0.5, 1.0, 3.0, 16.0, 300.0])
    assert np.allclose(st.inverse_trigamma(polygamma(1, x)), x, rtol=1e-9)


def test_descriptors_of_degenerate_images_do_not_crash():
    flat = np.full((64, 64), 0.5)
    d = st.sar_descriptors(flat)
    assert d["cv"] == 0 and np.isinf(d["enl"])
    zeros = np.zeros((64, 64))
    d = st.sar_descriptors(zeros)
    assert np.isnan(d["enl"]) and np.isnan(d["molc_k2"])
    assert np.isnan(st.enl(np.ones((3, 3))))  # smaller than one window


def _hist(x, bins=256):
    return st.amplitude_histogram(np.clip(x, 0, 1), bins)


def test_histogram_distances_zero_for_a_set_against_itself():
    a = _hist(speckle_amplitude(4, 64, seed=3) / 3)
    d = st.histogram_distances(a, a, a, a)
    assert d == {"kl": 0.0, "js": 0.0, "wasserstein": 0.0, "ks": 0.0}


def test_histogram_distances_symmetry_and_ranges():
    a = _hist(speckle_amplitude(4, 64, seed=3) / 3)
    b = _hist(speckle_amplitude(1, 64, seed=4) / 3)
    assert st.js_divergence(a, b) == pytest.approx(st.js_divergence(b, a), abs=1e-15)
    assert st.wasserstein_from_histograms(a, b) == pytest.approx(st.wasserstein_from_histograms(b, a), abs=1e-15)
    assert st.ks_from_histograms(a, b) == st.ks_from_histograms(b, a)
    assert 0 < st.js_divergence(a, b) <= 1
    # KL is not symmetric but both directions are positive and finite thanks to the smoothing.
    assert st.kl_divergence(a, b) > 0 and st.kl_divergence(b, a) > 0
    assert np.isfinite(st.kl_divergence(a, np.eye(1, 256, 0, dtype=int).ravel()))
    # Disjoint supports: JS reaches its maximum of 1 bit.
    assert st.js_divergence(np.eye(1, 8, 0).ravel(), np.eye(1, 8, 7).ravel()) == pytest.approx(1.0)


def test_wasserstein_and_ks_match_scipy_on_samples():
    rng = np.random.default_rng(5)
    x, y = rng.beta(2, 5, 20000), rng.beta(2, 3, 20000)
    hx, hy = st.amplitude_histogram(x, st.CDF_BINS), st.amplitude_histogram(y, st.CDF_BINS)
    assert st.wasserstein_from_histograms(hx, hy) == pytest.approx(wasserstein_distance(x, y), abs=1 / st.CDF_BINS)
    assert st.ks_from_histograms(hx, hy) == pytest.approx(ks_2samp(x, y).statistic, abs=2e-3)


def test_kl_known_value():
    # Two-bin histograms without smoothing: KL((.5,.5) || (.25,.75)) = .5 ln 2 + .5 ln(2/3).
    kl = st.kl_divergence(np.array([2, 2]), np.array([1, 3]), pseudo_count=0)
    assert kl == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2 / 3))


def test_frechet_distance_closed_form_zero_and_symmetry():
    # Diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 - s2)^2.
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 3.0])
    s1, s2 = np.array([1.0, 2.0]), np.array([3.0, 0.5])
    fd = st.frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert fd == pytest.approx(1 + 4 + 4 + 2.25)
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(10, 21)), rng.normal(1, 2, size=(30, 21))  # singular covariance for x
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    assert st.frechet_distance(x.mean(0), cx, x.mean(0), cx) == 0.0
    assert st.frechet_distance(x.mean(0), cx, y.mean(0), cy) == pytest.approx(
        st.frechet_distance(y.mean(0), cy, x.mean(0), cx), rel=1e-9
    )


def test_descriptor_gaps():
    ref = {d: np.array([1.0, 3.0]) for d in st.DESCRIPTORS}
    assert all(v == 0 for v in st.descriptor_gaps(ref, ref).values())
    gen = {d: np.array([3.0, 5.0]) for d in st.DESCRIPTORS}
    gaps = st.descriptor_gaps(ref, gen)
    assert gaps["enl_gap"] == pytest.approx(1.0)  # relative: |4 - 2| / 2
    assert gaps["molc_k2_gap"] == pytest.approx(2.0)  # absolute for log-cumulants
    gen["enl"] = np.array([np.nan, 2.0])  # an image without a usable window is skipped
    assert st.descriptor_gaps(ref, gen)["enl_gap"] == 0.0
