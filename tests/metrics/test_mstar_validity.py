"""Validity on real SAR: every distance ranks held-out MSTAR chips closer to the rest of MSTAR
than blurred, despeckled or noise-added copies of the same held-out chips.

Reads ../shared/data/mstar-train (1,000 real X-band chips, 128 px, 8-bit JPEG; see its
README) in place and skips when it is absent (CI keeps the synthetic monotonicity tests in
test_degradation.py). Per class: 8 held-out chips, and 20 other chips as the reference.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, median_filter, uniform_filter

from sar_ray.config import EvalConfig
from sar_ray.data.io import read_image
from sar_ray.data.normalize import normalize
from sar_ray.evaluate import score_arrays

MSTAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mstar-train"
pytestmark = pytest.mark.skipif(not (MSTAR / "metadata.jsonl").is_file(), reason=f"{MSTAR} not present")

DISTANCES = [
    "stats/kl", "stats/js", "stats/wasserstein", "stats/ks",
    "glcm/frechet", "glcm/rel_mean_diff", "glcm/wasserstein",
    "stats/enl_gap", "stats/molc_k2_gap",  # speckle: looks and log-intensity spread
]


def lee(a, window=5):
    """Lee despeckling filter: local mean plus the local deviation scaled by signal / (signal + noise)."""
    m = uniform_filter(a, window)
    var = np.maximum(uniform_filter(a * a, window) - m * m, 0)
    k = var / (var + var.mean() + 1e-12)
    return m + k * (a - m)


DEGRADATIONS = {
    "blurred": lambda a, rng: gaussian_filter(a, 1.0),
    "despeckled (median 3x3)": lambda a, rng: median_filter(a, 3),
    "despeckled (Lee 5x5)": lambda a, rng: lee(a),
    "noise-added": lambda a, rng: np.clip(a + rng.normal(0, 0.5 * a.std(), a.shape), 0, 255),
}


@pytest.fixture(scope="module")
def mstar():
    rows = [json.loads(line) for line in (MSTAR / "metadata.jsonl").read_text().splitlines()]
    held, rest = [], []
    for label in sorted({r["label"] for r in rows}):
        of_class = [r for r in rows if r["label"] == label]
        held += [r for i, r in enumerate(of_class) if i % 10 == 0][:8]  # spread over azimuth
        rest += [r for i, r in enumerate(of_class) if i % 10 in (5, 7)][:20]
    assert not {r["file_name"] for r in held} & {r["file_name"] for r in rest}
    return [read_image(MSTAR / r["file_name"]) for r in held], [read_image(MSTAR / r["file_name"]) for r in rest]


def test_held_out_real_sar_is_closer_than_degraded_copies(mstar):
    held, rest = mstar
    cfg = EvalConfig(generated_normalized=False, bootstrap=0)
    norm = lambda a: normalize(a, cfg.normalization)  # noqa: E731 - both sets as training sees them
    reference = [norm(a) for a in rest]
    real = score_arrays([norm(a) for a in held], reference, cfg.model_copy(update={"bootstrap": 200}))
    worse = {}
    for name, degrade in DEGRADATIONS.items():
        rng = np.random.default_rng(0)
        m = score_arrays([norm(degrade(a, rng)) for a in held], reference, cfg)
        # Beyond noise: the degraded value lies above the held-out split's whole interval.
        worse[name] = [k for k in DISTANCES if not m[k] > real[f"{k}.ci_hi"]]
    assert not any(worse.values()), f"distances that did not rank real SAR first: {worse}"
