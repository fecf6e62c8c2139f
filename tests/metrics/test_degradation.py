"""Degrading synthetic SAR moves it away from the clean set, monotonically in the strength.

The clean set is synthetic scenes (mean backscatter sigma0 x 4-look speckle). Each
degradation is applied to the clean set itself at increasing strength; strength 0 is the clean
set (distance 0), so every step must be non-decreasing.
"""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.special import gamma as gamma_fn

from sar_ray.config import EvalConfig
from sar_ray.data.normalize import normalize
from sar_ray.data.synth import layout_scene
from sar_ray.evaluate import score_arrays

LOOKS, SIZE, N = 4, 64, 16
DISTANCES = [
    "stats/kl", "stats/js", "stats/wasserstein", "stats/ks",
    "glcm/frechet", "glcm/rel_mean_diff", "glcm/wasserstein",
]


@pytest.fixture(scope="module")
def clean():
    rng = np.random.default_rng(0)
    scenes = []
    for _ in range(N):
        sigma0 = layout_scene(rng, SIZE).sigma0.astype(np.float64)
        scenes.append((sigma0, rng.standard_gamma(LOOKS, (SIZE, SIZE)) / LOOKS))
    return scenes


def blur(sigma0, g, t, rng):
    amp = np.sqrt(sigma0 * g)
    return gaussian_filter(amp, t) if t > 0 else amp


def remove_speckle(sigma0, g, t, rng):
    # Speckle factor g -> g^(1 - t): t = 1 leaves the noise-free backscatter.
    return np.sqrt(sigma0 * g ** (1 - t))


def gaussian_instead(sigma0, g, t, rng):
    # Replace a fraction t of the multiplicative fluctuation's variance by additive Gaussian
    # noise of the same overall power: same brightness and variance, wrong noise model.
    amp = np.sqrt(sigma0 * g)
    mean = np.sqrt(sigma0) * gamma_fn(LOOKS + 0.5) / (gamma_fn(LOOKS) * np.sqrt(LOOKS))
    fluct = amp - mean
    power = np.sqrt(np.mean(fluct**2))
    return np.clip(mean + np.sqrt(1 - t) * fluct + np.sqrt(t) * power * rng.standard_normal(amp.shape), 0, None)


@pytest.mark.parametrize(
    "degrade, strengths, extra",
    [
        (blur, [0, 0.5, 1.0, 2.0], ["stats/enl_gap"]),
        (remove_speckle, [0, 1 / 3, 2 / 3, 1.0], ["stats/enl_gap"]),
        (gaussian_instead, [0, 0.2, 0.5, 1.0], []),
    ],
    ids=["blur", "remove-speckle", "gaussian-noise"],
)
def test_distances_grow_with_degradation(clean, degrade, strengths, extra):
    cfg = EvalConfig(generated_normalized=False, bootstrap=0)  # point values only: no intervals needed
    norm = lambda a: normalize(a, cfg.normalization)  # noqa: E731 - both sets as training sees them
    reference = [norm(np.sqrt(s * g)) for s, g in clean]
    keys = DISTANCES + extra
    rows = []
    for t in strengths:
        rng = np.random.default_rng(1)
        generated = [norm(degrade(s, g, t, rng)) for s, g in clean]
        m = score_arrays(generated, reference, cfg)
        rows.append([m[k] for k in keys])
    rows = np.array(rows)  # (strengths, metrics)
    assert np.all(rows[0] == 0), dict(zip(keys, rows[0]))  # strength 0 is the clean set itself
    steps = np.diff(rows, axis=0)
    bad = {k: rows[:, j].round(5).tolist() for j, k in enumerate(keys) if np.any(steps[:, j] < 0)}
    assert not bad, f"distances that decreased with stronger {degrade.__name__}: {bad}"
    assert np.all(rows[-1] > 0)
